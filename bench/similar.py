"""Similar-image search: the Annoy index against exact numpy search, on synthetic
2048-d vectors drawn from clusters; and a simulated backfill through the product's
segments.

    .venv/bin/python bench/similar.py --sizes 10k,100k
    .venv/bin/python bench/similar.py --sizes 1m --queries 100 --trees 10
    .venv/bin/python bench/similar.py --backfill 200k --dims 1280

``--backfill N`` adds N vectors to a SQLite collection in batches, as ingest commits
them; after each batch the Indexer's rule decides whether a segment build is due, and
the build runs to its end before the next batch (so the build seconds add up honestly;
in the product it runs in the background). At each stage it prints the segments, the
tail, the build seconds so far, recall@10 against exact search and query p50 / p99 of
``Searcher.similar``, and the most vectors the searcher read for one batch.

For each size: build time, index file size, query latency p50 / p99 (one query at
a time, as a similar-images page asks) and recall@10 against exact search. Annoy
runs the way collection/index.py queries it: k + 1 nearest by Annoy, rescored by
the dot product of the stored vectors, the query itself left out. ``--trees`` and
``--search-k`` take lists to sweep; they default to N_TREES and, per size, the
search_k that collection/index.py uses for an index that big (search_k_for).
``--searcher`` adds the whole product path (collection.index.Searcher over a SQLite
collection: the database checks, the exact remainder, the rescoring) up to 100k.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from annoy import AnnoyIndex

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from collection.index import N_TREES, SEGMENT_MIN, Indexer, Searcher, build, search_k_for  # noqa: E402
from collection.store import Store  # noqa: E402
from machine import cpu_flags  # noqa: E402  (bench/machine.py, beside this script)

D = 2048
K = 10
CHUNK = 10_000


def print_machine() -> None:
    print(f"CPU: {os.cpu_count()} cores, flags: {cpu_flags()}")


def parse_size(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1], 1)
    return int(float(text.rstrip("km")) * scale)


def vectors(n: int, path: Path, seed: int = 0, d: int = D, growing: bool = False) -> np.memmap:
    """n unit vectors like a CNN's pooled features, written in chunks to a memmap.

    Clusters of mean size 50 (log-normal sizes) around random centres; within a
    cluster a point moves in a 16-d subspace of its own (the pose / crop / light of
    one subject) plus a little isotropic noise; all share a common direction, as
    non-negative features do. Nearest neighbours: cosine about 0.88; the 10th about
    0.83; two unrelated images about 0.2. ``growing``: the first i vectors come from the
    first i / 50 clusters (per chunk), so every prefix looks like a collection of its size,
    as a backfill in the order photos were taken would.
    """
    D = d  # noqa: N806
    rng = np.random.default_rng(seed)
    common = rng.normal(size=D).astype(np.float32)
    common /= np.linalg.norm(common)
    clusters = max(10, n // 50)
    centres = rng.normal(size=(clusters, D)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    bases = (rng.normal(size=(64, 16, D)) / np.sqrt(D)).astype(np.float32)
    weights = rng.lognormal(0, 1, clusters)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, D))
    for start in range(0, n, CHUNK):
        chunk_rng = np.random.default_rng([seed, start])
        m = min(CHUNK, n - start)
        known = min(clusters, max(10, (start + m) // 50)) if growing else clusters
        members = chunk_rng.choice(known, size=m, p=weights[:known] / weights[:known].sum())
        pose = chunk_rng.normal(size=(m, 16)).astype(np.float32) / 4
        x = chunk_rng.normal(size=(m, D)).astype(np.float32) * np.float32(0.3 / np.sqrt(D))
        x += 0.6 * common + centres[members]
        for basis in range(64):  # each cluster moves in the subspace of its basis
            rows = members % 64 == basis
            x[rows] += 0.5 * pose[rows] @ bases[basis]
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    return out


def exact_top(x: np.ndarray, queries: np.ndarray, k: int = K) -> np.ndarray:
    """The true k nearest of each query item (itself left out), in chunks of the data."""
    best = np.full((len(queries), k + 1), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), k + 1), np.int64)
    q = np.asarray(x[queries])
    rows = np.arange(len(queries))
    for start in range(0, len(x), 100_000):
        scores = q @ np.asarray(x[start : start + 100_000]).T
        inside = (queries >= start) & (queries < start + scores.shape[1])
        scores[rows[inside], queries[inside] - start] = -np.inf
        ids = np.concatenate(
            [best_ids, np.broadcast_to(np.arange(start, start + scores.shape[1]), scores.shape)], 1
        )
        both = np.concatenate([best, scores], 1)
        top = np.argpartition(-both, k, axis=1)[:, : k + 1]
        best, best_ids = np.take_along_axis(both, top, 1), np.take_along_axis(ids, top, 1)
    order = np.argsort(-best, axis=1)[:, :k]
    return np.take_along_axis(best_ids, order, 1)


def run_queries(queries: np.ndarray, truth: np.ndarray, ask, budget: float = float("inf")) -> dict:
    """``ask(q)`` per query, one at a time: recall@10, and wall and CPU p50 / p99 in ms
    (the CPU time shows the work itself when other jobs share the cores)."""
    wall, cpu, found = [], [], []
    for q in queries:
        w, c = time.perf_counter(), time.process_time()
        found.append(ask(q))
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
        if sum(wall) > budget and len(wall) >= 5:
            break
    ms = lambda xs, p: float(np.percentile(xs, p) * 1e3)  # noqa: E731
    hits = [len(set(f) & set(t)) / K for f, t in zip(found, truth)]
    return {
        "p50": ms(wall, 50),
        "p99": ms(wall, 99),
        "cpu50": ms(cpu, 50),
        "cpu99": ms(cpu, 99),
        "recall": float(np.mean(hits)),
        "queries": len(wall),
    }


def run_exact(x: np.ndarray, queries: np.ndarray, truth: np.ndarray, budget: float) -> dict:
    """numpy over everything, as the search over the unindexed remainder does."""

    def ask(q):
        scores = x @ x[q]
        scores[q] = -np.inf
        top = np.argpartition(-scores, K)[:K]
        return top[np.argsort(-scores[top])].tolist()

    return {
        "method": "exact numpy",
        "build": 0.0,
        "mb": x.nbytes / 1e6,
        **run_queries(queries, truth, ask, budget),
    }


def run_annoy(
    x: np.ndarray, queries: np.ndarray, truth: np.ndarray, n_trees: int, search_ks: list[int], folder: Path
) -> list[dict]:
    """Annoy as collection/index.py builds it (on disk, one thread) and asks it (k + 1, rescored)."""
    path = folder / f"bench-{n_trees}.annoy"
    began = time.perf_counter()
    index = AnnoyIndex(D, "angular")
    index.set_seed(0)
    index.on_disk_build(str(path))
    for start in range(0, len(x), CHUNK):
        for i, row in enumerate(np.asarray(x[start : start + CHUNK]), start):
            index.add_item(i, row.tolist())
    added = time.perf_counter()
    index.build(n_trees, n_jobs=1)
    built = time.perf_counter()
    print(f"    {n_trees} trees: add {added - began:.1f}s, build {built - added:.1f}s", flush=True)
    results = []
    for search_k in search_ks:

        def ask(q):
            vector = x[q]
            nearest = index.get_nns_by_vector(
                vector.tolist(), K + 1, search_k=max(search_k, (K + 1) * n_trees)
            )
            candidates = [c for c in nearest if c != q]
            scores = np.asarray(x[candidates]) @ vector
            return [candidates[j] for j in np.argsort(-scores)[:K]]

        results.append(
            {
                "method": "annoy",
                "n_trees": n_trees,
                "search_k": search_k,
                "build": built - began,
                "mb": path.stat().st_size / 1e6,
                **run_queries(queries, truth, ask),
            }
        )
    index.unload()
    path.unlink()
    return results


def run_searcher(
    x: np.ndarray, queries: np.ndarray, truth: np.ndarray, search_ks: list[int], folder: Path
) -> list[dict]:
    """The product: vectors in a SQLite collection, `build`, then Searcher.similar per query."""
    db_path = folder / "bench.db"
    store = Store(db_path)
    store.claim_model("bench", D, "fp32")
    with store.db.atomic():
        for start in range(0, len(x), CHUNK):
            rows = range(start, min(start + CHUNK, len(x)))
            store.db.conn.executemany(
                "insert into images (id, path) values (?, ?)", ((i + 1, f"/{i}") for i in rows)
            )
            store.db.conn.executemany(
                "insert into vectors (image_id, model, vector) values (?, 'bench', ?)",
                ((i + 1, np.asarray(x[i], "<f4").tobytes()) for i in rows),
            )
    store.close()
    began = time.perf_counter()
    result = build(db_path, full=True)
    seconds = time.perf_counter() - began
    results = []
    for search_k in search_ks:
        searcher = Searcher(db_path, search_k=search_k)
        measured = run_queries(queries, truth, lambda q: [i - 1 for i, _ in searcher.similar(int(q) + 1, K)])
        searcher.close()
        results.append(
            {
                "method": "Searcher (SQLite)",
                "n_trees": result["built"]["n_trees"],
                "search_k": search_k,
                "build": seconds,
                "mb": sum(p.stat().st_size for p in Path(result["path"]).glob("*.annoy")) / 1e6,
                **measured,
            }
        )
    return results


def backfill(
    x: np.ndarray, stages: list[int], batch: int, n_trees: int, queries: int, folder: Path
) -> list[dict]:
    """Grow a collection to len(x) a batch at a time, building segments as the Indexer
    would, and measure the searcher at each stage."""
    db_path = folder / "backfill.db"
    store = Store(db_path)
    store.claim_model("bench", x.shape[1], "fp32")
    conn = store.db.conn
    indexer = Indexer(db_path, n_trees=n_trees)
    searcher = Searcher(db_path)
    rows, built_seconds, builds, most_read = [], 0.0, 0, 0
    for start in range(0, stages[-1], batch):
        ids = range(start, min(start + batch, stages[-1]))
        with store.db.atomic():
            conn.executemany("insert into images (id, path) values (?, ?)", ((i + 1, f"/{i}") for i in ids))
            conn.executemany(
                "insert into vectors (image_id, model, vector) values (?, 'bench', ?)",
                ((i + 1, np.asarray(x[i], "<f4").tobytes()) for i in ids),
            )
        read = searcher.vectors_read
        searcher.similar(start + 1, K)  # the query after a batch (as matches upkeep asks)
        most_read = max(most_read, searcher.vectors_read - read)
        if indexer.due():
            cpu = time.process_time()
            build(db_path, n_trees, segment_min=indexer.segment_min)
            built_seconds += time.process_time() - cpu  # CPU: other jobs share this machine's cores
            builds += 1
        size = ids[-1] + 1
        if size in stages:
            status = searcher.status()
            picked = np.random.default_rng(size).choice(size, min(queries, size), replace=False)
            truth = exact_top(x[:size], picked)
            measured = run_queries(picked, truth, lambda q: [i - 1 for i, _ in searcher.similar(int(q) + 1, K)])
            rows.append(
                {
                    "size": size,
                    "segments": status["segments"],
                    "sizes": "/".join(str(s["items"] // 1000) + "k" for s in (seg.record for seg in searcher._state.segments)),
                    "tail": status["unindexed"],
                    "builds": builds,
                    "build": built_seconds,
                    "read": most_read,
                    **measured,
                }
            )
            print(
                f"  {size:,}: {status['segments']} segments, tail {status['unindexed']}, "
                f"{builds} builds {built_seconds:.0f} CPU s, recall {measured['recall']:.3f}, "
                f"p50 {measured['p50']:.2f} ms, p99 {measured['p99']:.2f} ms "
                f"(CPU {measured['cpu50']:.2f}, {measured['cpu99']:.2f})",
                flush=True,
            )
    searcher.close()
    store.close()
    return rows


def add_vector_copies(db_path: Path) -> int:
    """Give segments built before the vector copies (index.FILES) their ``.vectors.npy``,
    from SQLite, and mark them in the record: a kept backfill from an older version then
    measures as one built now would. Returns how many segments got one."""
    import sqlite3

    from collection.index import index_path, load_ids

    folder = index_path(db_path)
    conn = sqlite3.connect(db_path)
    segments = json.loads(conn.execute("select value from collection_meta where key = 'index_segments'").fetchone()[0])
    added = 0
    for segment in segments:
        if segment.get("vectors"):
            continue
        ids = np.asarray(load_ids(folder, segment))
        dims = conn.execute("select length(vector) / 4 from vectors where image_id = ?", [int(ids[0])]).fetchone()[0]
        out = np.lib.format.open_memmap(folder / f"{segment['name']}.vectors.npy", mode="w+", dtype="<f4",
                                        shape=(len(ids), dims))
        for start in range(0, len(ids), 500):
            part = ids[start : start + 500]
            blobs = dict(conn.execute("select image_id, vector from vectors where image_id in (select value from "
                                      "json_each(?))", [json.dumps(part.tolist())]))
            out[start : start + len(part)] = np.stack([np.frombuffer(blobs[int(i)], "<f4") for i in part])
        out.flush()
        segment["vectors"] = True
        added += 1
    with conn:
        conn.execute("update collection_meta set value = ? where key = 'index_segments'", [json.dumps(segments)])
    conn.close()
    return added


def measure_kept(x: np.ndarray, queries: int, folder: Path) -> list[dict]:
    """The searcher over a backfill that --keep left: the last stage again (e.g. alone,
    under an exclusive lock, after a build run beside other work)."""
    added = add_vector_copies(folder / "backfill.db")
    if added:
        print(f"  {added} segments from before the vector copies got theirs", flush=True)
    size = len(x)
    searcher = Searcher(folder / "backfill.db")
    status = searcher.status()
    searcher.similar(1, K)  # loads the segments
    picked = np.random.default_rng(size).choice(size, min(queries, size), replace=False)
    truth = exact_top(x, picked)
    measured = run_queries(picked, truth, lambda q: [i - 1 for i, _ in searcher.similar(int(q) + 1, K)])
    sizes = "/".join(str(s.record["items"] // 1000) + "k" for s in searcher._state.segments)
    searcher.close()
    built = json.loads((folder / "done").read_text())
    return [{"size": size, "segments": status["segments"], "sizes": sizes, "tail": status["unindexed"],
             "builds": built["builds"], "build": built["build"], "read": built["read"], **measured}]


def main_backfill(args) -> None:
    size = parse_size(args.backfill)
    stages = sorted({s for s in (parse_size(t) for t in args.stages.split(",")) if s < size} | {size})
    print(
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; command: {' '.join(sys.argv)}"
    )
    print_machine()
    with contextlib.ExitStack() as stack:
        if args.keep:
            tmp = Path(args.keep)
            tmp.mkdir(parents=True, exist_ok=True)
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=args.tmp, prefix="bench-backfill-")))
        if args.keep and (tmp / "done").exists():
            x = np.load(tmp / "vectors.npy", mmap_mode="r")
            rows = measure_kept(x, args.queries, tmp)
        else:
            x = vectors(size, tmp / "vectors.npy", d=args.dims, growing=True)
            rows = backfill(x, stages, args.batch, int(args.trees), args.queries, tmp)
            if args.keep:
                last = rows[-1]
                (tmp / "done").write_text(json.dumps({k: last[k] for k in ("builds", "build", "read")}))
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}\n")
    print(
        f"{args.dims}-d clustered vectors, batches of {args.batch}, {args.trees} trees, "
        f"segment minimum {SEGMENT_MIN}, {args.queries} queries per stage\n"
    )
    print("| images | segments (k items) | tail | builds | build CPU s so far | recall@10 | p50 ms | p99 ms | CPU p50 ms | CPU p99 ms | most vectors read per batch |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['size']:,} | {r['segments']} ({r['sizes']}) | {r['tail']} | {r['builds']} | {r['build']:.0f} | "
            f"{r['recall']:.3f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['cpu50']:.2f} | {r['cpu99']:.2f} | {r['read']} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10k,100k", help="comma-separated, e.g. 10k,100k,1m")
    parser.add_argument("--queries", type=int, default=500, help="query items per size")
    parser.add_argument("--trees", default=str(N_TREES), help="comma-separated n_trees to build")
    parser.add_argument(
        "--search-k", help="comma-separated search_k to query with [default: search_k_for(size)]"
    )
    parser.add_argument("--exact-budget", type=float, default=60.0, help="seconds of exact queries per size")
    parser.add_argument(
        "--searcher", action="store_true", help="also time collection.index.Searcher (<= 100k)"
    )
    parser.add_argument("--tmp", default=tempfile.gettempdir(), help="where the vectors and index files go")
    parser.add_argument("--backfill", help="simulate a backfill to this size through the product's segments")
    parser.add_argument("--stages", default="10k,50k,100k,200k,500k", help="backfill sizes to measure at")
    parser.add_argument("--batch", type=int, default=1000, help="backfill vectors per committed batch")
    parser.add_argument("--dims", type=int, default=D, help="vector dimensions")
    parser.add_argument(
        "--keep",
        help="with --backfill: keep the collection in this folder; run again, it measures the last stage only",
    )
    args = parser.parse_args()
    from collection.search import one_blas_thread

    one_blas_thread()  # as the server and the watcher run queries
    if args.backfill:
        return main_backfill(args)
    trees = [int(t) for t in args.trees.split(",")]
    print(
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; command: {' '.join(sys.argv)}"
    )
    print_machine()
    rows = []
    for size in [parse_size(s) for s in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory(dir=args.tmp, prefix="bench-similar-") as tmp:
            folder = Path(tmp)
            started = time.perf_counter()
            x = vectors(size, folder / "vectors.npy")
            queries = np.random.default_rng(1).choice(size, min(args.queries, size), replace=False)
            truth = exact_top(x, queries)
            print(
                f"{size:,} vectors: generated and ground truth in {time.perf_counter() - started:.0f}s",
                flush=True,
            )
            search_ks = [int(s) for s in args.search_k.split(",")] if args.search_k else [search_k_for(size)]
            results = [run_exact(x, queries, truth, args.exact_budget)]
            for n_trees in trees:
                results += run_annoy(x, queries, truth, n_trees, search_ks, folder)
            if args.searcher and size <= 100_000:
                results += run_searcher(x, queries, truth, search_ks, folder)
            for r in results:
                print(
                    f"    {r['method']} {r.get('n_trees', '')} {r.get('search_k', '')}: recall {r['recall']:.3f}, "
                    f"p50 {r['p50']:.2f} ms, p99 {r['p99']:.2f} ms (CPU {r['cpu50']:.2f}, {r['cpu99']:.2f})",
                    flush=True,
                )
            rows += [{"size": size, **r} for r in results]
            del x
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}\n")
    print(
        "| vectors | method | n_trees | search_k | build s | index MB | p50 ms | p99 ms | CPU p50 ms | CPU p99 ms | recall@10 | queries |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['size']:,} | {r['method']} | {r.get('n_trees', '')} | {r.get('search_k', '')} | "
            f"{r['build']:.1f} | {r['mb']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['cpu50']:.2f} | "
            f"{r['cpu99']:.2f} | {r['recall']:.3f} | {r['queries']} |"
        )


if __name__ == "__main__":
    main()
