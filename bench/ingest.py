"""Ingest throughput: the 2017 loop vs the model's ceiling vs `collection add`.

    .venv/bin/python bench/ingest.py --count 200

Builds (once, cached) a corpus of distinct files from real photos: crops, flips,
scales and re-encodes, 640x480 up to 4000x3000. Each configuration runs in its
own subprocess so that its peak RSS is its own. Prints one table.
"""

from __future__ import annotations

import argparse
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

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT.parent / "shared" / "photos"
CACHE = Path(tempfile.gettempdir()) / "collection-bench"
CONFIGS = [
    ("loop2017", "fp32"),
    ("ceiling", "fp32"),
    ("add", "fp32"),
    ("ceiling", "bf16"),
    ("add", "bf16"),
]


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
    folder = CACHE / f"corpus-{count}-{seed}"
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


def make_model(name: str, precision: str):
    from collection.models import get_model

    weights = inception_weights_file() if name == "inception_v3" else None
    return get_model(name, weights=weights, precision=precision).load()


def run_loop2017(name: str, precision: str, files: list[Path]) -> float:
    """Batch of one, the network run twice per image (softmax, then pool), plain decode."""
    import tensorflow as tf

    model = make_model(name, precision)
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


def run_ceiling(name: str, precision: str, files: list[Path]) -> tuple[float, int]:
    """The model alone on pre-decoded tensors, at its best batch size.

    A short sweep picks the batch size; the rate is then measured afresh over as
    many images as `add` gets, so that the best of several noisy runs is not
    what `add` is compared with."""
    model = make_model(name, precision)
    from collection import images

    pixels = [model.prepare(images.decode(p, min_side=model.min_side).image) for p in files[:64]]

    def rate(batch_size: int, count: int) -> float:
        batch = [pixels[i % len(pixels)] for i in range(batch_size)]
        model.embed_batch(batch)  # warm up this shape
        done, start = 0, time.perf_counter()
        while done < count:
            model.embed_batch(batch)
            done += batch_size
        return done / (time.perf_counter() - start)

    sweep = {size: rate(size, 64) for size in (8, 16, 32, 64)}
    best = max(sweep, key=sweep.get)
    return rate(best, len(files)), best


