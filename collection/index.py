"""Similar images: an Annoy file that is always current, ``matches`` kept in SQL, SQL functions.

The Annoy file (``<db>.annoy``) is derived and disposable. It is built into a
temporary file and ``os.replace``d, so a reader that has the old one loaded keeps
a valid mapping, notices the new file (inode / mtime) and opens it on its next
query. ``collection_meta`` says what the file covers: every live vector with no
entry in the ``vector_changes`` log (filled by triggers, see store.m003_matches)
after ``index_seq``. Vectors changed since - new, re-embedded, back from the
deleted - are searched exactly with numpy and merged with Annoy's answers, so an
image can be found the moment its row is committed. Every candidate is checked
against the database and scored by the dot product of the stored vectors (the
exact cosine; Annoy's angular distance d would give 1 - d²/2), so a deleted image
is never returned and both halves rank on the same scale.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from annoy import AnnoyIndex

from .store import Store, decode, now

# Chosen with bench/similar.py: on clustered 2048-d vectors, recall@10 0.97 at 100k
# (search_k 2000) and 0.94 at 1M (search_k 10,000), p99 under 10 ms of CPU per query.
N_TREES = 50
SEARCH_K = 2000  # Annoy candidates looked at per query, at the least ...
SEARCH_SHARE = 0.01  # ... or this share of the indexed images, whichever is more
SEED = 0
MATCHES_K = 10
MIN_SCORE = 0.0
# A new image enters an older image's top-k only if that image is among the new one's
# nearest REVERSE_REACH: exact for any image that is not an outlier far from the rest.
REVERSE_REACH = 100
# Rebuild once the vectors outside the file reach REBUILD_SHARE of the collection or
# REBUILD_COUNT, whichever comes first; below REBUILD_MIN the exact search is cheaper.
REBUILD_SHARE = 0.1
REBUILD_COUNT = 2000
REBUILD_MIN = 1000
_SETTLE = (20, 0.01)  # tries, seconds apart, for a builder to commit the file it just placed

log = logging.getLogger(__name__)


def index_path(db_path: str | Path) -> Path:
    return Path(f"{db_path}.annoy")


def search_k_for(items: int) -> int:
    """How many candidates Annoy looks at per query in an index of ``items``."""
    return max(SEARCH_K, int(SEARCH_SHARE * items))


def _identity(path: Path) -> str | None:
    """Which file is at ``path`` now: a replaced file has a new inode and mtime."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _meta(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute("select key, value from collection_meta"))


def _last_change(conn: sqlite3.Connection) -> int:
    """The newest seq ever given out in the change log (pruned entries included)."""
    row = conn.execute("select seq from sqlite_sequence where name = 'vector_changes'").fetchone()
    return row[0] if row else 0


def _marks(values) -> str:
    return ", ".join("?" * len(values))


def _prune_changes(conn: sqlite3.Connection) -> None:
    """Drop log entries that both the Annoy file and ``matches`` have taken in. Without
    a file nothing goes: readers then tell changed vectors apart by their newest entry."""
    meta = _meta(conn)
    if "matches_seq" in meta and "index_file" in meta and meta.get("index_model") == meta.get("model"):
        upto = min(int(meta["matches_seq"]), int(meta["index_seq"]))
        conn.execute("delete from vector_changes where seq <= ?", [upto])


# --- building -------------------------------------------------------------------


