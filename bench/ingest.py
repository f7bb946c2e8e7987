"""Ingest throughput per model x runtime x precision: the model's ceiling vs `collection add`.

    .venv/bin/python bench/ingest.py --count 200 --int8

Builds (once, cached) a corpus of distinct files from real photos: crops, flips,
scales and re-encodes, 640x480 up to 4000x3000. Each configuration runs in its
own subprocess so that its peak RSS is its own; configurations alternate in
rounds and the tables show medians. In the same run it measures what decoding
costs per format, the bound that cores / (model core-seconds + decode
core-seconds) per image puts on `add`, and how far each runtime and precision
agrees with TensorFlow fp32 (top-1 labels, 10-NN overlap, lowest cosine) with
the real EfficientNet-Lite0 weights (Inception v3 runs with random weights: for
speed only).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from machine import cpu_flags  # bench/machine.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
# The real photos beside the checkout (/work/main -> /work/shared/photos), or where the env says.
SEEDS = Path(os.environ.get("COLLECTION_PHOTOS") or ROOT.parent / "shared" / "photos")
CACHE = Path(tempfile.gettempdir()) / "collection-bench"
CORES = os.cpu_count() or 1


def seed_photos() -> list[Image.Image]:
    """The real photos in ../shared/photos, else the ones shipped in scikit-image / scikit-learn."""
    files = sorted(p for p in SEEDS.glob("*") if p.suffix.lower() in (".jpg", ".png"))
    if files:
        return [Image.open(p).convert("RGB") for p in files]
    from skimage import data
    from sklearn.datasets import load_sample_images

    arrays = [data.chelsea(), data.coffee(), data.rocket(), data.astronaut()]
    arrays += list(load_sample_images().images)
    return [Image.fromarray(a).convert("RGB") for a in arrays]


def build_corpus(count: int, seed: int = 0) -> Path:
    source = "photos" if any(SEEDS.glob("*.jpg")) else "samples"
    folder = CACHE / f"corpus-{count}-{seed}-{source}"
    if folder.is_dir() and len(list(folder.iterdir())) == count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    photos = seed_photos()
    for i in range(count):
        photo = photos[i % len(photos)]
        w, h = photo.size
        crop = rng.uniform(0.6, 1.0)
        cw, ch = int(w * crop), int(h * crop)
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
        image = photo.crop((left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        kind = rng.random()
        if kind < 0.8:  # most of a real collection: camera JPEGs, 640x480 .. 4000x3000
            long_side = rng.randint(640, 4000)
            fmt, ext, options = "JPEG", "jpg", {"quality": rng.randint(75, 95)}
        elif kind < 0.9:
            long_side = rng.randint(640, 1600)
            fmt, ext, options = "PNG", "png", {}
        else:
            long_side = rng.randint(640, 2000)
            fmt, ext, options = "WEBP", "webp", {"quality": 85}
        scale = long_side / max(image.size)
        image = image.resize((max(1, int(image.width * scale)), max(1, int(image.height * scale))), Image.Resampling.BILINEAR)
        image.save(folder / f"{i:06}.{ext}", fmt, **options)
    return folder


def inception_weights_file() -> str:
    """A weights file saved from the real architecture with random weights: same speed as ImageNet's."""
    path = CACHE / "inception_v3_random.weights.h5"
    if not path.exists():
        import keras

        keras.utils.set_random_seed(0)
        CACHE.mkdir(parents=True, exist_ok=True)
        keras.applications.InceptionV3(weights=None).save_weights(path)
    return str(path)


def make_model(name: str, runtime: str, precision: str):
    from collection.models import get_model

    weights = inception_weights_file() if name == "inception_v3" else None
    model = get_model(name, weights=weights, precision=precision, runtime=runtime).load()
    assert model.runtime == runtime, f"asked for {runtime}, got {model.runtime}"
    return model


