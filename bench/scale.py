"""What a large collection costs: adding, the watcher and Datasette at 0, 100k and 1M images.

    .venv/bin/python bench/scale.py --sizes 0,100000,1000000 --wide-sizes 0,100000 [--requests 50]

For each size, builds once (cached under /tmp/collection-bench/scale-<size>-<dims>/) a
synthetic collection shaped like a real one: clustered unit vectors, five labels each
(commonest labels far commoner than rare ones), a thumbnail each, the map (positions
near their cluster's spot, as t-SNE gives), ten matches each and the Annoy index, all
written with the same SQL and triggers as the write path. --sizes have 1280-d vectors
(EfficientNet-Lite0, real weights); --wide-sizes 2048-d (Inception v3, seeded random
weights: the same work per image as the real ones). Then, on one copy of it (removed
after; the cached collection stays as built):

1. `collection add` of 500 real photos (crops, flips, scales, re-encodes of
   /work/shared/photos, or the scikit-image samples), in a process of its own as a
   user runs it: images/s over the whole process, peak RSS, where `add` spent its
   time, and images/s as a ratio to the empty collection;
2. the watcher (`collection watch`): single photos dropped one at a time, seconds until
   each is searchable (its row committed and found by the searcher), p50/p95;
3. `collection serve` (on the collection after steps 1 and 2): p50/p95 over --requests
   keep-alive requests each of the images table page, the label facet (checked present
   with correct counts), a label filter (its page, with the label facet of the images it
   leaves, also checked), a similar page and its JSON, and the map page's first data and
   a zoomed-in box;
4. the index (`--skip index` to leave it out): a simulated backfill from 0 to the largest
   1280-d size through the product's segments (bench/similar.py's), with the build CPU
   seconds so far, recall@10 against exact search and query p50/p99 at each size.

At a million images a run takes about an hour (copying the 13 GB collection, the
backfill's builds); the first build of the 1M collection another 20 minutes.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import build_corpus  # noqa: E402  (bench/ingest.py: distinct real photos)
import similar  # noqa: E402  (bench/similar.py: the simulated backfill)
from serve import free_port, serve, thumbnails  # noqa: E402  (bench/serve.py: `collection serve`, synthetic thumbnails)
from machine import cpu_flags  # noqa: E402  (bench/machine.py, beside this script)

from collection import projection  # noqa: E402
from collection.index import build, open_index  # noqa: E402
from collection.store import Store, encode, now  # noqa: E402

CACHE = Path(tempfile.gettempdir()) / "collection-bench"
MODEL = "efficientnet_lite0"
# The model each vector width stands for: 2048-d is Inception v3's pool vector.
MODELS = {1280: MODEL, 2048: "inception_v3:random"}
CLUSTERS = 500
LABEL_POOL = 1000  # ImageNet's classes
CHUNK = 10_000  # rows per transaction while building
ADD_COUNT = 500
DROPS = 12
WARM_UP = 5


# --- the synthetic collection --------------------------------------------------------------


def build_collection(size: int, dimensions: int) -> Path:
    folder = CACHE / f"scale-{size}-{dimensions}"
    db_path = folder / "collection.db"
    if (folder / "done").exists():
        mark_grouped(db_path)  # a collection cached before it was marked
        return db_path
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    model = MODELS[dimensions]
    store = Store(db_path)
    store.claim_model(model, dimensions, "fp32")
    if size:
        rng = np.random.default_rng(0)
        centres = rng.normal(size=(CLUSTERS, dimensions)).astype(np.float32)
        spots = rng.uniform(0.05, 0.95, (CLUSTERS, 2))
        # Each cluster's labels: a few of the pool, Zipf-weighted over the pool as a whole.
        weights = 1 / np.arange(1, LABEL_POOL + 1)
        cluster_labels = [
            rng.choice(LABEL_POOL, 8, replace=False, p=weights / weights.sum()) for _ in range(CLUSTERS)
        ]
        names = [f"class {n:03d}" for n in range(LABEL_POOL)]
        jpegs = thumbnails(300, rng)
        members: dict[int, list[int]] = {}
        xy = np.empty((size, 2))
        stamp = now()
        for start in range(0, size, CHUNK):
            count = min(CHUNK, size - start)
            cluster = rng.integers(0, CLUSTERS, count)
            vectors = centres[cluster] + 1.2 * rng.normal(size=(count, dimensions)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            xy[start : start + count] = spots[cluster] + rng.normal(0, 0.01, (count, 2))
            with store.db.atomic():
                conn = store.db.conn
                for offset in range(count):
                    image_id = start + offset + 1
                    c = int(cluster[offset])
                    members.setdefault(c, []).append(image_id)
                    labels = [names[n] for n in rng.permutation(cluster_labels[c])[:5]]
                    conn.execute(
                        "insert into images (id, path, sha256, size, mtime, width, height, format, "
                        "taken_at, camera, added_at, updated_at, model, labels, top_label, top_score) "
                        "values (?, ?, ?, 2000000, 0, 4000, 3000, 'JPEG', ?, ?, ?, ?, ?, ?, ?, 0.5)",
                        [image_id, f"/synthetic/{image_id:07d}.jpg", f"{image_id:064x}",
                         f"{2005 + image_id % 20}-06-01T12:00:00", f"Camera {image_id % 7}",
                         stamp, stamp, model, json.dumps(labels), labels[0]],
                    )
                    conn.executemany(
                        "insert into labels (image_id, rank, wnid, label, score) values (?, ?, ?, ?, ?)",
                        [(image_id, rank, f"n{rank:08d}", label, 0.5 / rank)
                         for rank, label in enumerate(labels, start=1)],
                    )
                    conn.execute("insert into vectors (image_id, model, vector) values (?, ?, ?)",
                                 [image_id, model, encode(vectors[offset])])
                    conn.execute("insert into thumbnails (image_id, jpeg, width, height) values (?, ?, 4000, 3000)",
                                 [image_id, jpegs[image_id % len(jpegs)]])
            print(f"  {start + count:,} rows", file=sys.stderr, flush=True)
        write_map(store, np.clip(xy, 0, 1))
        write_matches(store, members, rng)
        mark_grouped(db_path)
        print("  building the Annoy index", file=sys.stderr, flush=True)
        build(db_path)
    store.db.execute("analyze")
    store.close()
    (folder / "done").write_text(f"built in {time.perf_counter() - started:.0f} s\n")
    return db_path


def write_map(store: Store, xy: np.ndarray) -> None:
    tiles = projection.spatial_order(xy)
    with store.db.atomic():
        store.db.conn.executemany(
            "insert into projection (image_id, method, x, y, placed, tile, sha256) "
            "values (?, 'tsne-sample', ?, ?, 0, ?, printf('%064x', ?))",
            ((i + 1, float(x), float(y), int(t), i + 1) for i, ((x, y), t) in enumerate(zip(xy, tiles))),
        )
        for key, value in {"version": 1, "method": "tsne-sample", "requested": "auto",
                           "perplexity": 30.0, "at": now(), "images": len(xy), "seconds": 0}.items():
            store.set_meta(f"projection_{key}", value)


def write_matches(store: Store, members: dict[int, list[int]], rng: np.random.Generator) -> None:
    """Ten neighbours from the image's own cluster with falling scores, and the change log
    marked done, as `update_matches` leaves them."""
    rows = []
    with store.db.atomic():
        for ids in members.values():
            for image_id in ids:
                others = rng.choice(ids, min(11, len(ids)), replace=False)
                others = [int(o) for o in others if o != image_id][:10]
                rows.extend((image_id, o, rank, 0.9 - 0.01 * rank) for rank, o in enumerate(others, 1))
                if len(rows) > 100_000:
                    store.db.conn.executemany("insert into matches values (?, ?, ?, ?)", rows)
                    rows = []
        store.db.conn.executemany("insert into matches values (?, ?, ?, ?)", rows)
        last = store.db.execute("select coalesce(max(seq), 0) from vector_changes").fetchone()[0]
        store.set_meta("matches_seq", last)


def mark_grouped(db_path: Path) -> None:
    """Record duplicate groups as current, as the upkeep leaves a collection it kept (the
    clustered vectors are far apart: no group). Unmarked, the first `add` would start
    grouping a million images from scratch in the background, as it does for a
    collection from before duplicate groups, and measure that instead."""
    from collection import duplicates

    store = Store(db_path)
    if store.get_meta("duplicates_seq") is None:
        with store.db.atomic():  # what duplicates' own upkeep records when it is done
            duplicates._finish(store, duplicates.thresholds(store.model), duplicates._last_change(store.db.conn))
    store.close()


def forget(file: Path) -> None:
    """Drop a file's pages from the page cache. The copied database's pages are dropped
    so that the cache holds one collection, as a user's machine does: at 1M, two 13 GB
    copies do not fit beside the index in 24 GB, and the copy measured would be read
    half from disk."""
    fd = os.open(file, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def flush(file: Path) -> None:
    """Write a file's dirty pages to disk now: otherwise the measured run's first SQLite
    checkpoint (which syncs the database file) waits for gigabytes of the copy."""
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def working_copy(db_path: Path) -> Path:
    """A copy to change, so the cached one stays as built. The index files beside it are
    hard links: they are never written in place, and a link keeps the inode, size and
    mtime by which the searcher knows its file (a copy would look like a stranger's)."""
    folder = CACHE / f"work-{db_path.parent.name}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for file in db_path.parent.iterdir():
        if file.name in ("collection.db", "collection.db-wal"):
            shutil.copy2(file, folder / file.name)
            forget(file)
            flush(folder / file.name)
        elif file.name.startswith("collection.db") and file.name != "collection.db-shm":
            if file.is_dir():  # an index kept as a folder of segment files
                shutil.copytree(file, folder / file.name, copy_function=os.link)
            else:
                os.link(file, folder / file.name)
    return folder / "collection.db"


# --- 1. collection add -----------------------------------------------------------------------


def child_add(db_path: str, corpus: str, model_name: str) -> None:
    """`collection add CORPUS` itself, in this process so that it can report where its
    time went (the summary's stage seconds) and its memory peaks."""
    from collection.cli import cli

    peaks = {"RssAnon": 0, "RssFile": 0}
    sampling = threading.Event()

    def sample() -> None:  # the peaks of anonymous and file-backed memory, every 0.1 s
        while not sampling.wait(0.1):
            for line in Path("/proc/self/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in peaks:
                    peaks[key] = max(peaks[key], int(value.split()[0]))

    threading.Thread(target=sample, daemon=True).start()
    summary = cli.main(["add", corpus, "--db", db_path, "--model", model_name], standalone_mode=False)
    sampling.set()
    print(json.dumps({"added": summary.added, "seconds": dict(summary.seconds),
                      "rss_mb": peak_rss_kb() / 1024,
                      "anon_mb": peaks["RssAnon"] / 1024, "file_mb": peaks["RssFile"] / 1024}))


def peak_rss_kb() -> int:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: a child forked from a large
    parent (this benchmark, after building the 1M collection) starts with the parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def run_add(db_path: Path, corpus: Path, model: str) -> dict:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child-add", str(db_path), str(corpus), model],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - started
    return result


# --- 2. the watcher ----------------------------------------------------------------------------


def run_watch(db_path: Path, corpus: Path, model: str) -> list[float]:
    inbox = db_path.parent / "inbox"
    inbox.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "collection", "watch", str(inbox), "--db", str(db_path), "--model", model],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    latencies = []
    try:
        photos = sorted(corpus.iterdir())[:DROPS + 1]
        for n, photo in enumerate(photos):
            staged = db_path.parent / f"staged{photo.suffix}"
            shutil.copy(photo, staged)
            target = inbox / f"drop{n}{photo.suffix}"
            started = time.perf_counter()
            os.replace(staged, target)  # arrives whole, as a finished download does
            searchable(db_path, str(target), timeout=300 if n == 0 else 60)
            if n:  # the first waits for the model to load
                latencies.append(time.perf_counter() - started)
    finally:
        process.terminate()
        process.wait(timeout=60)
    return latencies


def searchable(db_path: Path, path: str, timeout: float) -> None:
    import sqlite3

    deadline = time.monotonic() + timeout
    conn = sqlite3.connect(db_path, timeout=30)
    try:
        while time.monotonic() < deadline:
            row = conn.execute("select id from images where path = ?", [path]).fetchone()
            if row:
                try:
                    open_index(db_path).similar(row[0], 1)
                    return
                except KeyError:
                    pass
            time.sleep(0.02)
    finally:
        conn.close()
    raise SystemExit(f"{path} not searchable after {timeout} s")


# --- 3. Datasette ------------------------------------------------------------------------------


def check_facet(db_path: Path, page: str, port: int, label: str | None = None) -> None:
    """The label facet of ``page`` (JSON) is there, and each count it shows is the number of
    images carrying the value (and ``label``, if given), counted from the labels table."""
    import sqlite3

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("GET", page)
    data = json.loads(conn.getresponse().read())
    conn.close()
    assert "labels" not in data.get("facets_timed_out", []), f"{page}: the label facet timed out"
    results = data["facet_results"]["labels"]["results"]
    assert results, f"{page}: no label facet"
    with sqlite3.connect(db_path) as db:
        for row in results:
            sql = "select count(distinct image_id) from labels where label = ?"
            params = [row["value"]]
            if label is not None:
                sql += " and image_id in (select image_id from labels where label = ?)"
                params.append(label)
            assert row["count"] == db.execute(sql, params).fetchone()[0], (page, row)


def run_serve(db_path: Path, requests: int) -> list[tuple[str, list[float]]]:
    import sqlite3

    with sqlite3.connect(db_path) as conn:
        largest = conn.execute("select coalesce(max(id), 0) from images").fetchone()[0]
        picked = np.random.default_rng(0).integers(1, largest + 1, 4 * requests).tolist() if largest else []
        ids = [row[0] for row in conn.execute(  # live images at random, without sorting a million
            f"select id from images where deleted_at is null and id in ({','.join('?' * len(picked))})", picked
        )][:requests] if picked else []
        label = conn.execute("select label from label_counts order by images desc limit 1 offset 20").fetchone()
    port = free_port()
    process = serve(db_path, port)
    label_page = f"/collection/images?_label={label[0].replace(' ', '+')}" if label else "/collection/images"
    check_facet(db_path, "/collection/images.json?_size=1", port)
    if label:
        check_facet(db_path, label_page.replace("images?", "images.json?_size=1&"), port, label[0])
    cases = [
        ("images table page", lambda i: "/collection/images"),
        ("label facet (JSON)", lambda i: "/collection/images.json?_size=1"),
        (f"label filter ({label[0] if label else '-'})", lambda i: label_page),
        ("similar page", lambda i: f"/-/similar/{ids[i % len(ids)]}"),
        ("similar JSON", lambda i: f"/-/similar/{ids[i % len(ids)]}.json"),
        ("map first data", lambda i: "/-/map.json"),
        # zoomed in: a box around one cluster's spot, as the page asks when it zooms
        ("map data, zoomed box", lambda i: f"/-/map.json?box={0.3 + 0.004 * (i % 50):.3f},0.3,{0.5 + 0.004 * (i % 50):.3f},0.5"),
    ]
    results = []
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        for name, path in cases:
            if not ids and "similar" in name:
                continue
            times, failed = [], 0
            for i in range(WARM_UP + requests):
                started = time.perf_counter()
                conn.request("GET", path(i))
                response = conn.getresponse()
                response.read()
                elapsed = time.perf_counter() - started
                if response.status != 200:  # e.g. a query past Datasette's time limit
                    failed += 1
                    print(f"  {path(i)}: HTTP {response.status}", file=sys.stderr, flush=True)
                if i >= WARM_UP:
                    times.append(elapsed)
            results.append((name + (f" ({failed} failed)" if failed else ""), times))
        conn.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
    return results


# --- the table -------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def parse_sizes(text: str) -> list[int]:
    return [similar.parse_size(t) for t in text.split(",") if t.strip()]


def run_index(sizes: list[int], queries: int) -> list[dict]:
    """Part 4: bench/similar.py's simulated backfill, 0 to the largest size, measured at each."""
    largest = max(sizes)
    stages = sorted({s for s in sizes if s} | {s for s in (10_000, 200_000, 500_000) if s < largest})
    for cached in CACHE.glob("scale-*/collection.db*"):  # the earlier parts' collections and indexes
        for file in cached.rglob("*") if cached.is_dir() else [cached]:
            forget(file)  # the page cache then holds the backfill alone (17 GB at 1M), as a user's does
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="index-backfill-") as tmp:
        x = similar.vectors(largest, Path(tmp) / "vectors.npy", d=1280, growing=True)
        return similar.backfill(x, stages, 1000, similar.N_TREES, queries, Path(tmp))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0,100k,1m", help="1280-d collection sizes, comma-separated (100k, 1m)")
    parser.add_argument("--wide-sizes", default="0,100k", help="2048-d collection sizes; '' for none")
    parser.add_argument("--requests", type=int, default=50, help="timed requests per page")
    parser.add_argument("--queries", type=int, default=200, help="similar-image queries per backfill stage")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: add, watch, serve, index")
    parser.add_argument("--child-add", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_add:
        child_add(*args.child_add)
        return
    skip = set(filter(None, args.skip.split(",")))
    runs = [(size, 1280) for size in parse_sizes(args.sizes)] + [(size, 2048) for size in parse_sizes(args.wide_sizes)]
    print(f"load average at the start {os.getloadavg()[0]:.1f}; command: {' '.join(sys.argv)}", flush=True)
    corpus = build_corpus(ADD_COUNT, seed=13)
    drops = build_corpus(DROPS + 1, seed=14)
    rows_add, rows_watch, rows_serve = [], [], []
    empty_rate: dict[int, float] = {}
    for size, dims in runs:
        model = MODELS[dims]
        started = time.perf_counter()
        cached = build_collection(size, dims)
        print(f"{size:,} images, {dims}-d: collection ready in {time.perf_counter() - started:.0f} s "
              f"({(cached.parent / 'done').read_text().strip()})", file=sys.stderr, flush=True)
        if skip >= {"add", "watch"}:
            served = cached  # nothing changes it
        else:
            started = time.perf_counter()
            served = working_copy(cached)
            print(f"  copied in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        where = f"{size:,} | {dims}"
        if "add" not in skip:
            result = run_add(served, corpus, model)
            rate = result["added"] / result["wall"]
            if size == 0:
                empty_rate[dims] = rate
            stages = ", ".join(f"{k} {v:.1f}" for k, v in sorted(result["seconds"].items(), key=lambda kv: -kv[1]))
            ratio = f"{rate / empty_rate[dims]:.2f}" if dims in empty_rate else "-"
            rows_add.append(f"| {where} | {result['added']} | {result['wall']:.1f} | {rate:.1f} | {ratio} | "
                            f"{result['rss_mb']:.0f} | {result['anon_mb']:.0f} | {result['file_mb']:.0f} | {stages} |")
            print(rows_add[-1], file=sys.stderr, flush=True)
        if "watch" not in skip:
            latencies = run_watch(served, drops, model)
            rows_watch.append(f"| {where} | {len(latencies)} | {pct(latencies, 0.5):.2f} | {pct(latencies, 0.95):.2f} |")
            print(rows_watch[-1], file=sys.stderr, flush=True)
        if "serve" not in skip and dims == 1280:  # the pages do not depend on the width
            for name, times in run_serve(served, args.requests):
                rows_serve.append(f"| {size:,} | {name} | {len(times)} | {pct(times, 0.5) * 1000:.0f} | "
                                  f"{pct(times, 0.95) * 1000:.0f} |")
                print(rows_serve[-1], file=sys.stderr, flush=True)
        if served != cached:
            shutil.rmtree(served.parent)
    rows_index = run_index([size for size, dims in runs if dims == 1280], args.queries) if "index" not in skip else []
    print(f"\nCPU: {os.cpu_count()} cores, flags: {cpu_flags()}; load average at the end "
          f"{os.getloadavg()[0]:.1f}; models: {', '.join(f'{d}-d {m}' for d, m in MODELS.items())}\n")
    if rows_add:
        print(f"`collection add` of {ADD_COUNT} photos (whole process; RSS: peak, and the peaks of its "
              "anonymous memory and of its file-backed pages: libraries, SQLite's and the index's memory maps)\n")
        print("| images before | dims | added | seconds | images/s | ratio to empty | peak RSS MB | anon MB | "
              "file-backed MB | seconds by stage |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        print("\n".join(rows_add) + "\n")
    if rows_watch:
        print("watcher: single photo dropped to searchable\n")
        print("| images | dims | drops | p50 s | p95 s |\n| ---: | ---: | ---: | ---: | ---: |")
        print("\n".join(rows_watch) + "\n")
    if rows_serve:
        print("`collection serve`, sequential keep-alive requests\n")
        print("| images | request | n | p50 ms | p95 ms |\n| ---: | --- | ---: | ---: | ---: |")
        print("\n".join(rows_serve) + "\n")
    if rows_index:
        print(f"similar-image index over a simulated backfill (1280-d, batches of 1,000, each due build run to its "
              f"end before the next batch; {args.queries} queries per stage against exact search)\n")
        print("| images | segments (k items) | tail | builds | build CPU s so far | recall@10 | p50 ms | p99 ms | "
              "CPU p50 ms | CPU p99 ms | most vectors read per batch |")
        print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in rows_index:
            print(f"| {r['size']:,} | {r['segments']} ({r['sizes']}) | {r['tail']} | {r['builds']} | {r['build']:.0f} | "
                  f"{r['recall']:.3f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['cpu50']:.2f} | {r['cpu99']:.2f} | {r['read']} |")


if __name__ == "__main__":
    main()
