"""The similar-images index: immutable Annoy segments, built in the background and merged
geometrically, the way a search engine keeps its segments.

The index is a list of segments in the folder ``<db>.index/``: each an Annoy file
(``<name>.annoy``), the sorted ids it holds (``<name>.ids.npy``) and, for vectors of many
dimensions, the PCA its Annoy file is built on (``<name>.pca.npy``), never changed once
written. The record in ``collection_meta`` (``index_segments``, JSON, oldest first) says
which files make the index. Segment j was built from the live vectors whose newest entry
in the ``vector_changes`` log (filled by triggers, see store.m003_matches) fell after the
``hi`` of segment j - 1 and up to its own ``hi``; the first, the base, from every vector
up to its ``hi``. ``index_seq`` is the log position the whole index covers; vectors
changed after it are the tail, searched exactly by search.py.

A build takes the tail and the newest segments that it outgrows (a binary counter: a
segment is merged once the items arriving after it are as many as it holds), so sizes at
least double going back, there are at most log2(N / SEGMENT_MIN) + 1 segments, and each
image is built O(log N) times over a backfill. A copy in a segment dies when its image is
deleted or embedded again; a segment whose dead copies pass DEAD_SHARE is rebuilt with
the newer ones (compaction). Only one builder works on a database at a time (a file lock);
it builds into temporary files, ``os.replace``s them into place under new names, commits
the record, and only then unlinks the files it replaced: a reader that has them mapped
keeps a valid mapping (annoy pins SIGBUS on a file overwritten while loaded).
"""

from __future__ import annotations

import fcntl
import importlib
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from annoy import AnnoyIndex

from .store import now

