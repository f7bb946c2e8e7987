"""Start-up: what a command that runs the model costs before and around its one image.

    .venv/bin/python bench/startup.py --runs 5

Runs, each in a process of its own as a user would: `collection add ONE_PHOTO` into a
new collection (the first time with an empty OpenVINO cache, so it converts; then
with the conversion cached), and `collection similar ONE_PHOTO` with no daemon
running (the model loads in that process) for a flipped copy of the photo. Prints wall seconds, CPU seconds and peak
RSS (medians of the runs after the first) and whether TensorFlow was imported (read
from the process's memory map). The photo is the first of COLLECTION_PHOTOS (or
../shared/photos), else a made-up one.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_flags  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COLLECTION = Path(sys.executable).parent / "collection"


def photo(folder: Path) -> Path:
    source = Path(os.environ.get("COLLECTION_PHOTOS") or ROOT.parent / "shared" / "photos")
    found = sorted(p for p in source.glob("*") if p.suffix.lower() in (".jpg", ".jpeg")) if source.is_dir() else []
    target = folder / "photo.jpg"
    if found:
        target.write_bytes(found[0].read_bytes())
    else:
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (1200, 1600, 3), np.uint8)).save(target, quality=90)
    return target


def run(command: list[str], env: dict) -> dict:
    """One process: wall and CPU seconds, peak RSS, and whether it mapped TensorFlow."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    mapped = {"tensorflow": False}

    def watch() -> None:  # TensorFlow's shared library in the process's maps, while it runs
        while process.poll() is None:
            try:
                if "_pywrap_tensorflow_internal" in Path(f"/proc/{process.pid}/maps").read_text():
                    mapped["tensorflow"] = True
                    return
            except OSError:
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, err = process.communicate()
    wall = time.perf_counter() - start
    watcher.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {err.decode()[-2000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "tensorflow": mapped["tensorflow"]}


def peak_rss_mb(command: list[str], env: dict) -> float:
    """The command's own peak RSS, through a Python wrapper that waits for it alone."""
    wrapper = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, "
        "stderr=subprocess.DEVNULL, check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *command], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="runs of each command with the conversion cached")
    parser.add_argument("--model", default="efficientnet_lite0")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        image = photo(tmp)
        env = {**os.environ, "COLLECTION_CACHE": str(tmp / "cache")}
        rows = []

        def add(i: int) -> list[str]:
            return [str(COLLECTION), "add", str(image), "--db", str(tmp / f"add{i}.db"), "--model", args.model]

        first = run(add(0), env)
        rows.append(("collection add, empty OpenVINO cache (converts)", 1, first["wall"], first["cpu"],
                     None, first["tensorflow"]))
        cached = [run(add(i), env) for i in range(1, args.runs + 1)]
        rss = peak_rss_mb(add(args.runs + 1), env)
        rows.append(("collection add, conversion cached", len(cached), statistics.median(r["wall"] for r in cached),
                     statistics.median(r["cpu"] for r in cached), rss, any(r["tensorflow"] for r in cached)))
        query = tmp / "query.jpg"  # not in the collection: the model embeds it
        Image.open(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(query, quality=85)
        similar = [str(COLLECTION), "similar", str(query), "--db", str(tmp / "add1.db"), "-k", "3"]
        found = [run(similar, env) for _ in range(args.runs)]
        rows.append(("collection similar FILE, no daemon", len(found), statistics.median(r["wall"] for r in found),
                     statistics.median(r["cpu"] for r in found), peak_rss_mb(similar, env),
                     any(r["tensorflow"] for r in found)))
    print(f"machine: {os.cpu_count()} cores; CPU flags: {cpu_flags()}")
    print(f"model: {args.model}; command: bench/startup.py {' '.join(sys.argv[1:])}\n")
    print("| command | runs | wall s (median) | CPU s (median) | peak RSS MB | TensorFlow imported |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, n, wall, cpu, rss, tensorflow in rows:
        rss_text = f"{rss:.0f}" if rss is not None else ""
        print(f"| {name} | {n} | {wall:.2f} | {cpu:.2f} | {rss_text} | {'yes' if tensorflow else 'no'} |")


if __name__ == "__main__":
    main()