def run_loop2017(name: str, precision: str, files: list[Path]) -> float:
    """Batch of one, the network run twice per image (softmax, then pool), plain decode."""
    import tensorflow as tf

    model = make_model(name, "tensorflow", precision)
    keras_model = model.keras_model
    size = model.input_size
    as_probs = tf.function(lambda x: keras_model(x, training=False)[1])
    as_pool = tf.function(lambda x: keras_model(x, training=False)[0])
    normalise = model.normalise

    def one(path):
        image = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        x = normalise(np.asarray(image, np.float32)[None])
        probs = as_probs(x).numpy()
        pool = as_pool(x).numpy()
        return pool, probs

    one(files[0])  # trace both functions outside the timing
    start = time.perf_counter()
    for path in files:
        one(path)
    return len(files) / (time.perf_counter() - start)


def run_ceiling(name: str, runtime: str, precision: str, files: list[Path]) -> dict:
    """The model alone on pre-decoded tensors, at its best batch size, and its
    core-seconds per image (the process's CPU time over the same loop).

    A short sweep picks the batch size; the rate is then measured afresh over as
    many images as `add` gets, so that the best of several noisy runs is not
    what `add` is compared with."""
    model = make_model(name, runtime, precision)
    from collection import images

    pixels = [model.prepare(images.decode(p, min_side=model.min_side).image) for p in files[:64]]

    def rate(batch_size: int, count: int) -> tuple[float, float]:
        batch = [pixels[i % len(pixels)] for i in range(batch_size)]
        model.embed_batch(batch)  # warm up this shape
        done, start, cpu = 0, time.perf_counter(), time.process_time()
        while done < count:
            model.embed_batch(batch)
            done += batch_size
        return done / (time.perf_counter() - start), (time.process_time() - cpu) / done

    sweep = {size: rate(size, 64)[0] for size in (8, 16, 32, 64)}
    best = max(sweep, key=sweep.get)
    images_per_s, core_s = rate(best, len(files))
    out = {"rate": images_per_s, "batch": best, "model_core_ms": 1000 * core_s}
    if runtime == "openvino":
        out["kernels"] = openvino_kernels(model)
    return out


def openvino_kernels(model) -> list[str]:
    """The instruction sets named by the kernels OpenVINO's CPU plugin picks for the
    model (its cached IR compiled again): how far --max-isa reached."""
    import openvino as ov

    from collection import runtimes

    core = ov.Core()
    compiled = core.compile_model(core.read_model(model.ir_path), "CPU", {"INFERENCE_PRECISION_HINT": runtimes._INFERENCE_PRECISION[model.precision]})
    found = set()
    for op in compiled.get_runtime_model().get_ops():
        kind = op.get_rt_info()["primitiveType"].astype(str)
        found.update(isa for isa in ("amx", "avx512", "avx2", "sse41") if isa in kind)
    return sorted(found)


def run_decode(name: str, files: list[Path]) -> dict:
    """What `add`'s decoding threads do per file (read, hash, decode at reduced size, fit
    to the model, thumbnail): core-ms per image with every core decoding, as in `add`,
    where every core is busy, like the ceiling's; and on one thread with the other
    cores idle, as measured before session 10 (printed beside it). A core's speed can
    depend on what the others do: on the 2-core Xeon of session 10, every core cost
    1.04x one thread's core-ms (median of 7 runs, 0.88-1.12x). By format, from the
    all-cores run (each file's own thread's CPU time)."""
    from concurrent.futures import ThreadPoolExecutor

    from collection import images
    from collection.models import get_model

    model = get_model(name)  # not built: prepare() and min_side need no weights

    def one(path: Path) -> tuple[str, float]:
        cpu = time.thread_time()
        data = path.read_bytes()
        images.sha256_bytes(data)
        decoded = images.decode(path, data, model.min_side)
        model.prepare(decoded.image)
        images.thumbnail(decoded.image)
        return decoded.format, 1000 * (time.thread_time() - cpu)

    def core_ms(threads: int) -> tuple[float, list[tuple[str, float]]]:
        cpu = time.process_time()
        with ThreadPoolExecutor(threads) as pool:
            timed = list(pool.map(one, files))
        return 1000 * (time.process_time() - cpu) / len(files), timed

    for path in files[:4]:  # Pillow's plugins and numpy's first calls, outside both timings
        one(path)
    one_thread, _ = core_ms(1)
    every_core, timed = core_ms(CORES)
    by_format: dict[str, list[float]] = {}
    for fmt, ms in timed:
        by_format.setdefault(fmt, []).append(ms)
    return {
        "decode_core_ms": every_core,
        "decode_one_thread_core_ms": one_thread,
        "formats": {fmt: (len(v), float(np.mean(v))) for fmt, v in by_format.items()},
    }


