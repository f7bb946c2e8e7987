"""Similar-image queries: every index segment plus an exact search over the tail, merged
and rescored; the SQL functions that expose them.

The tail is the live vectors changed after the log position the index covers
(``index_seq``, see index.py). A Searcher keeps it in memory and brings it up to date
from the ``vector_changes`` log on each query after a commit, reading only the vectors
changed since its last look, so a batch costs the searcher what the batch holds and an
image can be found the moment its row is committed. Every candidate a segment gives is
checked against the database and scored by the dot product of its stored vector (the
exact cosine; Annoy's angular distance d would give 1 - d²/2), so a deleted image is never
returned, a stale copy in an older segment cannot rank an image wrongly, and segments and
tail rank on one scale.
"""

from __future__ import annotations

import heapq
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from annoy import AnnoyIndex

from .index import contains, index_path, last_change, load_ids, meta, segments_of
from .store import decode

# The most neighbours one query returns: the CLI, the SQL functions and the pages all cap
# k here, so no request can make a query cost more than this many results' work.
MAX_K = 100
MATCHES_K = 10
MIN_SCORE = 0.0
# Neighbours the upkeep after a batch asks for per new or changed image: matches' reverse
# reach (matches.py) and duplicates' first look (duplicates.py) ask this many, so that
# one remembered search (REMEMBERED) serves both.
NEIGHBOURHOOD = 100
# Candidates Annoy looks at per segment and query, at the least ... (bench/similar.py:
# a query asks every segment, so small ones must be cheap)
SEARCH_K = 1000
SEARCH_SHARE = 0.02  # ... or this share of the segment's items, whichever is more
# Candidates a segment of reduced vectors (index.REDUCED_DIMENSIONS) gives per query, all
# rescored by their full vectors.
RERANK = 50
# Without any segment (a collection from before the index, until its first build ends)
# the searcher keeps up to this many live vectors in memory; past it, each query reads
# them from SQLite STREAM_CHUNK at a time, so memory stays bounded at a million images
# (slow queries, for the minutes until the build the Indexer starts at once is done).
STREAM_FROM = 20_000
STREAM_CHUNK = 4096
_RETRIES = (20, 0.01)  # tries, seconds apart, when a build replaces files mid-refresh


# Live vectors of the model for a JSON array of ids. The ids drive the plan (a list
# subquery, then primary-key lookups): a join on json_each would scan every live image.
# Every live image's vector of the collection's model (bind the model): the rows the
# tail, the streamed search and their counts read.
_EVERY_LIVE = "from vectors v join images i on i.id = v.image_id where i.deleted_at is null and v.model = ?"
_LIVE_VECTORS = (
    "select v.image_id, v.vector from vectors v join images i on i.id = v.image_id "
    "where v.image_id in (select value from json_each(?)) and i.deleted_at is null and v.model = ?"
)

# Each changed image's newest change after a log position. NOT INDEXED keeps SQLite on the
# primary key's range: left alone it scans the whole (image_id, seq) index to group by.
_CHANGED_SINCE = "select image_id, max(seq) from vector_changes not indexed where seq > ? group by image_id"


def search_k_for(items: int) -> int:
    """How many candidates Annoy looks at per query in a segment of ``items``."""
    return max(SEARCH_K, int(SEARCH_SHARE * items))