# bench/similar.py chose these: recall@10 >= 0.95 against exact search at every stage of a
# backfill of clustered vectors (see the README's table).
N_TREES = 50
SEED = 0
# The tail becomes a segment once this many live vectors are outside the index; below it
# the exact search over them costs less than a build.
SEGMENT_MIN = 2000
# A segment is rebuilt once this share of its copies are dead (deleted or re-embedded).
DEAD_SHARE = 0.2
# Threads for Annoy's build. A quarter of the cores: the build runs beside the model,
# which takes the rest (ingest.py decodes on one thread per 4 cores too); 1 on this
# project's 2-core machines. More threads add trees in any order, so only a one-thread
# build is byte-for-byte reproducible from its seed.
BUILD_JOBS = max(1, (os.cpu_count() or 1) // 4)
# A segment of vectors with at least twice this many dimensions indexes them reduced to
# this many by a PCA of its own (``<name>.pca.npy``), and the searcher reranks Annoy's
# candidates by the full vectors. bench/similar.py, 1280-d, one index of 100k: recall@10
# 0.98 at 1 % search_k and 0.25 ms a query, where the full vectors gave 0.97 at 2 % and
# 1.3 ms; the files are a tenth the size. 0: full vectors.
REDUCED_DIMENSIONS = 128
PCA_SAMPLE = 20_000  # vectors a segment's PCA is fitted on
STREAM_CHUNK = 4096  # vectors read at a time while building
# What makes a segment: .pca.npy when reduced; .vectors.npy the full vectors in the ids'
# order, memory-mapped by the searcher to rerank candidates (a SQLite read of 50 vectors
# took 6 ms at 1M images, most of a query).
FILES = (".annoy", ".ids.npy", ".pca.npy", ".vectors.npy")
_TMP = ".tmp"

log = logging.getLogger(__name__)


def index_path(db_path: str | Path) -> Path:
    """The folder that holds a database's segments."""
    return Path(f"{db_path}.index")


# --- the record -----------------------------------------------------------------


def meta(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute("select key, value from collection_meta"))


def segments_of(record: dict[str, str]) -> list[dict]:
    """The segments the record lists, oldest first; none when the index is for another model."""
    if record.get("index_model") != record.get("model") or "index_segments" not in record:
        return []
    return json.loads(record["index_segments"])


def last_change(conn: sqlite3.Connection) -> int:
    """The newest seq ever given out in the change log (pruned entries included)."""
    row = conn.execute("select seq from sqlite_sequence where name = 'vector_changes'").fetchone()
    return row[0] if row else 0


def prune_changes(conn: sqlite3.Connection) -> None:
    """Drop log entries that both the index and ``matches`` have taken in. The index needs
    them back to its base's ``hi``: merges and dead counts read changes after any
    segment's ``hi``. Without an index nothing goes: readers then tell changed vectors
    apart by their newest entry."""
    record = meta(conn)
    segments = segments_of(record)
    if "matches_seq" in record and segments:
        upto = min(int(record["matches_seq"]), segments[0]["hi"])
        conn.execute("delete from vector_changes where seq <= ?", [upto])


def load_ids(folder: Path, segment: dict) -> np.ndarray:
    return np.load(folder / f"{segment['name']}.ids.npy", mmap_mode="r")


def contains(sorted_ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Which of ``wanted`` are in ``sorted_ids``, by binary search: O(len(wanted) log n),
    where np.isin would sort the whole segment's ids."""
    if not len(sorted_ids) or not len(wanted):
        return np.zeros(len(wanted), bool)
    at = np.minimum(np.searchsorted(sorted_ids, wanted), len(sorted_ids) - 1)
    return np.asarray(sorted_ids[at] == wanted)


# --- planning ---------------------------------------------------------------------


def plan(segments: list[dict], tail: int, dead_share: float = DEAD_SHARE) -> int:
    """Which segment the next build starts from: it rebuilds that one and every newer one
    together with the tail of ``tail`` live vectors; ``len(segments)`` builds the tail alone."""
    first, arriving = len(segments), tail
    while first > 0 and arriving >= live(segments[first - 1]):
        first -= 1
        arriving += live(segments[first])
    for j, segment in enumerate(segments[:first]):
        if segment["dead"] > dead_share * segment["items"]:
            return j
    return first


def live(segment: dict) -> int:
    return segment["items"] - segment["dead"]


def _count_dead(conn: sqlite3.Connection, folder: Path, segments: list[dict], since: int) -> list[dict]:
    """The segments with the copies that died after ``since`` (the log position the record
    covers) added to their dead counts. A copy dies at its image's first change after its
    segment's ``hi``; later changes of the same image find it dead already."""
    changed = np.array(
        [r[0] for r in conn.execute("select distinct image_id from vector_changes not indexed where seq > ?", [since])],
        np.int64,
    )
    counted = []
    for segment in segments:
        hit = changed[contains(load_ids(folder, segment), changed)]
        newly = sum(
            1
            for image_id in hit.tolist()
            if conn.execute(
                "select 1 from vector_changes where image_id = ? and seq > ? and seq <= ? limit 1",
                [image_id, segment["hi"], since],
            ).fetchone()
            is None
        )
        counted.append({**segment, "dead": segment["dead"] + newly})
    return counted


# --- building -------------------------------------------------------------------


@contextmanager
def builder_lock(db_path: str | Path, wait: bool) -> Iterator[bool]:
    """Hold the database's one-builder lock; yields False when another builder has it
    (and ``wait`` is False). Whoever holds it may remove any file the record does not list."""
    folder = index_path(db_path)
    folder.mkdir(exist_ok=True)
    with open(folder / "build.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def clean(db_path: str | Path, record: dict[str, str] | None = None) -> list[str]:
    """Remove what an interrupted build left (temporaries, files placed but never
    recorded) and the single-file index of older versions. Call with the builder lock
    held; returns the names removed."""
    folder = index_path(db_path)
    if record is None:
        conn = sqlite3.connect(db_path, timeout=30)
        try:
            record = meta(conn)
        finally:
            conn.close()
    keep = {f"{s['name']}{ext}" for s in json.loads(record.get("index_segments", "[]")) for ext in FILES}
    keep.add("build.lock")
    db = Path(db_path)
    legacy = [db.parent / f"{db.name}.annoy", *db.parent.glob(f".{db.name}.annoy.*.tmp")]
    removed = []
    for path in [*folder.iterdir(), *legacy]:
        if path.parent == folder and path.name in keep:
            continue
        if path.exists():
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def build(
    db_path: str | Path,
    n_trees: int = N_TREES,
    seed: int = SEED,
    full: bool = False,
    wait: bool = True,
    n_jobs: int = BUILD_JOBS,
    segment_min: int = 1,
    dead_share: float = DEAD_SHARE,
) -> dict:
    """Bring the index up to the latest commit: build the tail (with the segments it
    outgrows, and any due for compaction) into one new segment, or, with ``full``, every
    live vector into a new base. Safe beside a running writer and readers.

    Returns the new record (``index_*`` keys) plus ``built`` (the new segment, or None
    when nothing was due: fewer than ``segment_min`` live vectors in the tail and no
    compaction) and ``path``. With ``wait`` False it returns at once, ``built`` None and
    ``busy`` True, when another builder holds the lock.
    """
    started = time.perf_counter()
    folder = index_path(db_path)
    conn = sqlite3.connect(db_path, timeout=30, isolation_level=None)
    try:
        with builder_lock(db_path, wait) as held:
            if not held:
                return {"built": None, "busy": True, "path": str(folder)}
            conn.execute("begin")  # one snapshot: the log position and the vectors agree
            record = meta(conn)
            clean(db_path, record)
            segments = segments_of(record)
            covered = int(record.get("index_seq", 0)) if segments else 0
            seq = last_change(conn)
            segments = _count_dead(conn, folder, segments, covered)
            tail = _tail_count(conn, record.get("model"), covered) if segments else None
            first = 0 if full or not segments else plan(segments, tail, dead_share)
            if first == len(segments) and tail is not None and tail < segment_min:
                conn.execute("rollback")
                return {"built": None, "busy": False, "path": str(folder), **_public(record)}
            name = f"{seq:012d}-{uuid.uuid4().hex[:8]}"
            since = segments[first - 1]["hi"] if first else None
            built = _write_segment(conn, folder, name, record.get("model"), since, n_trees, seed)
            conn.execute("commit")
            if built is not None:
                built["annoy"].build(n_trees, n_jobs=n_jobs)
                built["annoy"].unload()
            replaced = segments[first:]
            kept = segments[:first]
            if built is not None:
                kept.append(
                    {
                        "name": name,
                        "items": built["items"],
                        "hi": seq,
                        "dead": 0,
                        "n_trees": n_trees,
                        "reduced": built["reduced"],
                        "vectors": True,
                        "built_at": now(),
                        "seconds": round(time.perf_counter() - started, 3),
                    }
                )
            conn.execute("begin immediate")
            try:
                if built is not None:
                    for ext in FILES:
                        if ext != ".pca.npy" or built["reduced"]:
                            os.replace(folder / f"{name}{ext}{_TMP}", folder / f"{name}{ext}")
                new = {
                    "index_model": record.get("model"),
                    "index_dimensions": built["dimensions"] if built else record.get("index_dimensions"),
                    "index_seq": seq,
                    "index_segments": json.dumps(kept),
                    "index_built_at": now(),
                }
                conn.execute("delete from collection_meta where key like 'index\\_%' escape '\\'")
                conn.executemany(
                    "insert into collection_meta (key, value) values (?, ?)",
                    [(key, str(value)) for key, value in new.items() if value is not None],
                )
                prune_changes(conn)
                conn.execute("commit")
            except BaseException:
                conn.execute("rollback")
                raise
            for segment in replaced:  # readers that have them mapped keep valid mappings
                for ext in FILES:
                    (folder / f"{segment['name']}{ext}").unlink(missing_ok=True)
            clean(db_path)
    finally:
        if conn.in_transaction:
            conn.execute("rollback")
        conn.close()
    return {
        **_public(new),
        "built": kept[-1] if built is not None else None,
        "replaced": len(replaced),
        "seconds": round(time.perf_counter() - started, 3),
        "path": str(folder),
    }


def _public(record: dict) -> dict:
    segments = json.loads(record.get("index_segments", "[]"))
    return {
        "index_model": record.get("index_model"),
        "index_items": sum(live(s) for s in segments),
        "index_segments": len(segments),
        "index_seq": int(record.get("index_seq", 0)),
    }


def _tail_count(conn: sqlite3.Connection, model: str | None, covered: int) -> int:
    return conn.execute(
        "select count(*) from images i join vectors v on v.image_id = i.id where i.deleted_at is null "
        "and v.model = ? and i.id in (select image_id from vector_changes not indexed where seq > ?)",
        [model, covered],
    ).fetchone()[0]


def _write_segment(
    conn: sqlite3.Connection, folder: Path, name: str, model: str | None, since: int | None, n_trees: int, seed: int
) -> dict | None:
    """Stream the live vectors changed after ``since`` (all of them when None) into an
    on-disk Annoy build, STREAM_CHUNK at a time, and their ids into a temporary file;
    None when there are none. Past 2 x REDUCED_DIMENSIONS dimensions the segment holds
    the vectors reduced by a PCA fitted on a sample of its own, saved beside it."""
    where = "" if since is None else "and v.image_id in (select image_id from vector_changes not indexed where seq > ?)"
    params = [model] if since is None else [model, since]
    live = (
        "from vectors v join images i on i.id = v.image_id "
        f"where i.deleted_at is null and v.model = ? {where} order by v.image_id"
    )
    ids = np.fromiter((r[0] for r in conn.execute(f"select v.image_id {live}", params)), np.int64)
    if not len(ids):
        return None
    dimensions = conn.execute("select length(vector) / 4 from vectors where image_id = ?", [int(ids[0])]).fetchone()[0]
    reduction = None
    if REDUCED_DIMENSIONS and dimensions >= 2 * REDUCED_DIMENSIONS:
        reduction = fit_reduction(conn, ids, REDUCED_DIMENSIONS, seed)
        with open(folder / f"{name}.pca.npy{_TMP}", "wb") as f:
            np.save(f, reduction)
    annoy = AnnoyIndex(REDUCED_DIMENSIONS if reduction is not None else dimensions, "angular")
    annoy.set_seed(seed)
    annoy.on_disk_build(str(folder / f"{name}.annoy{_TMP}"))  # items go to the file, not to memory
    copies = np.lib.format.open_memmap(
        folder / f"{name}.vectors.npy{_TMP}", mode="w+", dtype="<f4", shape=(len(ids), dimensions)
    )
    rows = conn.execute(f"select v.image_id, v.vector {live}", params)
    done = 0
    while chunk := rows.fetchmany(STREAM_CHUNK):
        matrix = np.frombuffer(b"".join(blob for _, blob in chunk), "<f4").reshape(len(chunk), -1)
        copies[done : done + len(chunk)] = matrix
        done += len(chunk)
        if reduction is not None:
            matrix = matrix @ reduction
        for (image_id, _), vector in zip(chunk, matrix.tolist()):  # a list is 2x faster to add
            annoy.add_item(image_id, vector)
    copies.flush()
    del copies
    with open(folder / f"{name}.ids.npy{_TMP}", "wb") as f:
        np.save(f, ids)
    return {"annoy": annoy, "items": len(ids), "dimensions": dimensions,
            "reduced": REDUCED_DIMENSIONS if reduction is not None else None}


def fit_reduction(conn: sqlite3.Connection, ids: np.ndarray, dims: int, seed: int) -> np.ndarray:
    """A (d, dims) matrix onto the first ``dims`` principal axes of a sample of up to
    PCA_SAMPLE of ``ids``' vectors (read 500 at a time): memory bounded at any size."""
    sample = np.sort(np.random.default_rng(seed).choice(ids, min(PCA_SAMPLE, len(ids)), replace=False))
    blobs = []
    for start in range(0, len(sample), 500):
        part = sample[start : start + 500].tolist()
        blobs += [r[0] for r in conn.execute(
            "select vector from vectors where image_id in (select value from json_each(?))", [json.dumps(part)]
        )]
    matrix = np.frombuffer(b"".join(blobs), "<f4").reshape(len(blobs), -1).astype(np.float64)
    matrix -= matrix.mean(axis=0)
    _, axes = np.linalg.eigh(matrix.T @ matrix)  # ascending: the last are the principal ones
    return np.ascontiguousarray(axes[:, ::-1][:, :dims], np.float32)


class Indexer:
    """Keeps the index current for the process that writes the collection.

    Call ``check()`` after each committed batch (and after deletions): once the tail
    reaches ``segment_min`` live vectors, or dead copies are due for compaction, it starts
    a build in a background thread, one at a time; nothing waits for it. Queries stay
    exact and current meanwhile; ``join()`` before the process exits.
    """

    def __init__(
        self,
        db_path: str | Path,
        n_trees: int = N_TREES,
        segment_min: int = SEGMENT_MIN,
        dead_share: float = DEAD_SHARE,
        n_jobs: int = BUILD_JOBS,
    ):
        self.db_path = str(db_path)
        self.n_trees = n_trees
        self.segment_min = segment_min
        self.dead_share = dead_share
        self.n_jobs = n_jobs
        self.builds: list[dict] = []
        self._thread: threading.Thread | None = None
        with builder_lock(self.db_path, wait=False) as held:
            if held:
                clean(self.db_path)  # what a killed build left

    def due(self) -> bool:
        conn = sqlite3.connect(self.db_path, timeout=30)
        try:
            if not segments_of(meta(conn)):  # no index yet: count, without loading vectors
                return conn.execute(
                    "select count(*) from (select 1 from images where deleted_at is null limit ?)",
                    [self.segment_min],
                ).fetchone()[0] >= self.segment_min
        finally:
            conn.close()
        status = _search().open_index(self.db_path).status()
        if status["unindexed"] >= self.segment_min:
            return True
        return status["dead"] > self.dead_share * (status["indexed"] + status["dead"])

    def check(self) -> bool:
        """Start a build if one is due and none is running; True when one started."""
        if self._thread is not None and self._thread.is_alive():
            return False
        if not self.due():
            return False
        self._thread = threading.Thread(target=self._build, name="annoy-build", daemon=True)
        self._thread.start()
        return True

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _build(self) -> None:
        try:
            result = build(
                self.db_path,
                self.n_trees,
                wait=False,
                n_jobs=self.n_jobs,
                segment_min=self.segment_min,
                dead_share=self.dead_share,
            )
            if result["built"] is not None:
                self.builds.append(result)
        except Exception:  # the exact search still answers; the next check tries again
            log.exception("building the similar-images index for %s failed", self.db_path)


def _search():
    return importlib.import_module(".search", __package__)


# The searcher and the matches table have their own modules; the plugin, the CLI and other
# modules import these names from here, so they stay importable (loaded on first use:
# search.py imports this module).
_ELSEWHERE = {
    "open_index": "search",
    "Searcher": "search",
    "register_functions": "search",
    "search_k_for": "search",
    "MAX_K": "search",
    "update_matches": "matches",
}


def __getattr__(name: str):
    if name in _ELSEWHERE:
        return getattr(importlib.import_module(f".{_ELSEWHERE[name]}", __package__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