def build(db_path: str | Path, n_trees: int = N_TREES, seed: int = SEED) -> dict:
    """Build the Annoy file from the live vectors, put it in place and record it.

    Safe beside a running writer and readers: it reads one snapshot, builds into a
    temporary file, and replaces the old file and its record in one write transaction.
    """
    started = time.perf_counter()
    target = index_path(db_path)
    conn = sqlite3.connect(db_path, timeout=30, isolation_level=None)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        conn.execute("begin")  # one snapshot: the log position and the vectors agree
        meta = _meta(conn)
        seq = _last_change(conn)
        annoy, items, max_id, dimensions = None, 0, 0, None
        rows = conn.execute(
            "select v.image_id, v.vector from vectors v join images i on i.id = v.image_id "
            "where i.deleted_at is null and v.model = ? order by v.image_id",
            [meta.get("model")],
        )
        for image_id, blob in rows:
            if annoy is None:
                dimensions = len(blob) // 4
                annoy = AnnoyIndex(dimensions, "angular")
                annoy.set_seed(seed)
                annoy.on_disk_build(tmp)  # items go to the file, not to memory
            annoy.add_item(image_id, decode(blob).tolist())  # a list is 2x faster to add
            items, max_id = items + 1, image_id
        conn.execute("commit")
        if annoy is not None:
            # One thread (the GIL is released meanwhile): threads would add the trees in any
            # order, and one seed should give one file. It also leaves a core to the ingest.
            annoy.build(n_trees, n_jobs=1)
            annoy.unload()
        conn.execute("begin immediate")  # one builder at a time swaps the file and its record
        try:
            if annoy is not None:
                os.replace(tmp, target)
            else:
                target.unlink(missing_ok=True)  # an empty collection has no file
            record = {
                "index_model": meta.get("model"),
                "index_dimensions": dimensions,
                "index_items": items,
                "index_max_id": max_id,
                "index_seq": seq,
                "index_n_trees": n_trees,
                "index_seed": seed,
                "index_built_at": now(),
                "index_seconds": round(time.perf_counter() - started, 3),
                "index_file": _identity(target),
            }
            conn.execute("delete from collection_meta where key like 'index\\_%' escape '\\'")
            conn.executemany(
                "insert into collection_meta (key, value) values (?, ?)",
                [(key, str(value)) for key, value in record.items() if value is not None],
            )
            _prune_changes(conn)
            conn.execute("commit")
        except BaseException:
            conn.execute("rollback")
            raise
    finally:
        conn.close()
        Path(tmp).unlink(missing_ok=True)
    size = target.stat().st_size if annoy is not None else 0
    return {**record, "path": str(target), "size": size}


def needs_rebuild(
    indexed: int,
    unindexed: int,
    share: float = REBUILD_SHARE,
    count: int = REBUILD_COUNT,
    minimum: int = REBUILD_MIN,
) -> bool:
    return unindexed > 0 and unindexed >= max(minimum, min(count, share * (indexed + unindexed)))


class Indexer:
    """Keeps the Annoy file current for the process that writes the collection.

    Call ``check()`` after each committed batch: it starts a rebuild in a background
    thread once the unindexed remainder passes the threshold, one build at a time.
    Queries stay exact and current meanwhile; ``join()`` before the process exits.
    """

    def __init__(
        self,
        db_path: str | Path,
        n_trees: int = N_TREES,
        share: float = REBUILD_SHARE,
        count: int = REBUILD_COUNT,
        minimum: int = REBUILD_MIN,
    ):
        self.db_path = str(db_path)
        self.n_trees = n_trees
        self.threshold = {"share": share, "count": count, "minimum": minimum}
        self.builds: list[dict] = []
        self._thread: threading.Thread | None = None

    def check(self) -> bool:
        """Start a rebuild if one is due and none is running; True when one started."""
        if self._thread is not None and self._thread.is_alive():
            return False
        status = open_index(self.db_path).status()
        if not needs_rebuild(status["indexed"], status["unindexed"], **self.threshold):
            return False
        self._thread = threading.Thread(target=self._build, name="annoy-build", daemon=True)
        self._thread.start()
        return True

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _build(self) -> None:
        try:
            self.builds.append(build(self.db_path, self.n_trees))
        except Exception:  # the exact search still answers; the next check tries again
            log.exception("rebuilding the similar-images index for %s failed", self.db_path)


# --- searching ------------------------------------------------------------------