def check_k(k) -> int:
    """``k`` as a whole number of at least 1, or a ValueError that says so. The cap at
    MAX_K is for what a user asks (CLI, SQL, pages); code such as duplicates.py may ask
    for more."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a whole number of at least 1, not {k!r}")
    return int(k)


@dataclass
class Segment:
    """One loaded segment: its record, its Annoy file, its sorted ids."""

    record: dict
    annoy: AnnoyIndex
    ids: np.ndarray
    reduction: np.ndarray | None = None  # (d, reduced): the segment's PCA, when it has one
    vectors: np.ndarray | None = None  # its full vectors in the ids' order, memory-mapped


class Tail:
    """The tail's vectors in a matrix that grows by doubling, so taking in a batch costs
    the batch. Rows change in place only for copies no search still reads (see ``view``)."""

    def __init__(self, dimensions: int = 0):
        self.ids = np.full(16, -1, np.int64)
        self.matrix = np.zeros((16, dimensions), np.float32)
        self.used = 0
        self.slot: dict[int, int] = {}
        self.seq: dict[int, int] = {}
        self._shared = False  # a view handed out points at the arrays

    def __len__(self) -> int:
        return len(self.slot)

    def put(self, image_id: int, vector: np.ndarray, seq: int) -> None:
        if self.matrix.shape[1] != len(vector):
            if self.slot:
                raise ValueError(f"a {len(vector)}-d vector among {self.matrix.shape[1]}-d ones")
            self.matrix = np.zeros((len(self.ids), len(vector)), np.float32)
        slot = self.slot.get(image_id)
        if slot is None:
            if self.used == len(self.ids):
                self._resize(2 * len(self.ids))
            slot, self.used = self.used, self.used + 1
            self.slot[image_id] = slot
        else:
            self._own()
        self.ids[slot], self.matrix[slot], self.seq[image_id] = image_id, vector, seq

    def drop(self, image_id: int) -> None:
        slot = self.slot.pop(image_id, None)
        self.seq.pop(image_id, None)
        if slot is not None:
            self._own()
            self.ids[slot] = -1
            self.matrix[slot] = 0

    def drop_upto(self, seq: int) -> None:
        """Forget vectors changed at or before ``seq``: a segment now holds them."""
        for image_id in [i for i, s in self.seq.items() if s <= seq]:
            self.drop(image_id)
        if self.used > 64 and len(self.slot) < self.used // 4:
            self._resize(max(16, 2 * len(self.slot)))

    def view(self) -> tuple[np.ndarray, np.ndarray]:
        """The ids and matrix as they are now, for a search that runs outside the lock."""
        self._shared = True
        return self.ids[: self.used], self.matrix[: self.used]

    def _own(self) -> None:
        if self._shared:  # copy on write: a search may be reading the old arrays
            self.ids, self.matrix, self._shared = self.ids.copy(), self.matrix.copy(), False

    def _resize(self, capacity: int) -> None:
        live = [(i, s) for i, s in self.slot.items()]
        ids = np.full(capacity, -1, np.int64)
        matrix = np.zeros((capacity, self.matrix.shape[1]), np.float32)
        for new, (image_id, old) in enumerate(live):
            ids[new], matrix[new] = image_id, self.matrix[old]
        self.slot = {image_id: new for new, (image_id, _) in enumerate(live)}
        self.ids, self.matrix, self.used, self._shared = ids, matrix, len(live), False


@dataclass(frozen=True)
class State:
    """What one query searches: taken under the lock, searched outside it."""

    model: str | None
    dimensions: int | None
    segments: tuple[Segment, ...]
    tail_ids: np.ndarray
    tail_matrix: np.ndarray
    skip: frozenset[int]  # ids whose segment copies are stale: the tail has them, or they are gone
    superseded: int  # how many of them have a copy in a segment (dead since the last build)
    streamed: bool = False  # no segments and too many vectors to hold: read them per query
    # What the answers depend on: segments, the log read so far. A commit that changed no
    # vector (matches, duplicates, the map) gives a new State with the same contents.
    contents: tuple = ()


# Answers remembered per image for the state they were found in: after a batch, matches,
# duplicates and the map each ask about the same new images (bench/scale.py at 1M: three
# searches per image, 70 % of the upkeep). Entries are a few hundred bytes.
REMEMBERED = 2048
SEARCH_THREADS = min(4, os.cpu_count() or 1)  # similar_many's searches at once


class Searcher:
    """Similar-image queries on one database. Thread-safe: a lock guards only the refresh
    (milliseconds); the search itself runs on a snapshot, each thread with its own
    read-only connection."""

    def __init__(self, db_path: str | Path, search_k: int | None = None):
        self.db_path = Path(db_path)
        self.folder = index_path(db_path)
        self.search_k = search_k  # None: search_k_for(each segment's items)
        self.inode = os.stat(self.db_path).st_ino
        self.closed = False
        self.vectors_read = 0  # vectors read into the tail: a hook for tests and benchmarks
        self.vectors_streamed = 0  # vectors read by queries without segments (see STREAM_FROM)
        self._streamed = False
        self._lock = threading.Lock()
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._conn = self._connect()
        self._seen: int | None = None  # data_version last refreshed at
        self._record: dict[str, str] = {}
        self._loaded_key: tuple | None = None  # (model, index_segments) of self._segments
        self._segments: tuple[Segment, ...] = ()
        self._covered = 0  # the log position the segments cover
        self._read_upto = 0  # the log position the tail has read to
        self._tail = Tail()
        self._gone: dict[int, int] = {}  # changed after _covered and not live now: id -> seq
        self._state: State | None = None
        # image id -> (State.contents, want, found): see REMEMBERED
        self._remembered: dict[int, tuple[tuple, int, dict[int, float]]] = {}
        self.searches = 0  # searches run (remembered answers not counted): a hook for tests
        self._pool: ThreadPoolExecutor | None = None  # similar_many's threads, once asked

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
            self._segments, self._state = (), None  # unmapped when no search holds them
            for conn in self._connections:
                conn.close()
            self.closed = True

    # --- public queries ---

    def similar(self, image_id: int, k: int = MATCHES_K, min_score: float = MIN_SCORE) -> list[tuple[int, float]]:
        """The ``k`` live images most like ``image_id``, best first, as
        (id, cosine). Raises KeyError when the image is not in the collection (or deleted)."""
        k, image_id = check_k(k), int(image_id)
        found = self._answer(self._refresh(), image_id, k + 1)
        if found is None:
            raise KeyError(image_id)
        return _ranked(found, k, min_score, exclude=image_id)

    def similar_many(
        self, image_ids: Iterable[int], k: int = MATCHES_K, min_score: float = MIN_SCORE
    ) -> dict[int, list[tuple[int, float]]]:
        """``similar`` for each of ``image_ids`` (those not in the collection left out),
        on one state and SEARCH_THREADS at a time: Annoy lets go of the GIL, so the
        upkeep's searches after a batch take every core the model leaves."""
        k, ids = check_k(k), [int(i) for i in image_ids]
        state = self._refresh()
        if len(ids) > 1:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(SEARCH_THREADS, thread_name_prefix="search")
            answers = list(self._pool.map(lambda image_id: self._answer(state, image_id, k + 1), ids))
        else:
            answers = [self._answer(state, image_id, k + 1) for image_id in ids]
        return {
            image_id: _ranked(found, k, min_score, exclude=image_id)
            for image_id, found in zip(ids, answers)
            if found is not None
        }

    def similar_to_vector(self, vector, k: int = MATCHES_K, min_score: float = MIN_SCORE) -> list[tuple[int, float]]:
        """The ``k`` live images most like a vector from the database's model."""
        k = check_k(k)
        vector = np.asarray(vector, np.float32).ravel()
        vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        state = self._refresh()
        dimensions = state.dimensions or len(vector)
        if len(vector) != dimensions:
            raise ValueError(f"a {len(vector)}-d vector for a collection of {dimensions}-d ones")
        return _ranked(self._found(state, vector, k + 1), k, min_score, exclude=None)

    def similarity(self, id_a: int, id_b: int) -> float | None:
        """Cosine similarity of two live images; None when either is missing or deleted."""
        state = self._refresh()
        a, b = self._vector(state, int(id_a)), self._vector(state, int(id_b))
        return None if a is None or b is None else float(np.dot(a, b))

    @property
    def streamed(self) -> bool:
        """Whether queries read every vector from SQLite (no segment yet, past STREAM_FROM)."""
        return self._refresh().streamed

    def status(self) -> dict:
        """``indexed``: live images in the segments; ``unindexed``: the tail; ``dead``: copies
        in the segments of images deleted or embedded again since (compaction removes them)."""
        state = self._refresh()
        records = [s.record for s in state.segments]
        dead = sum(r["dead"] for r in records) + state.superseded
        items = sum(r["items"] for r in records)
        unindexed = len(state.tail_ids) - int(np.count_nonzero(state.tail_ids < 0))
        if state.streamed:
            unindexed = self._thread_conn().execute(f"select count(*) {_EVERY_LIVE}", [state.model]).fetchone()[0]
        return {
            "model": state.model,
            "indexed": max(0, items - dead),
            "unindexed": unindexed,
            "dead": dead,
            "segments": len(records),
            "built_at": self._record.get("index_built_at") if records else None,
            "n_trees": records[-1]["n_trees"] if records else None,
            "path": str(self.folder),
        }

    @contextmanager
    def held(self):
        """Within the block, this thread's queries answer from the state of its first query:
        commits made meanwhile by other threads wait for the next block. The upkeep after
        a batch holds one state, so that the answers its steps remember for each new image
        (REMEMBERED) are not voided by the next batch's commit while it works."""
        outer = getattr(self._local, "held", False)
        self._local.held = True
        try:
            yield self
        finally:
            if not outer:
                self._local.held = False
                self._local.state = None

    # --- keeping up with the database and the index ---

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("pragma query_only = 1")
        self._connections.append(conn)
        return conn

    def _thread_conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            with self._lock:
                conn = self._local.conn = self._connect()
        return conn

    def _refresh(self) -> State:
        """The state as of the latest commit, taking in only what changed since the last
        query; inside ``held``, the state this thread's first query there saw."""
        if getattr(self._local, "held", False):
            state = getattr(self._local, "state", None)
            if state is None:
                state = self._local.state = self._latest()
            return state
        return self._latest()

    def _latest(self) -> State:
        with self._lock:
            if self.closed:
                raise RuntimeError("the searcher is closed")
            version = self._conn.execute("pragma data_version").fetchone()[0]
            if version == self._seen and self._state is not None:
                return self._state
            tries, pause = _RETRIES
            for attempt in range(tries):
                self._conn.execute("begin")
                try:
                    if self._catch_up(settled=attempt == tries - 1):
                        break
                finally:
                    self._conn.execute("rollback")  # read only: nothing to keep
                time.sleep(pause)
            self._seen = version
            tail_ids, tail_matrix = self._tail.view()
            skip = frozenset(self._tail.slot) | frozenset(self._gone)
            self._state = State(
                self._record.get("model"),
                int(self._record["dimensions"]) if self._record.get("dimensions") else None,
                self._segments,
                tail_ids,
                tail_matrix,
                skip,
                self._superseded(skip),
                self._streamed,
                (self._loaded_key, self._covered, self._read_upto, self._streamed),
            )
            return self._state

    def _catch_up(self, settled: bool) -> bool:
        """Inside one read transaction: load a new set of segments if the record changed,
        then read the log since the last look. False when a segment file the record names
        is gone (a newer build replaced it after this snapshot began): try again."""
        self._record = record = meta(self._conn)  # the first read fixes the snapshot
        segments = segments_of(record)
        key = (record.get("model"), json.dumps(segments))
        if key != self._loaded_key:
            loaded = self._open_segments(segments)
            if loaded is None and not settled:
                return False
            self._swap(loaded or (), int(record.get("index_seq", 0)) if loaded else 0, key)
        if not self._streamed:
            self._read_log()
        return True

    def _open_segments(self, segments: list[dict]) -> tuple[Segment, ...] | None:
        loaded = []
        for record in segments:
            annoy = AnnoyIndex(int(record.get("reduced") or self._record["index_dimensions"]), "angular")
            try:
                annoy.load(str(self.folder / f"{record['name']}.annoy"))
                ids = np.asarray(load_ids(self.folder, record))
                reduction = np.load(self.folder / f"{record['name']}.pca.npy") if record.get("reduced") else None
                vectors = (
                    np.load(self.folder / f"{record['name']}.vectors.npy", mmap_mode="r")
                    if record.get("vectors")
                    else None  # built by an older version: candidates are read from SQLite
                )
            except OSError:
                annoy.unload()
                for segment in loaded:
                    segment.annoy.unload()
                return None
            loaded.append(Segment(record, annoy, ids, reduction, vectors))
        return tuple(loaded)

    def _swap(self, segments: tuple[Segment, ...], covered: int, key: tuple) -> None:
        """Search ``segments`` from now on. The tail keeps only what they do not cover;
        without segments it is every live vector, read afresh."""
        # The old ones are unmapped when the last search holding them (in its State) ends.
        self._segments, self._loaded_key = segments, key
        self._streamed = False
        if segments:
            self._covered = covered
            self._tail.drop_upto(covered)
            self._gone = {i: seq for i, seq in self._gone.items() if seq > covered}
            self._read_upto = max(self._read_upto, covered)
        else:
            self._covered, self._read_upto, self._tail, self._gone = 0, 0, Tail(), {}
            live = self._conn.execute(
                f"select count(*) from (select 1 {_EVERY_LIVE} limit ?)",
                [self._record.get("model"), STREAM_FROM + 1],
            ).fetchone()[0]
            # Too many to hold: queries read them from SQLite, and the tail (read from
            # the log position of the first segment once there is one) stays empty.
            self._streamed = live > STREAM_FROM
            if not self._streamed:
                self._read_all()

    def _read_all(self) -> None:
        """Without segments the tail is every live vector (once, at the first query or
        when the index goes away)."""
        self._read_upto = last_change(self._conn)
        rows = self._conn.execute(
            "select v.image_id, v.vector, (select coalesce(max(seq), 0) from vector_changes c "
            f"where c.image_id = v.image_id) {_EVERY_LIVE}",
            [self._record.get("model")],
        )
        for image_id, blob, seq in rows:
            self._tail.put(image_id, decode(blob), seq)
            self.vectors_read += 1

    def _read_log(self) -> None:
        """Take in the vectors changed since the last look: new and re-embedded ones into
        the tail, deleted ones out of it."""
        changed = dict(
            self._conn.execute(
                _CHANGED_SINCE,
                [self._read_upto],
            ).fetchall()
        )
        if not changed:
            return
        ids = list(changed)
        current = dict(
            self._conn.execute(
                _LIVE_VECTORS,
                [json.dumps(ids), self._record.get("model")],
            ).fetchall()
        )
        for image_id in ids:
            blob = current.get(image_id)
            if blob is None:
                self._tail.drop(image_id)
                self._gone[image_id] = changed[image_id]
            else:
                self._tail.put(image_id, decode(blob), changed[image_id])
                self._gone.pop(image_id, None)
                self.vectors_read += 1
        self._read_upto = max(self._read_upto, max(changed.values()))

    def _superseded(self, skip: frozenset[int]) -> int:
        """How many of ``skip`` have a copy in some segment: each such copy died after the build."""
        wanted = np.fromiter(skip, np.int64, len(skip))
        anywhere = np.zeros(len(wanted), bool)
        for segment in self._segments:
            anywhere |= contains(segment.ids, wanted)
        return int(np.count_nonzero(anywhere))

    # --- the search ---

    def _vector(self, state: State, image_id: int) -> np.ndarray | None:
        row = self._thread_conn().execute(
            "select v.vector from vectors v join images i on i.id = v.image_id "
            "where v.image_id = ? and i.deleted_at is null and v.model = ?",
            [image_id, state.model],
        ).fetchone()
        return decode(row[0]) if row else None

    def _answer(self, state: State, image_id: int, want: int) -> dict[int, float] | None:
        """The candidates for ``image_id``'s ``want`` nearest, remembered or searched (and
        then remembered); None when the image is not live."""
        found = self._recall(state, image_id, want)
        if found is None:
            vector = self._vector(state, image_id)
            if vector is None:
                return None
            found = self._found(state, vector, want)
            with self._lock:
                if len(self._remembered) >= REMEMBERED:
                    self._remembered.clear()
                self._remembered[image_id] = (state.contents, want, found)
        return found

    def _recall(self, state: State, image_id: int, want: int) -> dict[int, float] | None:
        """A remembered answer for ``image_id`` as good as a search for ``want`` now."""
        with self._lock:
            entry = self._remembered.get(image_id)
        if entry is not None and entry[0] == state.contents and entry[1] >= want:
            return entry[2]
        return None

    def _found(self, state: State, vector: np.ndarray, want: int) -> dict[int, float]:
        """Candidates for the ``want`` nearest (the query image itself among them) with
        their exact scores."""
        self.searches += 1
        found: dict[int, float] = {}
        if state.streamed:
            found.update(self._search_streamed(state, vector, want))
        if len(state.tail_ids):
            scores = state.tail_matrix @ vector
            scores[state.tail_ids < 0] = -np.inf
            top = np.argpartition(-scores, want - 1)[:want] if len(scores) > want else range(len(scores))
            found.update((int(state.tail_ids[i]), float(scores[i])) for i in top if state.tail_ids[i] >= 0)
        if state.segments:
            found.update(self._search_segments(state, vector, want))
        return found

    def _search_streamed(self, state: State, vector: np.ndarray, want: int) -> dict[int, float]:
        """Exact search over every live vector, read from SQLite STREAM_CHUNK at a time."""
        rows = self._thread_conn().execute(f"select v.image_id, v.vector {_EVERY_LIVE}", [state.model])
        best: list[tuple[float, int]] = []  # a min-heap of the best ``want``
        while chunk := rows.fetchmany(STREAM_CHUNK):
            self.vectors_streamed += len(chunk)
            scores = np.frombuffer(b"".join(blob for _, blob in chunk), "<f4").reshape(len(chunk), -1) @ vector
            top = np.argpartition(-scores, want - 1)[:want] if len(scores) > want else range(len(scores))
            for i in top:
                item = (float(scores[i]), chunk[i][0])
                if len(best) < want:
                    heapq.heappush(best, item)
                elif item > best[0]:
                    heapq.heapreplace(best, item)
        return {image_id: score for score, image_id in best}

    def _search_segments(self, state: State, vector: np.ndarray, want: int) -> dict[int, float]:
        """Each segment's nearest, stale and dead copies left out, rescored exactly from
        the stored vectors."""
        n = want
        queries = [
            (vector if segment.reduction is None else vector @ segment.reduction).tolist()
            for segment in state.segments
        ]
        while True:
            estimate: dict[int, float] = {}
            reranked: set[int] = set()
            scored: dict[int, float] = {}
            exhausted = True
            for segment, query in zip(state.segments, queries):
                search_k = self.search_k or search_k_for(segment.record["items"])
                search_k = max(search_k, n * segment.record["n_trees"])
                ask = n if segment.reduction is None else max(n, RERANK)
                ids, distances = segment.annoy.get_nns_by_vector(query, ask, search_k=search_k, include_distances=True)
                exhausted &= len(ids) < ask
                mine = [image_id for image_id in ids if image_id not in state.skip]
                if segment.vectors is not None:
                    # Every candidate scored by its full vector, from the segment's own copy:
                    # current, since the stale and the deleted are in state.skip.
                    if mine:
                        rows = np.searchsorted(segment.ids, mine)
                        order = np.argsort(rows)
                        scores = np.asarray(segment.vectors[rows[order]]) @ vector
                        scored.update((mine[i], float(score)) for i, score in zip(order, scores))
                    continue
                if segment.reduction is not None:
                    # Scores in a segment's own PCA rank only its own candidates (another
                    # PCA may not span the query's directions): each gives its best.
                    reranked.update(mine)
                    continue
                for image_id, distance in zip(ids, distances):
                    if image_id not in state.skip:
                        score = 1 - distance * distance / 2
                        if score > estimate.get(image_id, -2.0):
                            estimate[image_id] = score
            # Segments from before the vector copies: Annoy's score is exact for a current
            # copy of a full vector; a stale one (re-embedded into a newer segment) may rank
            # wrong, so rescore from SQLite twice as many as are wanted, with every
            # candidate of a reduced segment.
            candidates = sorted(reranked.union(heapq.nlargest(2 * n, estimate, key=estimate.__getitem__)))
            rows = []
            if candidates:
                rows = self._thread_conn().execute(
                    _LIVE_VECTORS,
                    [json.dumps(candidates), state.model],
                ).fetchall()
            # Deleted images crowd the answer until compaction: ask for more until enough remain.
            if len(rows) + len(scored) >= want or exhausted:
                break
            n *= 4
        if rows:
            scores = np.stack([decode(blob) for _, blob in rows]) @ vector
            scored.update((image_id, float(score)) for (image_id, _), score in zip(rows, scores))
        return scored


