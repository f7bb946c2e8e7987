"""Abuse under load: hostile files and a burst of real photos into a running watcher,
while 8 clients read the collection through Datasette.

    .venv/bin/python bench/abuse.py --photos /work/shared/photos --hostile 1000 --burst 300

Starts `collection watch` (through tests/hostile.py, which records every file the
daemon opens outside the folder with an audit hook) on a folder seeded with the
photos, then `collection serve` on a free loopback port. Then, together: 8 reader
threads loop over /-/similar/<id>.json, /-/thumbnail/<id>.jpg and /-/image/<id> for
random stored ids (bounded: until the burst is stored, at most --requests each),
while the seeded hostile corpus (tests/hostile.py) and --burst copies of the photos
(each given a few trailing bytes, so each is new content for the model) are dropped
into the folder. Prints one table: inputs tried, daemon deaths, rows lost or
duplicated, files read outside the folder, peak RSS, non-200 answers, and the p50 /
p99 latency of the similar JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import free_port, responds  # noqa: E402
from hostile import SYSTEM_TARGETS, make_corpus  # noqa: E402
from machine import cpu_flags  # noqa: E402  (bench/machine.py, beside this script)


def query(db: Path, sql: str, params=()) -> list[tuple]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


def finish(process: subprocess.Popen, timeout: float) -> tuple[int | None, int]:
    """SIGTERM and wait: exit code (None: had to be killed) and peak resident bytes."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return process.returncode, usage.ru_maxrss * 1024
        time.sleep(0.1)
    process.kill()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = -9
    return None, usage.ru_maxrss * 1024