class Searcher:
    """Similar-image queries on one database: its Annoy file plus an exact search over
    the vectors the file does not cover. Thread-safe, with its own read-only connection."""

    def __init__(self, db_path: str | Path, search_k: int | None = None):
        self.db_path = Path(db_path)
        self.path = index_path(db_path)
        self.search_k = search_k  # None: search_k_for(the file's items)
        self.inode = os.stat(self.db_path).st_ino
        self.closed = False
        self._conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None, check_same_thread=False)
        self._conn.execute("pragma query_only = 1")
        self._lock = threading.Lock()
        self._seen: tuple | None = None  # (data_version, file identity) last refreshed at
        self._meta: dict[str, str] = {}
        self._annoy: AnnoyIndex | None = None
        self._loaded: str | None = None  # identity of the file in self._annoy
        self._seq = 0  # the log position the loaded file covers
        self._keep({}, {})  # the remainder: id -> newest change seq, id -> vector

    def close(self) -> None:
        with self._lock:
            self._drop_index()
            self._conn.close()
            self.closed = True

    # --- public queries ---

    def similar(
        self, image_id: int, k: int = MATCHES_K, min_score: float = MIN_SCORE
    ) -> list[tuple[int, float]]:
        """The ``k`` live images most like ``image_id``, best first, as (id, cosine).
        Raises KeyError when the image is not in the collection (or deleted)."""
        image_id = int(image_id)
        with self._snapshot():
            vector = self._vector(image_id)
            if vector is None:
                raise KeyError(image_id)
            return self._search(vector, k, min_score, exclude=image_id)

    def similar_to_vector(
        self, vector, k: int = MATCHES_K, min_score: float = MIN_SCORE
    ) -> list[tuple[int, float]]:
        """The ``k`` live images most like a vector from the database's model."""
        vector = np.asarray(vector, np.float32).ravel()
        vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
        with self._snapshot():
            dimensions = int(self._meta.get("dimensions") or len(vector))
            if len(vector) != dimensions:
                raise ValueError(f"a {len(vector)}-d vector for a collection of {dimensions}-d ones")
            return self._search(vector, k, min_score, exclude=None)

    def similarity(self, id_a: int, id_b: int) -> float | None:
        """Cosine similarity of two live images; None when either is missing or deleted."""
        with self._snapshot():
            a, b = self._vector(int(id_a)), self._vector(int(id_b))
            return None if a is None or b is None else float(np.dot(a, b))

    def status(self) -> dict:
        with self._snapshot():
            meta = self._meta if self._annoy is not None else {}
            return {
                "model": self._meta.get("model"),
                "indexed": int(meta.get("index_items", 0)),
                "unindexed": len(self._ids),
                "built_at": meta.get("index_built_at"),
                "n_trees": int(meta["index_n_trees"]) if meta else None,
                "path": str(self.path),
            }

    # --- keeping up with the database and the file ---

    @contextmanager
    def _snapshot(self) -> Iterator[None]:
        """Hold the lock and one read transaction, refreshed against the latest commit."""
        tries, pause = _SETTLE
        with self._lock:
            for attempt in range(tries):
                self._conn.execute("begin")
                try:
                    ready = self._refresh(settled=attempt == tries - 1)
                except BaseException:
                    self._conn.execute("rollback")
                    raise
                if ready:
                    break
                self._conn.execute("rollback")
                time.sleep(pause)
            try:
                yield
            finally:
                self._conn.execute("rollback")  # read only: nothing to keep

    def _refresh(self, settled: bool) -> bool:
        """Load what changed since the last query. False while a builder has put a new
        file in place but not yet committed its record (unless ``settled``: then go on
        without the file, exactly)."""
        meta = _meta(self._conn)  # the first read fixes the snapshot
        seen = (self._conn.execute("pragma data_version").fetchone()[0], _identity(self.path))
        if seen == self._seen:
            return True
        self._meta = meta
        wanted = meta.get("index_file") if meta.get("index_model") == meta.get("model") else None
        if wanted is None:
            if self._annoy is not None:
                self._drop_index()
        elif wanted != self._loaded:
            annoy = self._open_file(wanted) if seen[1] == wanted else None
            if annoy is None and seen[1] is not None and not settled:
                return False
            # Without the file the record describes (gone, or never committed), search
            # exactly, re-reading the remainder whenever the database changes.
            self._drop_index()
            if annoy is not None:
                self._annoy, self._loaded, self._seq = annoy, wanted, int(meta["index_seq"])
        self._load_remainder()
        self._seen = seen
        return True

    def _open_file(self, identity: str) -> AnnoyIndex | None:
        annoy = AnnoyIndex(int(self._meta["index_dimensions"]), "angular")
        try:
            annoy.load(str(self.path))
        except OSError:
            return None
        if _identity(self.path) != identity:  # replaced again while loading
            annoy.unload()
            return None
        return annoy

    def _drop_index(self) -> None:
        """Forget the file and the remainder read against it."""
        if self._annoy is not None:
            self._annoy.unload()
        self._annoy, self._loaded, self._seq = None, None, 0
        self._keep({}, {})

    def _load_remainder(self) -> None:
        """The live vectors outside the loaded file (all of them without one), read only
        when new or changed since the last refresh."""
        if self._annoy is None:
            rows = self._conn.execute(
                "select v.image_id, (select coalesce(max(seq), 0) from vector_changes c "
                "where c.image_id = v.image_id) from vectors v join images i on i.id = v.image_id "
                "where i.deleted_at is null and v.model = ?",
                [self._meta.get("model")],
            )
        else:
            rows = self._conn.execute(
                "select c.image_id, max(c.seq) from vector_changes c "
                "join images i on i.id = c.image_id join vectors v on v.image_id = c.image_id "
                "where c.seq > ? and i.deleted_at is null and v.model = ? group by c.image_id",
                [self._seq, self._meta.get("model")],
            )
        fresh = dict(rows.fetchall())
        stale = [i for i, seq in fresh.items() if self._fresh.get(i) != seq]
        if not stale and fresh.keys() == self._fresh.keys():
            return
        vectors = {i: v for i, v in self._vectors.items() if i in fresh}
        for start in range(0, len(stale), 500):
            chunk = stale[start : start + 500]
            for image_id, blob in self._conn.execute(
                f"select image_id, vector from vectors where image_id in ({_marks(chunk)})", chunk
            ):
                vectors[image_id] = decode(blob)
        self._keep(fresh, vectors)

    def _keep(self, fresh: dict[int, int], vectors: dict[int, np.ndarray]) -> None:
        self._fresh, self._vectors = fresh, vectors
        self._ids = np.fromiter(vectors, np.int64, len(vectors))
        self._matrix = np.stack(list(vectors.values())) if vectors else np.zeros((0, 0), np.float32)

    # --- the search ---

    def _vector(self, image_id: int) -> np.ndarray | None:
        if image_id in self._vectors:
            return self._vectors[image_id]
        row = self._conn.execute(
            "select v.vector from vectors v join images i on i.id = v.image_id "
            "where v.image_id = ? and i.deleted_at is null and v.model = ?",
            [image_id, self._meta.get("model")],
        ).fetchone()
        return decode(row[0]) if row else None

    def _search(
        self, vector: np.ndarray, k: int, min_score: float, exclude: int | None
    ) -> list[tuple[int, float]]:
        want = k + 1  # room for the query image itself
        found: dict[int, float] = {}
        if len(self._ids):
            scores = self._matrix @ vector
            top = np.argpartition(-scores, want - 1)[:want] if len(scores) > want else range(len(scores))
            found.update((int(self._ids[i]), float(scores[i])) for i in top)
        if self._annoy is not None:
            found.update(self._search_index(vector, want))
        found.pop(exclude, None)
        ranked = sorted((-score, image_id) for image_id, score in found.items() if score >= min_score)
        return [(image_id, -negative) for negative, image_id in ranked[:k]]

    def _search_index(self, vector: np.ndarray, want: int) -> dict[int, float]:
        """Annoy's nearest that are still live and unchanged since the build, scored exactly."""
        n = want
        while True:
            search_k = self.search_k or search_k_for(int(self._meta["index_items"]))
            search_k = max(search_k, n * int(self._meta["index_n_trees"]))
            candidates = self._annoy.get_nns_by_vector(vector.tolist(), n, search_k=search_k)
            rows = self._conn.execute(
                "select v.image_id, v.vector from vectors v join images i on i.id = v.image_id "
                f"where v.image_id in ({_marks(candidates)}) and i.deleted_at is null "
                "and not exists (select 1 from vector_changes c where c.image_id = v.image_id "
                "and c.seq > ?)",
                [*candidates, self._seq],
            ).fetchall()
            # Deleted or changed images crowd the answer: ask for more until enough remain.
            if len(rows) >= want or len(candidates) < n:
                break
            n *= 4
        if not rows:
            return {}
        scores = np.stack([decode(blob) for _, blob in rows]) @ vector
        return {image_id: float(score) for (image_id, _), score in zip(rows, scores)}