def _ranked(found: dict[int, float], k: int, min_score: float, exclude: int | None) -> list[tuple[int, float]]:
    ranked = sorted((-score, image_id) for image_id, score in found.items() if score >= min_score and image_id != exclude)
    return [(image_id, -negative) for negative, image_id in ranked[:k]]


_searchers: dict[str, Searcher] = {}
_searchers_lock = threading.Lock()


def one_blas_thread() -> None:
    """Run numpy's BLAS on one thread in this process. A query's products are small
    (the exact tail times one vector): spread over two busy cores, OpenBLAS took 18 ms
    for one that takes 0.16 ms on one thread. Call it in processes that serve queries
    and run upkeep (the server, the watcher, `collection add`), not in the model's."""
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency

    threadpool_limits(limits=1, user_api="blas")


def open_index(db_path: str | Path) -> Searcher:
    """The Searcher for a database, made once per path and process; cheap to call per request."""
    key = os.path.realpath(db_path)
    inode = os.stat(key).st_ino  # FileNotFoundError for a missing database
    with _searchers_lock:
        searcher = _searchers.get(key)
        if searcher is None or searcher.closed or searcher.inode != inode:  # a new database there
            if searcher is not None:
                searcher.close()
            searcher = _searchers[key] = Searcher(key)
        return searcher