class Readers:
    """``n`` threads reading the collection over HTTP, until stopped or ``limit`` requests each."""

    def __init__(self, port: int, db: Path, n: int, limit: int):
        self.base = f"http://127.0.0.1:{port}"
        self.db, self.limit = db, limit
        self.phase = "before"  # similar-JSON latencies are kept by phase: before / during the burst
        self.latencies: dict[str, list[float]] = {"before": [], "during": []}
        self.answers = 0
        self.non_200: dict[str, int] = {}
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]
        self.lock = threading.Lock()

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        ids: list[int] = []
        for i in range(self.limit):
            if self.stop.is_set():
                return
            if i % 50 == 0:  # what is stored now (rows are only ever added here)
                ids = [r[0] for r in query(self.db, "select id from images where deleted_at is null")]
            image_id = rng.choice(ids)
            kind = ("similar", "thumbnail", "image")[i % 3]
            url = {
                "similar": f"/-/similar/{image_id}.json",
                "thumbnail": f"/-/thumbnail/{image_id}.jpg",
                "image": f"/-/image/{image_id}",
            }[kind]
            started = time.perf_counter()
            try:
                with urllib.request.urlopen(self.base + url, timeout=30) as response:
                    response.read()
                    status = response.status
            except urllib.error.HTTPError as e:
                status = e.code
            except OSError as e:
                status = type(e).__name__
            seconds = time.perf_counter() - started
            with self.lock:
                self.answers += 1
                if status != 200:
                    key = f"{kind} {status}"
                    self.non_200[key] = self.non_200.get(key, 0) + 1
                elif kind == "similar":
                    self.latencies[self.phase].append(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", default="/work/shared/photos", help="a folder of real photos")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--hostile", type=int, default=1000, help="files in the hostile corpus")
    parser.add_argument("--burst", type=int, default=300, help="photo copies dropped during the run")
    parser.add_argument("--readers", type=int, default=8)
    parser.add_argument("--requests", type=int, default=5000, help="at most this many per reader")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--quiet-seconds", type=float, default=15, help="readers alone first, for comparison")
    args = parser.parse_args()
    photos = sorted(p for p in Path(args.photos).iterdir() if p.suffix.lower() in (".jpg", ".png"))
    rng = np.random.default_rng(args.seed)

    with tempfile.TemporaryDirectory(prefix="abuse-") as tmp:
        tmp = Path(tmp)
        inbox, outside, db, audit = tmp / "inbox", tmp / "outside", tmp / "c.db", tmp / "audit.json"
        inbox.mkdir()
        for photo in photos:
            shutil.copy(photo, inbox / photo.name)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "AUDIT_OUT": str(audit),
               "FORBIDDEN": os.pathsep.join([str(outside), *SYSTEM_TARGETS])}
        log = open(tmp / "daemon.log", "w")
        daemon = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "hostile.py"), "watch", str(inbox), "--db", str(db),
             "--model", args.model], env=env, stdout=log, stderr=log, cwd=ROOT)
        port = free_port()
        server = None
        try:
            wait(lambda: db.exists() and _count(db, "select count(*) from ingest_log"), 300, "the first scan")
            server = subprocess.Popen(
                [sys.executable, "-m", "collection", "serve", "--db", str(db), "--port", str(port),
                 "--no-access-log"], env=env, stdout=log, stderr=log, cwd=ROOT)
            wait(lambda: responds(f"http://127.0.0.1:{port}/"), 120, "Datasette")
            readers = Readers(port, db, args.readers, args.requests)
            readers.start()
            time.sleep(args.quiet_seconds)
            readers.phase = "during"

            started = time.perf_counter()
            corpus = make_corpus(inbox / "hostile", outside, args.hostile, seed=args.seed)
            burst = []
            for i in range(args.burst):  # same pictures, new bytes: each one runs the model
                photo = photos[i % len(photos)]
                path = inbox / "burst" / f"{i:04}_{photo.name}"
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(photo.read_bytes() + rng.bytes(16))
                burst.append(str(path))
            stored = lambda: _count(db, "select count(*) from images where path like ?", [f"{inbox}/burst/%"])  # noqa: E731
            deadline = time.monotonic() + 900
            while stored() < len(burst) and daemon.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
            seconds = time.perf_counter() - started
            # The hostile files still settling (a file truncated after its close waits a
            # minute for a close that never comes): until their count holds for 10 s.
            hostile = f"{inbox}/hostile/%"
            done = lambda: _count(db, "select (select count(*) from images where path like ?) + "  # noqa: E731
                                  "(select count(*) from failures where path like ?)", [hostile, hostile])
            last, still_since = -1, time.monotonic()
            while time.monotonic() - still_since < 10 and time.monotonic() < deadline + 120:
                if done() != last:
                    last, still_since = done(), time.monotonic()
                time.sleep(1)
            readers.join()
            deaths = int(daemon.poll() is not None) + int(server.poll() is not None)
        finally:
            code, daemon_peak = finish(daemon, 120)
            server_peak = finish(server, 30)[1] if server is not None else 0
            log.close()
        rows = query(db, "select path from images where path like ?", [f"{inbox}/burst/%"])
        paths = [r[0] for r in rows]
        lost = len(set(burst) - set(paths))
        duplicated = len(paths) - len(set(paths))
        outside_reads = len(json.loads(audit.read_text())) if audit.exists() else "no audit"
        failures = _count(db, "select count(*) from failures")
        accounted = last
        if code != 0:
            deaths += 1
            print((tmp / "daemon.log").read_text()[-3000:], file=sys.stderr)

    def percentiles(phase: str) -> str:
        ms = np.array(readers.latencies[phase]) * 1000
        return f"{np.percentile(ms, 50):.1f} / {np.percentile(ms, 99):.1f} ms" if len(ms) else "no answers"

    print(f"\nmachine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, CPU flags: {cpu_flags()}")
    print(f"command: {' '.join(sys.argv)}")
    print(f"model {args.model}; {len(photos)} photos seeded; burst of {len(burst)} stored in {seconds:.0f} s; "
          f"{args.readers} readers, {readers.answers} answers\n")
    table = [
        ("inputs tried", f"{len(corpus.files) + len(burst) + len(photos):,} "
         f"({len(corpus.files)} hostile, {len(burst)} burst, {len(photos)} seeded)", ""),
        ("hostile files stored or failed", f"{accounted} (the rest: dangling links, folders)", ""),
        ("failures recorded", f"{failures}", ""),
        ("daemon deaths", f"{deaths}", "0"),
        ("rows lost / duplicated", f"{lost} / {duplicated}", "0 / 0"),
        ("files read outside the folder", f"{outside_reads}", "0"),
        ("peak RSS, watcher", f"{daemon_peak / 1e9:.2f} GB", "< 1.5 GB"),
        ("peak RSS, Datasette", f"{server_peak / 1e9:.2f} GB", ""),
        ("non-200 answers", f"{sum(readers.non_200.values())} {readers.non_200 or ''}".strip(), "0"),
        ("similar JSON p50 / p99, burst", percentiles("during"), "p99 < 100 ms"),
        (f"  the same, first {args.quiet_seconds:g} s, no burst", percentiles("before"), ""),
    ]
    print(f"| {'measure':<30} | {'result':<40} | {'target':<12} |")
    print(f"|{'-' * 32}|{'-' * 42}|{'-' * 14}|")
    for name, result, target in table:
        print(f"| {name:<30} | {result:<40} | {target:<12} |")


def _count(db: Path, sql: str, params=()) -> int:
    try:
        return query(db, sql, params)[0][0]
    except sqlite3.Error:
        return 0


if __name__ == "__main__":
    main()