_searchers: dict[str, Searcher] = {}
_searchers_lock = threading.Lock()


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


# --- matches ----------------------------------------------------------------------


def update_matches(
    store: Store,
    new_ids: Iterable[int] = (),
    deleted_ids: Iterable[int] = (),
    k: int = MATCHES_K,
    min_score: float = MIN_SCORE,
) -> int:
    """Bring the ``matches`` table up to date after committed writes; returns how many
    images' lists were rewritten.

    New and changed images get their own top-k; older images whose top-k a new one
    enters take it in; lists that named a deleted or changed image are refilled. The
    ids given are joined by every id the change log names since the last call, so a
    change made elsewhere (a move that dropped a row, another process) is caught too.
    Call it after the writes are committed: the searcher reads through its own
    connection. The first call on a database fills every list (``rebuild_matches``).
    """
    db = store.db
    done = store.get_meta("matches_seq")
    if done is None:
        return rebuild_matches(store, k, min_score)
    upto = _last_change(db.conn)
    changed = {int(i) for i in (*new_ids, *deleted_ids)}
    changed.update(r[0] for r in db.execute("select image_id from vector_changes where seq > ?", [int(done)]))
    if not changed:
        return 0
    ids = sorted(changed)
    listing = {
        r[0] for r in db.execute(f"select image_id from matches where match_id in ({_marks(ids)})", ids)
    }
    searcher = open_index(store.path)
    lists: dict[int, list[tuple[int, float]]] = {}
    reach: dict[int, list[tuple[int, float]]] = {}
    for image_id in sorted(changed | listing):
        try:
            found = searcher.similar(image_id, max(k, REVERSE_REACH) if image_id in changed else k, min_score)
        except KeyError:  # deleted: its own list goes
            continue
        lists[image_id] = found[:k]
        if image_id in changed:
            reach[image_id] = found
    with db.atomic():
        redo = sorted(changed | listing)
        db.execute(f"delete from matches where image_id in ({_marks(redo)})", redo)
        for image_id, found in lists.items():
            _write_list(db, image_id, found)
        merged = set()
        for new_id, found in reach.items():
            for other, score in found:
                if other not in lists and _take_in(db, other, new_id, score, k):
                    merged.add(other)
        _finish_matches(store, upto)
    return len(lists) + len(merged)


