"""`collection add` vs `collection backfill` (Ray Data, local) + `collection import`, on one machine.

    PYTHONPATH=. .venv/bin/python bench/backfill.py --count 500 [--photos FOLDER]

Builds a corpus of distinct files from real photos (by default ../shared/photos): each
copy a random crop, sometimes mirrored, re-encoded in its format. Then runs each command in its own process on the same files, into fresh
databases and shards, and prints one table: wall seconds, images/s, peak resident size
of the whole process tree (Ray's raylet, workers and model actor included), and the
per-image figures the README's sizing table is computed from.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

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


def decode_seconds_per_image(files: list[Path], model: str) -> float:
    """CPU seconds one core spends reading, hashing, decoding, fitting and thumbnailing a file:
    what bounds a GPU node, where the model is no longer the slow part."""
    sys.path.insert(0, str(ROOT))
    from collection import backfill

    table = backfill.file_table((str(p), p.stat().st_size, p.stat().st_mtime) for p in files)
    spec = backfill.ModelSpec(model, None, "fp32")
    started = time.process_time()
    backfill.decode_batch(table, spec)
    return (time.process_time() - started) / len(files)


def cpu_flags() -> str:
    flags = set(re.findall(r"\b(avx512[a-z_0-9]*|avx2|amx[a-z_]*)\b", Path("/proc/cpuinfo").read_text()))
    return " ".join(sorted(flags)) or "(none of avx2/avx512/amx)"


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
    parser.add_argument("--small", type=int, default=100, help="A second, smaller run: the difference is the marginal rate.")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--photos", type=Path, default=SEEDS, help="Real photos to copy [default: %(default)s].")
    args = parser.parse_args()
    corpus = build_corpus(args.count, args.photos)
    files = sorted(corpus.iterdir())
    small = CACHE / f"backfill-{args.count}-first-{args.small}"
    if not small.is_dir():
        small.mkdir(parents=True)
        for f in files[: args.small]:
            shutil.copy2(f, small / f.name)
    runs: dict[str, dict[int, tuple[float, float, str]]] = {"add": {}, "backfill": {}, "import": {}}
    work = Path(tempfile.mkdtemp(prefix="bench-backfill-"))
    try:
        for n, folder in ((args.small, small), (args.count, corpus)):
            here = work / str(n)
            here.mkdir()
            runs["add"][n] = timed(["add", str(folder), "--db", str(here / "add.db"), "--model", args.model])
            runs["backfill"][n] = timed(["backfill", str(folder), "--out", str(here / "shards"), "--model", args.model])
            runs["import"][n] = timed(["import", str(here / "shards"), "--db", str(here / "import.db")])
        here = work / str(args.count)
        shard_bytes = sum(p.stat().st_size for p in (here / "shards").iterdir())
        db_bytes = sum(p.stat().st_size for p in here.glob("import.db*"))
        writes = import_writes_per_second(here / "shards", work / "writes.db")
        decode = decode_seconds_per_image(files[:50], args.model)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n, m = args.count, args.small
    print(f"{n} photos ({args.model}, fp32), {os.cpu_count()} cores; CPU flags: {cpu_flags()}")
    print()
    print(f"| {'run':<26} | {f'{m} s':>7} | {f'{n} s':>7} | {f'{n} images/s':>14} | {'marginal images/s':>17} | {'peak RSS MB':>11} |")
    print(f"| {'-' * 26} | {'-' * 6}: | {'-' * 6}: | {'-' * 13}: | {'-' * 16}: | {'-' * 10}: |")
    both = {k: (runs["backfill"][k][0] + runs["import"][k][0], max(runs["backfill"][k][1], runs["import"][k][1])) for k in (m, n)}
    table = [
        ("collection add", {k: runs["add"][k][:2] for k in (m, n)}),
        ("collection backfill (Ray)", {k: runs["backfill"][k][:2] for k in (m, n)}),
        ("collection import", {k: runs["import"][k][:2] for k in (m, n)}),
        ("backfill + import", both),
    ]
    marginal = {}
    for name, timing in table:
        marginal[name] = (n - m) / (timing[n][0] - timing[m][0])
        print(
            f"| {name:<26} | {timing[m][0]:>7.1f} | {timing[n][0]:>7.1f} | {n / timing[n][0]:>14.1f} "
            f"| {marginal[name]:>17.1f} | {timing[n][1]:>11.0f} |"
        )
    print()
    add, total = table[0][1][n][0], both[n][0]
    print(f"engine overhead at {n} (backfill + import vs add, wall): {total / add - 1:+.0%}; "
          f"marginal (per image, start-up excluded): {marginal['collection add'] / marginal['backfill + import'] - 1:+.0%}")
    print(f"import writes alone: {writes:.0f} rows/s; the whole import command at {n}: {n / runs['import'][n][0]:.0f} rows/s")
    print(f"backfill summary at {n}: {runs['backfill'][n][2].strip()}")
    print(f"decode, hash, fit, thumbnail: {decode * 1000:.1f} ms of one core per image")
    print(f"shards: {shard_bytes / n / 1024:.1f} KiB per image; database: {db_bytes / n / 1024:.1f} KiB per image")


if __name__ == "__main__":
    main()