# --- SQL functions ------------------------------------------------------------------


def register_functions(conn: sqlite3.Connection, db_path: str | Path) -> None:
    """``similar_images(image_id[, k[, min_score]])``: a JSON array of {"id", "score"}
    for ``json_each``, k capped at MAX_K, and an empty array for a k that is not a whole
    number of at least 1 (SQLite shows a function's own errors only as "user-defined
    function raised exception"); ``image_similarity(id_a, id_b)``: cosine, NULL when either
    is missing. Both query a Searcher with its own connection, never ``conn`` itself."""

    def similar_images(image_id, k=MATCHES_K, min_score=MIN_SCORE):
        if image_id is None:
            return None
        if not isinstance(k, int) or k < 1:
            return "[]"
        try:
            found = open_index(db_path).similar(int(image_id), min(k, MAX_K), float(min_score))
        except (KeyError, ValueError, TypeError):
            return None
        return json.dumps([{"id": match_id, "score": score} for match_id, score in found])

    def image_similarity(id_a, id_b):
        if id_a is None or id_b is None:
            return None
        return open_index(db_path).similarity(int(id_a), int(id_b))

    for arguments in (1, 2, 3):
        conn.create_function("similar_images", arguments, similar_images)
    conn.create_function("image_similarity", 2, image_similarity)
