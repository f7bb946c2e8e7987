"""What a large collection costs: adding, the watcher and Datasette at 0, 100k and 1M images.

    .venv/bin/python bench/scale.py --sizes 0,100000 [--dimensions 1280] [--requests 50]

For each size, builds once (cached under /tmp/collection-bench/scale-<size>-<dims>/) a
synthetic collection shaped like a real one: clustered unit vectors, five labels each
(commonest labels far commoner than rare ones), a thumbnail each, the map (positions
near their cluster's spot, as t-SNE gives), ten matches each and the Annoy index, all
written with the same SQL and triggers as the write path. Then, on a copy of it:

1. `collection add` of 500 real photos (crops, flips, scales, re-encodes of
   /work/shared/photos, or the scikit-image samples), in a process of its own as a
   user runs it: images/s over the whole process, peak RSS, where `add` spent its
   time, and images/s as a ratio to the empty collection;
2. the watcher (`collection watch`): single photos dropped one at a time, seconds until
   each is searchable (its row committed and found by the searcher), p50/p95;
3. `collection serve` (on the collection after step 1): p50/p95 over --requests keep-alive requests each of the images
   table page, the label facet (checked present with correct counts), a label filter,
   a similar page and its JSON, and the map page's first data and a zoomed-in box.

The machine is small and shared: run the sizes that fit and say which ran.
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
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import build_corpus  # noqa: E402  (bench/ingest.py: distinct real photos)
from serve import free_port, serve, thumbnails  # noqa: E402  (bench/serve.py: `collection serve`, synthetic thumbnails)
from machine import cpu_flags  # noqa: E402  (bench/machine.py, beside this script)

from collection import projection  # noqa: E402
from collection.index import build, open_index  # noqa: E402
from collection.store import Store, encode, now  # noqa: E402

CACHE = Path(tempfile.gettempdir()) / "collection-bench"
MODEL = "efficientnet_lite0"
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
        return db_path
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    store = Store(db_path)
    store.claim_model(MODEL, dimensions, "fp32")
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
                         stamp, stamp, MODEL, json.dumps(labels), labels[0]],
                    )
                    conn.executemany(
                        "insert into labels (image_id, rank, wnid, label, score) values (?, ?, ?, ?, ?)",
                        [(image_id, rank, f"n{rank:08d}", label, 0.5 / rank)
                         for rank, label in enumerate(labels, start=1)],
                    )
                    conn.execute("insert into vectors (image_id, model, vector) values (?, ?, ?)",
                                 [image_id, MODEL, encode(vectors[offset])])
                    conn.execute("insert into thumbnails (image_id, jpeg, width, height) values (?, ?, 4000, 3000)",
                                 [image_id, jpegs[image_id % len(jpegs)]])
            print(f"  {start + count:,} rows", file=sys.stderr, flush=True)
        write_map(store, np.clip(xy, 0, 1))
        write_matches(store, members, rng)
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


def working_copy(db_path: Path, name: str) -> Path:
    """A copy to change, so the cached one stays as built. The index files beside it are
    hard links: they are never written in place, and a link keeps the inode, size and
    mtime by which the searcher knows its file (a copy would look like a stranger's)."""
    folder = CACHE / f"work-{name}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for file in db_path.parent.iterdir():
        if file.name in ("collection.db", "collection.db-wal"):
            shutil.copy2(file, folder / file.name)
        elif file.name.startswith("collection.db") and file.name != "collection.db-shm":
            if file.is_dir():  # an index kept as a folder of segment files
                shutil.copytree(file, folder / file.name, copy_function=os.link)
            else:
                os.link(file, folder / file.name)
    return folder / "collection.db"


# --- 1. collection add -----------------------------------------------------------------------


def child_add(db_path: str, corpus: str) -> None:
    """`collection add` as cli.add runs it, reporting stage seconds and peak RSS."""
    from collection.cli import load_model, open_store
    from collection.ingest import Ingester, iter_files
    from collection.upkeep import Upkeep

    store = open_store(db_path)
    files = list(iter_files([corpus], False))
    model = load_model(store, MODEL, None, "fp32")
    upkeep = Upkeep(store, refresh_map=False)
    ingester = Ingester(store, model, on_batch=upkeep.after_batch)
    summary = ingester.add(files)
    upkeep.join()
    store.close()
    print(json.dumps({"added": summary.added, "seconds": dict(summary.seconds),
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_add(db_path: Path, corpus: Path) -> dict:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, "--child-add", str(db_path), str(corpus)],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - started
    return result


# --- 2. the watcher ----------------------------------------------------------------------------


def run_watch(db_path: Path, corpus: Path) -> list[float]:
    inbox = db_path.parent / "inbox"
    inbox.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "collection", "watch", str(inbox), "--db", str(db_path), "--model", MODEL],
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


def label_counts_expected(db_path: Path) -> dict[str, int]:
    import sqlite3

    with sqlite3.connect(db_path) as conn:
        return dict(conn.execute("select label, count(distinct image_id) from labels group by label"))


def check_facet(body: bytes, expected: dict[str, int]) -> None:
    data = json.loads(body)
    assert "labels" not in data.get("facets_timed_out", []), "the label facet timed out"
    results = data["facet_results"]["labels"]["results"]
    assert results, "no label facet"
    for row in results:
        assert row["count"] == expected[row["value"]], row


def run_serve(db_path: Path, requests: int) -> list[tuple[str, list[float]]]:
    import sqlite3

    with sqlite3.connect(db_path) as conn:
        ids = [r[0] for r in conn.execute("select id from images where deleted_at is null order by random() limit ?", [requests])]
        label = conn.execute("select label from label_counts order by images desc limit 1 offset 20").fetchone()
    expected = label_counts_expected(db_path)
    port = free_port()
    process = serve(db_path, port)
    cases = [
        ("images table page", lambda i: "/collection/images"),
        ("label facet (JSON)", lambda i: "/collection/images.json?_size=1"),
        (f"label filter ({label[0] if label else '-'})",
         lambda i: f"/collection/images?_label={label[0].replace(' ', '+')}" if label else "/collection/images"),
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
                body = response.read()
                elapsed = time.perf_counter() - started
                if response.status != 200:  # e.g. a query past Datasette's time limit
                    failed += 1
                    print(f"  {path(i)}: HTTP {response.status}", file=sys.stderr, flush=True)
                elif i == 0 and name.startswith("label facet"):
                    check_facet(body, expected)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0,100000", help="collection sizes, comma-separated")
    parser.add_argument("--dimensions", type=int, default=1280)
    parser.add_argument("--requests", type=int, default=50, help="timed requests per page")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: add, watch, serve")
    parser.add_argument("--child-add", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_add:
        child_add(*args.child_add)
        return
    skip = set(filter(None, args.skip.split(",")))
    sizes = [int(s) for s in args.sizes.split(",")]
    corpus = build_corpus(ADD_COUNT, seed=13)
    drops = build_corpus(DROPS + 1, seed=14)
    rows_add, rows_watch, rows_serve = [], [], []
    empty_rate = None
    for size in sizes:
        started = time.perf_counter()
        cached = build_collection(size, args.dimensions)
        print(f"{size:,} images: collection ready in {time.perf_counter() - started:.0f} s "
              f"({(cached.parent / 'done').read_text().strip()})", file=sys.stderr, flush=True)
        served = cached  # after add, its copy: at size 0 an empty collection has nothing to serve
        if "add" not in skip:
            served = working_copy(cached, f"add-{size}")
            result = run_add(served, corpus)
            rate = result["added"] / result["wall"]
            empty_rate = empty_rate or (rate if size == 0 else None)
            stages = ", ".join(f"{k} {v:.1f}" for k, v in sorted(result["seconds"].items(), key=lambda kv: -kv[1]))
            ratio = f"{rate / empty_rate:.2f}" if empty_rate else "-"
            rows_add.append(f"| {size:,} | {result['added']} | {result['wall']:.1f} | {rate:.1f} | {ratio} | "
                            f"{result['rss_mb']:.0f} | {stages} |")
            print(rows_add[-1], file=sys.stderr, flush=True)
        if "watch" not in skip:
            latencies = run_watch(working_copy(cached, f"watch-{size}"), drops)
            rows_watch.append(f"| {size:,} | {len(latencies)} | {pct(latencies, 0.5):.2f} | {pct(latencies, 0.95):.2f} |")
            print(rows_watch[-1], file=sys.stderr, flush=True)
        if "serve" not in skip:
            for name, times in run_serve(served, args.requests):
                rows_serve.append(f"| {size:,} | {name} | {len(times)} | {pct(times, 0.5) * 1000:.0f} | "
                                  f"{pct(times, 0.95) * 1000:.0f} |")
    print(f"\nCPU: {os.cpu_count()} cores, flags: {cpu_flags()}; "
          f"{args.dimensions}-d vectors, model {MODEL}\n")
    if rows_add:
        print(f"`collection add` of {ADD_COUNT} photos (whole process)\n")
        print("| images before | added | seconds | images/s | ratio to empty | peak RSS MB | seconds by stage |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        print("\n".join(rows_add) + "\n")
    if rows_watch:
        print("watcher: single photo dropped to searchable\n")
        print("| images | drops | p50 s | p95 s |\n| ---: | ---: | ---: | ---: |")
        print("\n".join(rows_watch) + "\n")
    if rows_serve:
        print("`collection serve`, sequential keep-alive requests\n")
        print("| images | request | n | p50 ms | p95 ms |\n| ---: | --- | ---: | ---: | ---: |")
        print("\n".join(rows_serve))


if __name__ == "__main__":
    main()