def run_add(name: str, precision: str, files: list[Path], batch_size: int | None) -> tuple[float, dict, float]:
    """`collection add` end to end: decode + model + SQLite + matches, into a new database."""
    from collection.ingest import Ingester
    from collection.store import Store
    from collection.upkeep import Upkeep

    model = make_model(name, precision)
    model.embed_batch([np.zeros((model.input_size,) * 2 + (3,), np.uint8)] * (batch_size or model.batch_size))
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "bench.db")
        upkeep = Upkeep(store, refresh_map=False)  # as `collection add` does
        rss: list[float] = []

        def after_batch(ids):
            upkeep.after_batch(ids)
            rss.append(current_rss_mb())

        ingester = Ingester(store, model, batch_size=batch_size, on_batch=after_batch)
        start = time.perf_counter()
        summary = ingester.add([str(p) for p in files])
        upkeep.join()
        elapsed = time.perf_counter() - start
        assert summary.added == len(files), summary.line()
    shares = {k: v / elapsed for k, v in summary.seconds.items()}
    # Flat memory: resident size at the end against after the first quarter of the batches.
    growth = rss[-1] - rss[len(rss) // 4]
    return len(files) / elapsed, shares, growth


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args) -> None:
    files = sorted(Path(args.corpus).iterdir())
    result: dict = {}
    if args.run == "loop2017":
        result["rate"] = run_loop2017(args.model, args.precision, files)
    elif args.run == "ceiling":
        result["rate"], result["batch"] = run_ceiling(args.model, args.precision, files)
    else:
        result["rate"], result["shares"], result["rss_growth_mb"] = run_add(args.model, args.precision, files, args.batch_size)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def measure(run: str, name: str, precision: str, corpus: Path, batch_size: int | None) -> dict:
    """One configuration in a subprocess of its own, so that its peak RSS is its own."""
    command = [sys.executable, __file__, "--run", run, "--model", name, "--precision", precision, "--corpus", str(corpus)]
    if batch_size:
        command += ["--batch-size", str(batch_size)]
    out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        print(out.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{run} {name} {precision} failed")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    batch = f" (batch {r['batch']})" if "batch" in r else ""
    growth = f", RSS {r['rss_growth_mb']:+.0f} MB from the first quarter to the end" if "rss_growth_mb" in r else ""
    print(f"  {name:<18} {run:<9} {precision}: {r['rate']:6.2f} images/s{batch}, peak RSS {r['peak_rss_mb']:.0f} MB{growth}", flush=True)
    return r


def combine(runs: list[dict]) -> dict:
    """Median rate (and time shares) over rounds, highest peak RSS."""
    out = {"rate": float(np.median([r["rate"] for r in runs])), "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}
    if "batch" in runs[0]:
        out["batch"] = Counter(r["batch"] for r in runs).most_common(1)[0][0]
    if "rss_growth_mb" in runs[0]:
        out["rss_growth_mb"] = max(r["rss_growth_mb"] for r in runs)
    if "shares" in runs[0]:
        keys = {k for r in runs for k in r["shares"]}
        out["shares"] = {k: float(np.median([r["shares"].get(k, 0.0) for r in runs])) for k in keys}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200, help="files in the corpus")
    parser.add_argument("--models", default="inception_v3,efficientnet_lite0")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--batch-size", type=int, default=None, help="for add (default: the model's own)")
    parser.add_argument("--rounds", type=int, default=3, help="ceiling and add run alternately this many times; medians are shown")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        return child(args)

    corpus = build_corpus(args.count)
    megapixels = np.mean([np.prod(Image.open(p).size) for p in corpus.iterdir()]) / 1e6
    print(f"corpus: {args.count} files, mean {megapixels:.1f} MP, in {corpus}")
    print(f"machine: {os.cpu_count()} cores; command: {' '.join(sys.argv)}\n")
    precisions = args.precisions.split(",")
    configs = [(run, precision) for run, precision in CONFIGS if precision in precisions]
    rows = []
    for name in args.models.split(","):
        runs: dict[tuple[str, str], list[dict]] = {config: [] for config in configs}
        for round_ in range(args.rounds):
            for run, precision in configs:
                if run == "loop2017" and round_ > 0:
                    continue  # slow, and far enough from the rest that one run tells
                runs[(run, precision)].append(measure(run, name, precision, corpus, args.batch_size))
        rows.append((name, {config: combine(r) for config, r in runs.items()}))

    print(f"\nMedians of {args.rounds} rounds (the 2017 loop: one run). RSS growth: `add`'s resident")
    print("size at the end less after the first quarter of its batches (the largest over rounds).\n")
    print("| model | configuration | precision | images/s | peak RSS MB | RSS growth MB | 3/1 | 3/2 |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    labels = {"loop2017": "1. 2017 loop (batch 1, two passes)", "ceiling": "2. forward pass alone", "add": "3. collection add, end to end"}
    for name, results in rows:
        loop = results.get(("loop2017", "fp32"), {}).get("rate")
        for (run, precision), r in results.items():
            ratio1 = ratio2 = ""
            if run == "add":
                ceiling = results.get(("ceiling", precision), {}).get("rate")
                ratio1 = f"{r['rate'] / loop:.2f}" if loop else ""
                ratio2 = f"{r['rate'] / ceiling:.2f}" if ceiling else ""
            batch = f" (batch {r['batch']})" if "batch" in r else ""
            growth = f"{r['rss_growth_mb']:+.0f}" if "rss_growth_mb" in r else ""
            print(f"| {name} | {labels[run]}{batch} | {precision} | {r['rate']:.2f} | {r['peak_rss_mb']:.0f} | {growth} | {ratio1} | {ratio2} |")

    print("\nWhere `add` spends its wall-clock time (calling thread; decoding: waiting for images not yet decoded):\n")
    parts = ["model", "decoding", "writing", "after batch"]
    print("| model | precision | " + " | ".join(parts) + " | other |")
    print("| --- | --- | " + " | ".join("---:" for _ in parts) + " | ---: |")
    for name, results in rows:
        for (run, precision), r in results.items():
            if run != "add":
                continue
            shares = [r["shares"].get(part, 0.0) for part in parts]
            cells = " | ".join(f"{100 * x:.0f} %" for x in shares + [max(0.0, 1 - sum(shares))])
            print(f"| {name} | {precision} | {cells} |")


if __name__ == "__main__":
    main()
