"""`collection add` vs `collection backfill` (Ray Data, local) + `collection import`, on one machine.

    PYTHONPATH=. .venv/bin/python bench/backfill.py --count 500 [--photos FOLDER] [--repeat 3]

Builds a corpus of distinct files from real photos (by default ../shared/photos): each
copy a random crop, sometimes mirrored, re-encoded in its format. Then runs each
command in its own process on the same files, into fresh databases and shards
(``--repeat`` times, interleaved, keeping each command's median), and prints one table: wall seconds, images/s, peak resident size
of the whole process tree (Ray's raylet, workers and model actor included), and the
per-image figures the README's sizing table is computed from.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from machine import cpu_flags  # bench/machine.py, beside this script

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT.parent / "shared" / "photos"
CACHE = Path(tempfile.gettempdir()) / "collection-bench"


def build_corpus(count: int, seeds: Path) -> Path:
    folder = CACHE / f"backfill-{count}"
    if folder.is_dir() and len(list(folder.iterdir())) == count:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    photos = sorted(p for p in seeds.glob("*") if p.suffix.lower() in (".jpg", ".png"))
    if not photos:
        raise SystemExit(f"no .jpg or .png photos in {seeds}: pass --photos FOLDER")
    rng = random.Random(0)
    for i in range(count):
        source = photos[i % len(photos)]
        image = Image.open(source).convert("RGB")
        # a crop of 85-100 % of each side, sometimes mirrored: new pixels, new vector, same kind of photo
        w, h = image.size
        cw, ch = int(w * rng.uniform(0.85, 1)), int(h * rng.uniform(0.85, 1))
        left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
        image = image.crop((left, top, left + cw, top + ch))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image.save(folder / f"{i:05d}-{source.name}", **({"quality": 90} if source.suffix == ".jpg" else {}))
    return folder


def tree_rss_mb(root: int) -> float:
    """Resident size of ``root`` and every process below it, in MB."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, parent in parents.items() if parent == pid and p not in tree]
        tree.update(children)
        frontier.extend(children)
    total = 0
    for pid in tree:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    return total / 1e6