def run_add(name: str, runtime: str, precision: str, files: list[Path], batch_size: int | None) -> dict:
    """`collection add` end to end: decode + model + SQLite + matches, into a new database."""
    from collection.ingest import Ingester, upkeep_behind
    from collection.search import one_blas_thread
    from collection.store import Store

    one_blas_thread()  # as `collection add` does: numpy's BLAS on one thread for the upkeep
    model = make_model(name, runtime, precision)
    model.embed_batch([np.zeros((model.input_size,) * 2 + (3,), np.uint8)] * (batch_size or model.batch_size))
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "bench.db")
        upkeep = upkeep_behind(store.path, refresh_map=False)  # as `collection add` does
        rss: list[float] = []

        def after_batch(ids):
            upkeep(ids)
            rss.append(current_rss_mb())

        after_batch.wait, after_batch.drain, after_batch.hurry = upkeep.wait, upkeep.drain, upkeep.hurry
        ingester = Ingester(store, model, batch_size=batch_size, on_batch=after_batch)
        start, cpu, machine = time.perf_counter(), time.process_time(), cpu_times()
        summary = ingester.add([str(p) for p in files])
        upkeep.close()
        elapsed = time.perf_counter() - start
        steal = steal_share(machine, cpu_times())
        core_ms = 1000 * (time.process_time() - cpu) / len(files)
        assert summary.added == len(files), summary.line()
    shares = {k: v / elapsed for k, v in summary.seconds.items()}
    # Flat memory: resident size at the end against after the first quarter of the batches.
    growth = rss[-1] - rss[len(rss) // 4]
    return {"rate": len(files) / elapsed, "add_core_ms": core_ms, "upkeep_core_ms": 1000 * upkeep.core_seconds / len(files),
            "shares": shares, "rss_growth_mb": growth, "workers": ingester.workers, "steal": steal}


def run_agreement(name: str, files: list[Path], configs: list[tuple[str, str]]) -> dict:
    """Each (runtime, precision) against TensorFlow fp32 on every file: top-1 label
    agreement, mean overlap of the 10 nearest neighbours, lowest cosine of one image's
    two vectors."""
    from collection import images

    def embed(runtime: str, precision: str) -> tuple[np.ndarray, np.ndarray]:
        model = make_model(name, runtime, precision)
        pixels = [model.prepare(images.decode(p, min_side=model.min_side).image) for p in files]
        parts = [model.embed_batch(pixels[i : i + 16]) for i in range(0, len(pixels), 16)]
        return np.concatenate([v for v, _ in parts]), np.concatenate([p for _, p in parts])

    v0, p0 = embed("tensorflow", "fp32")
    n0 = neighbours(v0, 10)
    out = {}
    for runtime, precision in configs:
        v, p = (v0, p0) if (runtime, precision) == ("tensorflow", "fp32") else embed(runtime, precision)
        n = neighbours(v, 10)
        out[f"{runtime} {precision}"] = {
            "top1": float(np.mean(p0.argmax(1) == p.argmax(1))),
            "overlap": float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(n0, n)])),
            "min_cos": float(np.min(np.sum(v0 * v, axis=1))),
        }
    return out