def rebuild_matches(store: Store, k: int = MATCHES_K, min_score: float = MIN_SCORE) -> int:
    """Recompute every live image's list from scratch; returns how many were written."""
    db = store.db
    upto = _last_change(db.conn)
    searcher = open_index(store.path)
    ids = [
        r[0]
        for r in db.execute(
            "select v.image_id from vectors v join images i on i.id = v.image_id "
            "where i.deleted_at is null order by v.image_id"
        )
    ]
    lists = {}
    for image_id in ids:
        try:
            lists[image_id] = searcher.similar(image_id, k, min_score)
        except KeyError:  # deleted since: the log brings it to the next update
            pass
    with db.atomic():
        db.execute("delete from matches")
        for image_id, found in lists.items():
            _write_list(db, image_id, found)
        _finish_matches(store, upto)
    return len(lists)


def _write_list(db, image_id: int, found: list[tuple[int, float]]) -> None:
    db.conn.executemany(
        "insert into matches (image_id, match_id, rank, score) values (?, ?, ?, ?)",
        [(image_id, match_id, rank, score) for rank, (match_id, score) in enumerate(found, start=1)],
    )


def _take_in(db, image_id: int, new_id: int, score: float, k: int) -> bool:
    """Put ``new_id`` into ``image_id``'s list if it ranks within the top k there."""
    current = [
        (match_id, s)
        for match_id, s in db.execute(
            "select match_id, score from matches where image_id = ? order by rank", [image_id]
        )
        if match_id != new_id
    ]
    if len(current) >= k and (-score, new_id) > (-current[-1][1], current[-1][0]):
        return False
    found = sorted([*current, (new_id, score)], key=lambda pair: (-pair[1], pair[0]))[:k]
    db.execute("delete from matches where image_id = ?", [image_id])
    _write_list(db, image_id, found)
    return True


def _finish_matches(store: Store, upto: int) -> None:
    done = store.get_meta("matches_seq")
    store.set_meta("matches_seq", max(upto, int(done or 0)))
    _prune_changes(store.db.conn)


# --- SQL functions ------------------------------------------------------------------


def register_functions(conn: sqlite3.Connection, db_path: str | Path) -> None:
    """``similar_images(image_id[, k[, min_score]])``: a JSON array of {"id", "score"}
    for ``json_each``; ``image_similarity(id_a, id_b)``: cosine, NULL when either is
    missing. Both query a Searcher with its own connection, never ``conn`` itself."""

    def similar_images(image_id, k=MATCHES_K, min_score=MIN_SCORE):
        if image_id is None:
            return None
        try:
            found = open_index(db_path).similar(int(image_id), int(k), float(min_score))
        except KeyError:
            return None
        return json.dumps([{"id": match_id, "score": score} for match_id, score in found])

    def image_similarity(id_a, id_b):
        if id_a is None or id_b is None:
            return None
        return open_index(db_path).similarity(int(id_a), int(id_b))

    for arguments in (1, 2, 3):
        conn.create_function("similar_images", arguments, similar_images)
    conn.create_function("image_similarity", 2, image_similarity)
