"""The watcher: drop-to-stored latency of single files, and the throughput of a burst.

    .venv/bin/python bench/watch.py --model efficientnet_lite0 --singles 20 --burst 500

Copies files of the benchmark corpus (bench/ingest.py's, made from real photos,
640x480 up to 4000x3000) into a watched temporary folder: first one at a time,
then all of the burst at once; each file is timed from the start of its copy to
its committed row, and the burst's throughput from its first copy to its last row. The model is the one named
(efficientnet_lite0's real weights by default, random ones if those do not load).
Prints one table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import build_corpus  # noqa: E402  (the same corpus as the ingest benchmark)

from collection.models import Counting, ModelError, get_model  # noqa: E402
from collection.store import Store  # noqa: E402
from collection.watcher import Watcher  # noqa: E402

POLL = 0.005  # seconds between looks at the database


def load_model(name: str):
    """The named model; efficientnet_lite0 falls back to random weights if its own do not load."""
    try:
        return get_model(name).load(), "ImageNet weights" if ":" not in name else "random weights"
    except ModelError as e:
        if ":" in name:
            raise
        print(f"{name}: {e}\nUsing random weights (same speed).", file=sys.stderr)
        return get_model(f"{name}:random").load(), "random weights"


def wait_for(predicate, timeout: float) -> float:
    deadline = time.perf_counter() + timeout
    while not predicate():
        if time.perf_counter() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f}s")
        time.sleep(POLL)
    return time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--singles", type=int, default=20, help="files dropped one at a time")
    parser.add_argument("--burst", type=int, default=500, help="files dropped at once")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--poll", action="store_true", help="use the polling observer")
    args = parser.parse_args()

    corpus = sorted(build_corpus(args.singles + args.burst + 1).iterdir())
    warm, singles, burst = corpus[0], corpus[1 : args.singles + 1], corpus[args.singles + 1 :]
    model, weights = load_model(args.model)
    model = Counting(model)
    with tempfile.TemporaryDirectory() as tmp:
        inbox, db_path = Path(tmp) / "inbox", Path(tmp) / "collection.db"
        inbox.mkdir()
        store = Store(db_path)
        stored = lambda path: store.db.execute(  # noqa: E731
            "select 1 from images where path = ?", [str(path)]
        ).fetchone()
        with Watcher(inbox, db_path, model, poll=args.poll, batch_size=args.batch_size) as watcher:
            watcher.ready.wait()
            shutil.copyfile(warm, inbox / warm.name)  # traces the model outside the timing
            wait_for(lambda: stored(inbox / warm.name), 300)

            latencies, calls = [], len(model.calls)
            for source in singles:
                started = time.perf_counter()
                target = inbox / source.name
                shutil.copyfile(source, target)
                latencies.append(wait_for(partial(stored, target), 120) - started)
            single_calls = model.calls[calls:]

            calls, dropped, seen = len(model.calls), {}, {}
            for source in burst:
                dropped[str(inbox / source.name)] = time.perf_counter()
                shutil.copyfile(source, inbox / source.name)
            deadline = time.perf_counter() + 3600
            while len(seen) < len(burst) and time.perf_counter() < deadline:
                clock = time.perf_counter()
                for (path,) in store.db.execute("select path from images"):
                    if path in dropped:
                        seen.setdefault(path, clock)
                time.sleep(POLL)
            burst_calls = model.calls[calls:]
        store.close()

    def calls_cell(sizes: list[int]) -> str:
        return f"{len(sizes)} (mean {np.mean(sizes):.1f})" if sizes else "0"

    def row(case: str, latencies: list[float], seconds: float | None, sizes: list[int]) -> tuple:
        p50, p95 = np.percentile(latencies, [50, 95])
        rate = f"{len(latencies) / seconds:.1f}" if seconds else ""
        return (
            case,
            len(latencies),
            f"{p50:.2f}",
            f"{p95:.2f}",
            f"{max(latencies):.2f}",
            rate,
            calls_cell(sizes),
        )

    burst_seconds = max(seen.values()) - min(dropped.values())
    rows = [
        row("single files, one at a time", latencies, None, single_calls),
        row("burst, dropped at once", [seen[p] - dropped[p] for p in seen], burst_seconds, burst_calls),
    ]
    print(
        f"\nmodel {model.model_id} ({weights}), observer {watcher.stats.observer}, batch size "
        f"{args.batch_size or model.batch_size}, {os.cpu_count()} CPU cores, corpus 640x480..4000x3000\n"
    )
    header = (
        "case",
        "files",
        "p50 drop-to-stored s",
        "p95 s",
        "max s",
        "images/s",
        "model calls (mean batch)",
    )
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for cells in rows:
        print(line(cells))


if __name__ == "__main__":
    main()