def run_int8(name: str, files: list[Path]) -> dict:
    """OpenVINO int8 through NNCF post-training quantization, calibrated on the corpus's
    even-numbered files (real photos, real weights): its model-only rate and core-ms at
    the model's batch size, and its agreement with TensorFlow fp32 on every file and on
    the odd-numbered ones it was not calibrated on. Benchmark only: `collection` does
    not offer int8."""
    import nncf
    import openvino as ov

    from collection import images, runtimes

    reference = make_model(name, "tensorflow", "fp32")
    pixels = np.stack([reference.prepare(images.decode(p, min_side=reference.min_side).image) for p in files])
    v0, p0 = reference.embed_batch(list(pixels))
    calibration = nncf.Dataset([pixels[i : i + 1] for i in range(0, len(pixels), 2)])
    quantized = nncf.quantize(ov.convert_model(reference._traced()), calibration, subset_size=len(pixels) // 2)
    forward = runtimes.compile_forward(quantized, f"{name} int8", "fp32", reference.batch_size)
    size = reference.batch_size
    forward(pixels[:size])  # warm up
    start, cpu = time.perf_counter(), time.process_time()
    parts = [forward(pixels[i : i + size]) for i in range(0, len(pixels), size)]
    rate = len(pixels) / (time.perf_counter() - start)
    core_ms = 1000 * (time.process_time() - cpu) / len(pixels)
    pool = np.concatenate([p[0] for p in parts])
    probs = np.concatenate([p[1] for p in parts])
    v = pool / np.linalg.norm(pool, axis=1, keepdims=True)
    n0, n = neighbours(v0, 10), neighbours(v, 10)
    odd = slice(1, None, 2)
    return {
        "rate": rate, "batch": size, "model_core_ms": core_ms, "nncf": nncf.__version__,
        "top1": float(np.mean(p0.argmax(1) == probs.argmax(1))),
        "overlap": float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(n0, n)])),
        "min_cos": float(np.min(np.sum(v0 * v, axis=1))),
        "held_out_top1": float(np.mean(p0[odd].argmax(1) == probs[odd].argmax(1))),
        "held_out_min_cos": float(np.min(np.sum(v0[odd] * v[odd], axis=1))),
    }


def neighbours(vectors: np.ndarray, k: int) -> np.ndarray:
    scores = vectors @ vectors.T
    np.fill_diagonal(scores, -np.inf)
    return np.argsort(-scores, axis=1)[:, :k]


def cpu_times() -> list[int] | None:
    """The machine's CPU time by kind (/proc/stat: user, nice, system, idle, iowait,
    irq, softirq, steal), None where there is no /proc."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return None


def steal_share(before: list[int] | None, after: list[int] | None) -> float | None:
    """The share of the machine's CPU time that its host gave to other guests (steal)."""
    if before is None or after is None:
        return None
    spent = [b - a for a, b in zip(before, after)]
    return spent[7] / max(sum(spent), 1)


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args) -> None:
    files = sorted(Path(args.corpus).iterdir())
    if args.run == "loop2017":
        result = {"rate": run_loop2017(args.model, args.precision, files)}
    elif args.run == "ceiling":
        result = run_ceiling(args.model, args.runtime, args.precision, files)
    elif args.run == "decode":
        result = run_decode(args.model, files)
    elif args.run == "int8":
        result = run_int8(args.model, files)
    elif args.run == "agreement":
        configs = [tuple(c.split(" ")) for c in args.configs.split(",")]
        result = run_agreement(args.model, files, configs)
    else:
        result = run_add(args.model, args.runtime, args.precision, files, args.batch_size)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def measure(run: str, name: str, corpus: Path, runtime: str = "", precision: str = "", **extra) -> dict:
    """One configuration in a subprocess of its own, so that its peak RSS is its own."""
    command = [sys.executable, __file__, "--run", run, "--model", name, "--corpus", str(corpus)]
    command += ["--runtime", runtime, "--precision", precision]
    for key, value in extra.items():
        if value is not None:
            command += [f"--{key.replace('_', '-')}", str(value)]
    out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{run} {name} {runtime} {precision} failed")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if "rate" in r:
        batch = f" (batch {r['batch']}, {r['model_core_ms']:.1f} core-ms/image)" if "batch" in r else ""
        batch += f", OpenVINO kernels: {' '.join(r['kernels'])}" if "kernels" in r else ""
        growth = f", {r['workers']} decode threads, RSS {r['rss_growth_mb']:+.0f} MB from the first quarter to the end" if "rss_growth_mb" in r else ""
        print(f"  {name:<18} {run:<9} {runtime:<10} {precision}: {r['rate']:6.2f} images/s{batch}, peak RSS {r['peak_rss_mb']:.0f} MB{growth}", flush=True)
    elif "decode_core_ms" in r:
        print(f"  {name:<18} decode: {r['decode_core_ms']:.1f} core-ms/image on {CORES} threads, "
              f"{r['decode_one_thread_core_ms']:.1f} on one", flush=True)
    return r