def timed(args: list[str]) -> tuple[float, float, str]:
    """Run the CLI; (wall seconds, peak tree RSS in MB, its stdout)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "collection", *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True
    )
    peak = 0.0
    while process.poll() is None:
        peak = max(peak, tree_rss_mb(process.pid))
        time.sleep(0.25)
    seconds = time.perf_counter() - started
    out = process.stdout.read()
    if process.returncode:
        raise SystemExit(f"collection {' '.join(args)} failed ({process.returncode}):\n{out}")
    return seconds, peak, out


def median_run(runs: list[tuple[float, float, str]]) -> tuple[float, float, str]:
    """The run with the median wall time (the lower middle one of an even count)."""
    return sorted(runs, key=lambda r: r[0])[(len(runs) - 1) // 2]


def decode_seconds_per_image(files: list[Path], model: str) -> float:
    """CPU seconds one core spends reading, hashing, decoding, fitting and thumbnailing a file:
    what bounds a GPU node, where the model is no longer the slow part."""
    sys.path.insert(0, str(ROOT))
    from collection import backfill
    from collection.sources import Source

    table = backfill.file_table((str(p), p.stat().st_size, p.stat().st_mtime) for p in files)
    spec = backfill.ModelSpec(model, None, "fp32")
    started = time.process_time()
    backfill.decode_batch(table, spec, Source.of(files[0].parent))
    return (time.process_time() - started) / len(files)


def model_seconds_per_image(files: list[Path], model_name: str) -> float:
    """CPU seconds (all threads) the model spends per image at its batch size: with the
    decoding cost, what a CPU node's throughput is computed from on a shared machine,
    where wall-clock rates depend on the neighbours."""
    sys.path.insert(0, str(ROOT))
    from collection import images
    from collection.models import get_model

    model = get_model(model_name).load()
    pixels = [model.prepare(images.decode(p, min_side=model.min_side).image) for p in files]
    model.embed_batch(pixels[: model.batch_size])  # warm-up: traces the graph
    started = time.process_time()
    for i in range(0, len(pixels), model.batch_size):
        model.embed_batch(pixels[i : i + model.batch_size])
    return (time.process_time() - started) / len(pixels)


def import_writes_per_second(shards_folder: Path, db: Path) -> float:
    """Rows/s of the import's writes alone (no index, matches or map upkeep), in-process."""
    sys.path.insert(0, str(ROOT))
    from collection import shards
    from collection.store import Store

    store = Store(db)
    started = time.perf_counter()
    rows = shards.import_shards(store, shards_folder).added
    return rows / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--photos", type=Path, default=SEEDS, help="Real photos to copy [default: %(default)s].")
    parser.add_argument("--repeat", type=int, default=1, help="Runs of the three commands; the median is shown.")
    args = parser.parse_args()
    corpus = build_corpus(args.count, args.photos)
    files = sorted(corpus.iterdir())
    work = Path(tempfile.mkdtemp(prefix="bench-backfill-"))
    try:
        runs = []
        for k in range(args.repeat):  # interleaved, so that a neighbour's burst hits all three alike
            run = work / f"run{k}"
            run.mkdir()
            runs.append((
                timed(["add", str(corpus), "--db", str(run / "add.db"), "--model", args.model]),
                timed(["backfill", str(corpus), "--out", str(run / "shards"), "--model", args.model]),
                timed(["import", str(run / "shards"), "--db", str(run / "import.db")]),
            ))
        add, backfill, imported = (median_run([r[i] for r in runs]) for i in range(3))
        shard_bytes = sum(p.stat().st_size for p in (run / "shards").iterdir())
        db_bytes = sum(p.stat().st_size for p in run.glob("import.db*") if p.is_file())
        writes = import_writes_per_second(run / "shards", work / "writes.db")
        decode = decode_seconds_per_image(files[:50], args.model)
        model = model_seconds_per_image(files[:64], args.model)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = args.count
    load = os.getloadavg()[0]
    print(f"{n} photos ({args.model}, fp32), {os.cpu_count()} cores, load average {load:.1f}; CPU flags: {cpu_flags()}")
    if args.repeat > 1:
        print(f"median of {args.repeat} interleaved runs; every run's seconds (add, backfill, import): "
              + "; ".join(f"{a[0]:.1f}, {b[0]:.1f}, {i[0]:.1f}" for a, b, i in runs))
    print()
    print(f"| {'run':<26} | {'seconds':>8} | {'images/s':>8} | {'peak RSS MB':>11} |")
    print(f"| {'-' * 26} | {'-' * 7}: | {'-' * 7}: | {'-' * 10}: |")
    rows = [
        ("collection add", add[0], add[1]),
        ("collection backfill (Ray)", backfill[0], backfill[1]),
        ("collection import", imported[0], imported[1]),
        ("backfill + import", backfill[0] + imported[0], max(backfill[1], imported[1])),
    ]
    for name, seconds, rss in rows:
        print(f"| {name:<26} | {seconds:>8.1f} | {n / seconds:>8.1f} | {rss:>11.0f} |")
    print()
    print(f"engine overhead (backfill + import vs add, wall, start-up included): {rows[3][1] / add[0] - 1:+.0%}")
    if args.repeat > 1:  # each run against the add it was interleaved with: what a neighbour's burst moves least
        each = sorted((b[0] + i[0]) / a[0] - 1 for a, b, i in runs)
        print(f"  per run: {', '.join(f'{o:+.0%}' for o in each)}; median {each[(len(each) - 1) // 2]:+.0%}")
    print(f"backfill's own summary: {backfill[2].strip()}")
    print(f"import: {n / imported[0]:.0f} rows/s for the whole command; {writes:.0f} rows/s for its writes alone")
    print(f"CPU time per image: {decode * 1000:.1f} ms to read, hash, decode, fit and thumbnail; "
          f"{model * 1000:.1f} ms in the model (all threads, batch of the model's size)")
    print(f"shards: {shard_bytes / n / 1024:.1f} KiB per image; database: {db_bytes / n / 1024:.1f} KiB per image")


if __name__ == "__main__":
    main()