def combine(runs: list[dict]) -> dict:
    """Medians over rounds (rates, core-ms, time shares), highest peak RSS."""
    out = {"peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}
    for key in ("rate", "model_core_ms", "decode_core_ms", "decode_one_thread_core_ms", "add_core_ms", "upkeep_core_ms"):
        if key in runs[0]:
            out[key] = float(np.median([r[key] for r in runs]))
    if "batch" in runs[0]:
        out["batch"] = Counter(r["batch"] for r in runs).most_common(1)[0][0]
    if "kernels" in runs[0]:
        out["kernels"] = sorted({isa for r in runs for isa in r["kernels"]})
    if "rss_growth_mb" in runs[0]:
        out["rss_growth_mb"] = max(r["rss_growth_mb"] for r in runs)
        out["workers"] = runs[0]["workers"]
    if "shares" in runs[0]:
        keys = {k for r in runs for k in r["shares"]}
        out["shares"] = {k: float(np.median([r["shares"].get(k, 0.0) for r in runs])) for k in keys}
    if "formats" in runs[0]:
        out["formats"] = {
            fmt: (n, float(np.median([r["formats"][fmt][1] for r in runs]))) for fmt, (n, _) in runs[0]["formats"].items()
        }
    return out


def per_round(runs: dict[tuple, list[dict]], runtime: str, precision: str) -> dict[str, list]:
    """``add`` over the bound, and over the bound with the upkeep, in each round from
    that round's own decode, ceiling and add, run one after the other: the machine's
    speed drifts between rounds (shared cores), and a ratio of medians taken from
    different rounds mixes fast and slow moments. With each round's steal share while
    `add` ran (None where there is no /proc)."""
    out: dict[str, list] = {"bound": [], "bound+upkeep": [], "bound, one-thread decode": [], "steal": []}
    rounds = zip(runs[("decode",)], runs[("ceiling", runtime, precision)], runs[("add", runtime, precision)])
    for decode, ceiling, add in rounds:
        work = ceiling["model_core_ms"] + decode["decode_core_ms"]
        out["bound"].append(add["rate"] * work / (1000 * CORES))
        out["bound+upkeep"].append(add["rate"] * (work + add["upkeep_core_ms"]) / (1000 * CORES))
        one_thread = ceiling["model_core_ms"] + decode["decode_one_thread_core_ms"]
        out["bound, one-thread decode"].append(add["rate"] * one_thread / (1000 * CORES))
        out["steal"].append(add.get("steal"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200, help="files in the corpus")
    parser.add_argument("--models", default="efficientnet_lite0,inception_v3")
    parser.add_argument("--runtimes", default="tensorflow,openvino")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--batch-size", type=int, default=None, help="for add (default: the model's own)")
    parser.add_argument("--rounds", type=int, default=3, help="configurations run alternately this many times; medians are shown")
    parser.add_argument("--agreement-precisions", default="fp32,bf16", help="agreement is cheap: every runtime at these")
    parser.add_argument("--int8", action="store_true", help="also OpenVINO int8 through NNCF (pip install nncf), EfficientNet-Lite0 only")
    parser.add_argument("--loop2017", action="store_true", help="also time the 2017 loop (batch 1, two passes), once")
    parser.add_argument(
        "--max-isa", metavar="ISA",
        help="cap the instruction set the model's kernels may use, e.g. AVX2 (ONEDNN_MAX_CPU_ISA for TensorFlow's "
             "oneDNN, OV_CPU_MAX_ISA and ONEDNN_MAX_CPU_ISA for OpenVINO): an older CPU emulated on this one; "
             "use with --precisions fp32",
    )
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--runtime", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--configs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        return child(args)

    if args.max_isa:  # read by the children, each a process of its own, before their first kernel
        os.environ["ONEDNN_MAX_CPU_ISA"] = os.environ["OV_CPU_MAX_ISA"] = args.max_isa.upper()
    corpus = build_corpus(args.count)
    megapixels = np.mean([np.prod(Image.open(p).size) for p in corpus.iterdir()]) / 1e6
    print(f"corpus: {args.count} files, mean {megapixels:.1f} MP, in {corpus} (from {SEEDS if 'photos' in corpus.name else 'scikit samples'})")
    print(f"machine: {CORES} cores; CPU flags: {cpu_flags()}")
    if args.max_isa:
        print(f"emulated {args.max_isa.upper()}-only (ISA capped on this machine: ONEDNN_MAX_CPU_ISA and OV_CPU_MAX_ISA "
              f"= {args.max_isa.upper()}; decoding's own SIMD (libjpeg-turbo, numpy) not capped)")
    print(f"command: {' '.join(sys.argv)}\n")
    configs = [(rt, p) for p in args.precisions.split(",") for rt in args.runtimes.split(",")]
    rows = []
    for name in args.models.split(","):
        loop = measure("loop2017", name, corpus, "tensorflow", "fp32") if args.loop2017 else None
        runs: dict[tuple, list[dict]] = {("decode",): []}
        for config in configs:
            runs[("ceiling", *config)] = []
            runs[("add", *config)] = []
        for _ in range(args.rounds):
            runs[("decode",)].append(measure("decode", name, corpus))
            for runtime, precision in configs:
                for run in ("ceiling", "add"):
                    runs[(run, runtime, precision)].append(
                        measure(run, name, corpus, runtime, precision, batch_size=args.batch_size)
                    )
        agreement = {}
        if name == "efficientnet_lite0":  # real weights: agreement means something
            checked = [(r, p) for p in args.agreement_precisions.split(",") for r in args.runtimes.split(",")]
            measured = measure("agreement", name, corpus, configs=",".join(f"{r} {p}" for r, p in checked))
            agreement = {config: a for config, a in measured.items() if config != "peak_rss_mb"}
        int8 = None
        if args.int8 and name == "efficientnet_lite0":
            if importlib.util.find_spec("nncf"):
                int8 = measure("int8", name, corpus, "openvino", "int8")
            else:
                print("  int8 skipped: NNCF is not installed (pip install nncf)")
        combined = {key: combine(r) for key, r in runs.items()}
        for runtime, precision in configs:
            combined[("add", runtime, precision)]["per_round"] = per_round(runs, runtime, precision)
        rows.append((name, loop, agreement, combined, int8))

    print(f"\nMedians of {args.rounds} rounds, configurations alternating (the machine is shared: figures are noisy).")
    print("bound: cores / (model core-ms + decode core-ms) per image, from the same run (the issue's definition); decode")
    print("core-ms with every core decoding, as in `add` (in brackets: on one thread, the other core idle, as before session 10).")
    print("add / bound: from the medians; below the table, each round's own ratio (its decode, ceiling and add) and their median.")
    print("bound+upkeep: cores / (model + decode + upkeep core-ms): upkeep is matches, duplicates and the index after each")
    print("batch (its thread's CPU time in `add`), work `add` must also do. vs TF: against TensorFlow at the same precision;")
    print("core-ms vs TF: TensorFlow's model core-ms over this one's (the ceiling's speed-up with both cores busy on it alone).")
    print("core-ms: CPU time of the whole process per image (all threads), which sharing the machine inflates less than images/s.")
    print("cores busy: images/s x core-ms: how many of the cores the run kept busy (less than all: waiting, or other jobs' share).")
    print("Agreement against TensorFlow fp32 on every file (real weights; Inception v3 has random ones, so speed only).\n")
    print("| model | runtime | precision | ceiling images/s | ceiling vs TF | model core-ms | core-ms vs TF | ceiling cores busy "
          "| decode core-ms | upkeep core-ms | bound images/s | bound+upkeep | add images/s | add core-ms | add cores busy | add vs TF "
          "| add / bound | add / bound+upkeep | top-1 | 10-NN | min cos | peak RSS MB |")
    print("| --- | --- | --- |" + " ---: |" * 19)
    for name, loop, agreement, results, int8 in rows:
        decode = results[("decode",)]["decode_core_ms"]
        decode_one_thread = results[("decode",)]["decode_one_thread_core_ms"]
        for runtime, precision in configs:
            ceiling, add = results[("ceiling", runtime, precision)], results[("add", runtime, precision)]
            tf_ceiling = results.get(("ceiling", "tensorflow", precision))
            tf_add = results.get(("add", "tensorflow", precision))
            upkeep = add["upkeep_core_ms"]
            bound = 1000 * CORES / (ceiling["model_core_ms"] + decode)
            bound_upkeep = 1000 * CORES / (ceiling["model_core_ms"] + decode + upkeep)
            a = agreement.get(f"{runtime} {precision}")
            agree = f"{a['top1']:.3f} | {a['overlap']:.3f} | {a['min_cos']:.5f}" if a else " |  | "
            vs_tf = (
                f"{ceiling['rate'] / tf_ceiling['rate']:.2f} | {ceiling['model_core_ms']:.1f} | {tf_ceiling['model_core_ms'] / ceiling['model_core_ms']:.2f}"
                if tf_ceiling else f" | {ceiling['model_core_ms']:.1f} | "
            )
            print(
                f"| {name} | {runtime} | {precision} | {ceiling['rate']:.1f} (batch {ceiling['batch']}) | {vs_tf} "
                f"| {ceiling['rate'] * ceiling['model_core_ms'] / 1000:.2f} | {decode:.1f} ({decode_one_thread:.1f}) | {upkeep:.1f} | {bound:.1f} | {bound_upkeep:.1f} "
                f"| {add['rate']:.1f} ({add['workers']} decode threads) | {add['add_core_ms']:.1f} | {add['rate'] * add['add_core_ms'] / 1000:.2f} "
                f"| {add['rate'] / tf_add['rate'] if tf_add else float('nan'):.2f} | {add['rate'] / bound:.2f} "
                f"| {add['rate'] / bound_upkeep:.2f} | {agree} | {max(ceiling['peak_rss_mb'], add['peak_rss_mb']):.0f} |"
            )
        for config, a in agreement.items():  # precisions checked for agreement but not timed
            if tuple(config.split(" ")) not in configs:
                print(f"| {name} | {config.replace(' ', ' | ')} | | | | | | | | | | | | | | | | {a['top1']:.3f} | {a['overlap']:.3f} | {a['min_cos']:.5f} | |")
        if int8:
            tf_ceiling = results.get(("ceiling", "tensorflow", "fp32"))
            ratio = f"{tf_ceiling['model_core_ms'] / int8['model_core_ms']:.2f}" if tf_ceiling else ""
            print(
                f"| {name} | openvino (NNCF {int8['nncf']}, bench only) | int8 | {int8['rate']:.1f} (batch {int8['batch']}) | "
                f"| {int8['model_core_ms']:.1f} | {ratio} | {int8['rate'] * int8['model_core_ms'] / 1000:.2f} | | | | | | | | | | | {int8['top1']:.3f} | {int8['overlap']:.3f} "
                f"| {int8['min_cos']:.5f} | {int8['peak_rss_mb']:.0f} |"
            )
        if loop:
            print(f"| {name} | 2017 loop (batch 1, two passes) | fp32 | | | | | | | | | | {loop['rate']:.2f} | | | | | | | | | {loop['peak_rss_mb']:.0f} |")
    print()
    for name, _, _, results, _ in rows:
        for runtime, precision in configs:
            ratios = results[("add", runtime, precision)]["per_round"]
            print(f"{name} {runtime} {precision}, per round: add / bound " + " ".join(f"{r:.2f}" for r in ratios["bound"])
                  + f" (median {np.median(ratios['bound']):.2f}); add / bound+upkeep "
                  + " ".join(f"{r:.2f}" for r in ratios["bound+upkeep"]) + f" (median {np.median(ratios['bound+upkeep']):.2f})")
            print("  add / bound with decoding timed on one thread (as before session 10), per round: "
                  + " ".join(f"{r:.2f}" for r in ratios["bound, one-thread decode"])
                  + f" (median {np.median(ratios['bound, one-thread decode']):.2f})")
            if None not in ratios["steal"]:
                print("  steal (the host's share of this machine's CPU time while `add` ran), per round: "
                      + " ".join(f"{100 * r:.1f} %" for r in ratios["steal"]))
    for name, _, _, results, _ in rows:
        for runtime, precision in configs:
            kernels = results[("ceiling", runtime, precision)].get("kernels")
            if kernels:
                print(f"\n{name} OpenVINO {precision}: its CPU plugin's kernels named {', '.join(kernels)}.", end="")
    print()
    for name, _, _, _, int8 in rows:
        if int8:
            print(f"\n{name} int8: calibrated on the {args.count // 2} even-numbered files; on the odd-numbered ones alone, "
                  f"top-1 {int8['held_out_top1']:.3f}, min cosine {int8['held_out_min_cos']:.5f}.")

    print(f"\nDecoding per format ({CORES} threads, each file's own thread's CPU time: read, hash, decode at reduced size,")
    print("fit to the model, thumbnail):\n")
    print("| model (input) | format | files | core-ms per image |")
    print("| --- | --- | ---: | ---: |")
    for name, _, _, results, _ in rows:
        for fmt, (n, ms) in sorted(results[("decode",)]["formats"].items()):
            print(f"| {name} | {fmt} | {n} | {ms:.1f} |")

    print("\nWhere `add` spends its wall-clock time (calling thread; decoding: waiting for images not yet decoded;")
    print("after batch: waiting for the previous batch's upkeep, which runs on its own thread):\n")
    parts = ["model", "decoding", "writing", "after batch"]
    print("| model | runtime | precision | " + " | ".join(parts) + " | other |")
    print("| --- | --- | --- | " + " | ".join("---:" for _ in parts) + " | ---: |")
    for name, _, _, results, _ in rows:
        for runtime, precision in configs:
            r = results[("add", runtime, precision)]
            shares = [r["shares"].get(part, 0.0) for part in parts]
            cells = " | ".join(f"{100 * x:.0f} %" for x in shares + [max(0.0, 1 - sum(shares))])
            print(f"| {name} | {runtime} | {precision} | {cells} |")


if __name__ == "__main__":
    main()
