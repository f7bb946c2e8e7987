"""The collection map: 2-D coordinates for every image, and the sprite atlases it is drawn from.

`project` lays out the vectors of all live images with PCA to 50 dimensions, then
t-SNE, and stores them in ``projection`` with coordinates in [0, 1]. Past TSNE_MAX
images t-SNE runs on a sample of that many and the rest go near their nearest sampled
neighbours; PCA alone is there when asked for. Between recomputes `place_new` puts each new
image at once near its nearest neighbours on the current map, marked ``placed``; once
enough has changed, `needs_refresh` says so and `refresh_in_background` recomputes.

The map page reads through `map_data` and `build_atlas`, which take a plain sqlite3
connection so Datasette can run them with ``execute_fn``.
"""

from __future__ import annotations

import io
import json
import math
import os
import sqlite3
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from .store import Store, drop_old_projection, make_projection_next, now, swap_projection

METHODS = ("auto", "tsne", "pca")  # what can be asked for; auto may also give "tsne-sample"
METHOD_NAMES = {
    "tsne": "t-SNE",
    "tsne-sample": "t-SNE on a sample (the rest placed near their neighbours)",
    "pca": "PCA",
}
# The most images auto gives to t-SNE; a larger collection's sample. bench/map.py, one
# thread of a busy 2-core machine: t-SNE of 1k images 4 s, 10k 69 s, 50k 590 s; at 50k a
# 10k sample and the rest placed 134 s. Of each image's 10 neighbours on the map, from its
# own cluster: t-SNE 100%, the sample 88%, PCA alone 3% (quick, but no map at that size).
TSNE_MAX = 10_000
TSNE_MIN = 10  # fewer points than this give t-SNE nothing to work with
PCA_DIMENSIONS = 50
PERPLEXITY = 30.0
CHUNK = 4096  # vectors read at a time while placing the images outside a sample
NEIGHBOURS = 10  # a new image goes to the weighted mean of this many nearest neighbours
SHARPNESS = 20.0  # neighbour weight exp(SHARPNESS * cosine): 0.05 closer counts e times more
REFRESH_FRACTION = 0.2  # recompute once placed + unplaced images exceed this share of the map
# OpenMP/BLAS threads for the layout. One: t-SNE's threads spin at every barrier while they
# wait for each other, so on cores with other work (the watcher's model, Datasette) two
# threads were 5x slower than one for 1k images (76 s vs 15 s) and 60x for 48 (17 s vs
# 0.3 s), measured on a busy 2-core machine. None uses every core: for an idle machine.
THREADS: int | None = 1

# A collection gets its first map from the watcher once it has this many images, so the
# map page has something to show soon after `collection start` (fewer make a poor map).
AUTO_MAP_MIN = 50
# Called with the number of stored vectors each read decodes, for tests to count: placing
# a batch reads the batch's own vectors, however large the collection.
on_vectors_read: Callable[[int], None] | None = None

# Rows of a recomputed map written per transaction (into the side table, see _write_map),
# so ingest waits at most one chunk's insert; on_map_write, a hook for tests, is called with
# the rows of each such transaction.
WRITE_CHUNK = 5_000
on_map_write: Callable[[int], None] | None = None

# Level of detail (map_data): the whole map's answer, the page's first data, carries at
# most FIRST_POINTS images, an even sample past that, so the first draw is quick at any
# size (at 1M images 50k points were 4 MB of JSON and 2 s); a zoomed-in box carries at
# most MAP_POINTS, enough for the images in view (the page asks for twice the view's
# width and height, and draws thumbnails below 1,500 in view).
FIRST_POINTS = 5_000
MAP_POINTS = 20_000

TILE = 64  # pixels a side of one thumbnail in an atlas
ATLAS_COLUMNS = 16
TILES_PER_ATLAS = ATLAS_COLUMNS * ATLAS_COLUMNS  # a 1024 x 1024 JPEG when full

_LIVE_VECTORS = (
    "from images join vectors on vectors.image_id = images.id where images.deleted_at is null"
)
# ... and not on the map with their current content: new, or changed since placed
_OFF_THE_MAP = (
    "not exists (select 1 from projection p where p.image_id = images.id "
    "and p.sha256 is images.sha256)"
)


class ProjectionError(Exception):
    """The map cannot be made as asked; the message says why."""


@dataclass
class Projection:
    method: str
    images: int
    placed: int  # images added while it was computed, placed near their neighbours
    seconds: float

    def line(self) -> str:
        name = METHOD_NAMES[self.method]
        extra = f"; {self.placed:,} added meanwhile were placed" if self.placed else ""
        return f"{self.images:,} images projected with {name} in {self.seconds:.1f} s{extra}"


# --- the layout -----------------------------------------------------------------------


def choose_method(method: str, count: int) -> str:
    if method not in METHODS:
        raise ProjectionError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    if count < TSNE_MIN:
        return "pca"
    if method == "auto":
        return "tsne" if count <= TSNE_MAX else "tsne-sample"
    return method


def layout(
    vectors: np.ndarray,
    method: str = "auto",
    perplexity: float = PERPLEXITY,
    seed: int = 0,
    threads: int | None = THREADS,
) -> tuple[np.ndarray, str]:
    """(n, 2) coordinates in [0, 1] for n L2-normalised vectors, and the method used.
    ``threads`` caps the OpenMP and BLAS threads (None: all cores)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    return layout_from(len(vectors), lambda rows: vectors[rows], method, perplexity, seed, threads)


def layout_from(
    count: int,
    read: Callable[[np.ndarray], np.ndarray],
    method: str = "auto",
    perplexity: float = PERPLEXITY,
    seed: int = 0,
    threads: int | None = THREADS,
) -> tuple[np.ndarray, str]:
    """`layout` of ``count`` vectors that ``read(rows)`` gives a few at a time (rows: sorted
    positions). Past TSNE_MAX the layout is fitted on a sample of that many and the rest
    are read CHUNK at a time, so memory stays bounded at a million images."""
    from sklearn.decomposition import PCA
    from threadpoolctl import threadpool_limits

    method = choose_method(method, count)
    if count == 1:
        return np.full((1, 2), 0.5), method
    everything = np.arange(count)
    sample = everything
    if count > TSNE_MAX and method != "tsne":
        sample = np.sort(np.random.default_rng(seed).choice(count, TSNE_MAX, replace=False))
    with threadpool_limits(limits=threads):
        fitted = read(sample)
        dims = min(2 if method == "pca" else PCA_DIMENSIONS, len(sample), fitted.shape[1])
        pca = PCA(dims, svd_solver="randomized", random_state=seed).fit(fitted)
        reduced = pca.transform(fitted)
        del fitted
        sample_xy = np.zeros((len(sample), 2))
        if method == "pca":
            sample_xy[:, : reduced.shape[1]] = reduced
        else:
            sample_xy = _tsne(reduced, perplexity, seed)
        points = np.zeros((count, 2))
        points[sample] = sample_xy
        rest = np.setdiff1d(everything, sample, assume_unique=True)
        for start in range(0, len(rest), CHUNK):
            rows = rest[start : start + CHUNK]
            part = pca.transform(read(rows))
            if method == "pca":
                points[rows, : part.shape[1]] = part
            else:
                points[rows] = _near_sample(part, reduced, sample_xy)
    return normalise(points), method


def _tsne(points: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    from sklearn.manifold import TSNE

    return TSNE(
        2,
        # sklearn refuses a perplexity of n or more; a third of n keeps small maps sane
        perplexity=min(perplexity, (len(points) - 1) / 3),
        init="pca",
        learning_rate="auto",
        random_state=seed,
    ).fit_transform(points)


def _near_sample(rest: np.ndarray, sample: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Map positions for ``rest`` near their nearest ``sample`` points (PCA coordinates of
    unit vectors: a squared distance d² stands for the cosine 1 - d²/2)."""
    norms = (sample**2).sum(axis=1)
    out = np.empty((len(rest), 2))
    for start in range(0, len(rest), 1024):  # 1024 x 10k distances at a time: 40 MB
        part = rest[start : start + 1024]
        d2 = (part**2).sum(axis=1)[:, None] + norms[None, :] - 2 * part @ sample.T
        top = np.argpartition(d2, NEIGHBOURS - 1, axis=1)[:, :NEIGHBOURS]
        cosines = 1 - np.take_along_axis(d2, top, axis=1) / 2
        out[start : start + 1024] = _weighted_mean(cosines, xy[top])
    return out


def _weighted_mean(cosines: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """(m, 2) positions from each point's neighbours: cosines (m, k), positions (m, k, 2)."""
    weights = np.exp(SHARPNESS * (cosines - cosines.max(axis=1, keepdims=True)))
    return (weights[:, :, None] * xy).sum(axis=1) / weights.sum(axis=1)[:, None]


def normalise(points: np.ndarray) -> np.ndarray:
    """Scale both axes by the same factor into [0, 1] (keeping the shape), centred."""
    points = points - points.min(axis=0)
    span = points.max()
    if span > 0:
        points = points / span
    return points + (1 - points.max(axis=0)) / 2


def spatial_order(points: np.ndarray) -> np.ndarray:
    """Each point's rank along a Z-order curve, so that an atlas of consecutive tiles
    holds neighbouring images and a zoomed-in view needs only a few atlases."""
    q = np.clip(points * 65535, 0, 65535).astype(np.uint64)

    def spread(v):  # interleave zeros between the 16 bits
        v = (v | (v << np.uint64(8))) & np.uint64(0x00FF00FF)
        v = (v | (v << np.uint64(4))) & np.uint64(0x0F0F0F0F)
        v = (v | (v << np.uint64(2))) & np.uint64(0x33333333)
        return (v | (v << np.uint64(1))) & np.uint64(0x55555555)

    codes = spread(q[:, 0]) | (spread(q[:, 1]) << np.uint64(1))
    ranks = np.empty(len(points), dtype=np.int64)
    ranks[np.argsort(codes, kind="stable")] = np.arange(len(points))
    return ranks


# --- computing and keeping the map --------------------------------------------------------


@contextmanager
def _write_lock(store: Store):
    """A transaction that holds the write lock before its first read, so what it reads
    (the map's version) cannot change before it writes; a deferred one would fail with
    SQLITE_BUSY instead. Inside a caller's transaction it is that transaction's savepoint."""
    if store.db.conn.in_transaction:
        with store.db.atomic():
            yield
        return
    store.db.conn.execute("begin immediate")
    try:
        yield
    except BaseException:
        store.db.conn.rollback()
        raise
    store.db.conn.commit()


def project(
    store: Store,
    method: str = "auto",
    perplexity: float = PERPLEXITY,
    echo: Callable[[str], None] | None = None,
    threads: int | None = THREADS,
    stopping: threading.Event | None = None,
) -> Projection:
    """Lay out every live image with a vector and replace the map with it. Once
    ``stopping`` is set it gives up (ProjectionError) at its next read or before writing,
    leaving the map as it was: a daemon that is asked to stop does not wait for a map."""
    echo = echo or (lambda message: None)

    def read(rows: np.ndarray) -> np.ndarray:
        _check(stopping)
        return _vectors_of(store, ids[rows])

    start = time.perf_counter()
    ids = np.fromiter(
        (row[0] for row in store.db.execute(f"select images.id {_LIVE_VECTORS} order by images.id")),
        dtype=np.int64,
    )
    if not len(ids):
        raise ProjectionError(f"no images with vectors in {store.path}: add some first")
    used = choose_method(method, len(ids))
    steps = {
        "pca": "PCA to 2 dimensions",
        "tsne": "PCA to 50 dimensions, then t-SNE",
        "tsne-sample": f"PCA to 50 dimensions, then t-SNE of {TSNE_MAX:,} of them, "
        "the rest placed near their neighbours",
    }[used]
    echo(f"Projecting {len(ids):,} images: {steps}")
    points, used = layout_from(
        len(ids), read, method, perplexity, threads=threads
    )
    tiles = spatial_order(points)
    seconds = time.perf_counter() - start
    writer = _write_map(store, ids, points, tiles, used, stopping)
    with _write_lock(store):
        _check(stopping)
        _check_writer(store, writer)
        # Short at any size: renames and a new side table; the old map goes after, in chunks.
        swap_projection(store.db.conn, uuid.uuid4().hex[:8])
        version = int(store.get_meta("projection_version") or 0) + 1
        for key, value in {
            "version": version,
            "method": used,
            "requested": method,
            "perplexity": perplexity,
            "at": now(),
            "images": len(ids),
            "seconds": round(seconds, 2),
        }.items():
            store.set_meta(f"projection_{key}", value)
        store.db.execute("delete from collection_meta where key = 'projection_writer'")
    drop_old_projection(store.db.conn)
    # The watcher may have added or changed images while the layout ran: place them now.
    late = [
        row[0] for row in store.db.execute(f"select images.id {_LIVE_VECTORS} and {_OFF_THE_MAP}")
    ]
    placed = place_new(store, late)
    return Projection(used, len(ids), placed, time.perf_counter() - start)


def _write_map(
    store: Store, ids: np.ndarray, points: np.ndarray, tiles: np.ndarray, method: str,
    stopping: threading.Event | None,
) -> str:
    """Write the new map into the side table ``projection_next``, WRITE_CHUNK rows per
    transaction, so ingest and place_new commit between them; the map page reads the old
    map until the swap. The side table is this recompute's alone: a recompute started
    later (another process) takes it over, and this one gives up at its next chunk."""
    writer = uuid.uuid4().hex
    with _write_lock(store):
        make_projection_next(store.db.conn, writer[:8])  # what a stopped recompute left goes
        store.set_meta("projection_writer", writer)
    for begin in range(0, len(ids), WRITE_CHUNK):
        _check(stopping)
        rows = [
            (int(image_id), method, float(x), float(y), int(tile))
            for image_id, (x, y), tile in zip(
                ids[begin : begin + WRITE_CHUNK], points[begin : begin + WRITE_CHUNK], tiles[begin : begin + WRITE_CHUNK]
            )
        ]
        with _write_lock(store):
            _check_writer(store, writer)
            store.db.conn.executemany(
                # an image deleted while the layout ran stays off the map (and the
                # triggers take one deleted from now on off the side table)
                "insert into projection_next (image_id, method, x, y, placed, tile, sha256) "
                "select ?1, ?2, ?3, ?4, 0, ?5, sha256 from images where id = ?1 and deleted_at is null",
                rows,
            )
        if on_map_write is not None:
            on_map_write(len(rows))
    return writer


def _check_writer(store: Store, writer: str) -> None:
    if store.get_meta("projection_writer") != writer:
        raise ProjectionError("another map recompute started meanwhile; it makes the map")


def _check(stopping: threading.Event | None) -> None:
    if stopping is not None and stopping.is_set():
        raise ProjectionError("stopped before the map was made")


def place_new(store: Store, image_ids: Iterable[int]) -> int:
    """Put each of ``image_ids`` on the current map at once, at the weighted mean of the
    positions of its nearest neighbours already on it (cosine over the stored vectors),
    marked placed. An image already on the map with the same content stays where it is.
    Does nothing while the collection has no map. Returns how many were placed."""
    ids = sorted({int(i) for i in image_ids})
    if not ids or store.get_meta("projection_version") is None:
        return 0
    for _ in range(3):  # again if a recompute replaced the map while we searched
        version = store.get_meta("projection_version")
        todo, vectors = _needing_place(store, ids)
        if not todo:
            return 0
        positions = _positions(store, todo, vectors)
        with _write_lock(store):
            if store.get_meta("projection_version") != version:
                continue
            method = store.get_meta("projection_method")
            next_tile = store.db.execute(
                "select coalesce(max(tile), -1) + 1 from projection"
            ).fetchone()[0]
            store.db["projection"].upsert_all(
                (
                    {
                        "image_id": image_id,
                        "method": method,
                        "x": float(x),
                        "y": float(y),
                        "placed": 1,
                        # a new tile: the old one, if any, shows the content it had before
                        "tile": next_tile + i,
                        "sha256": sha256,
                    }
                    for i, ((image_id, sha256), (x, y)) in enumerate(zip(todo, positions))
                ),
                pk="image_id",
            )
            return len(todo)
    return 0


def _needing_place(store: Store, ids: list[int]) -> tuple[list[tuple[int, str]], np.ndarray]:
    """Of ``ids``, the live images with a vector that are not on the map with this content."""
    todo, blobs = [], []
    for start in range(0, len(ids), 500):
        part = ids[start : start + 500]
        for image_id, sha256, blob in store.db.execute(
            f"select images.id, images.sha256, vectors.vector {_LIVE_VECTORS} "
            f"and images.id in ({','.join('?' * len(part))}) and {_OFF_THE_MAP}",
            part,
        ):
            todo.append((image_id, sha256))
            blobs.append(blob)
    if not todo:
        return [], np.empty((0, 0), dtype=np.float32)
    return todo, _decode(blobs)


def _vectors_of(store: Store, ids: np.ndarray) -> np.ndarray:
    """The stored vectors of ``ids``, in that order. One removed since the layout began
    reads as zeros: its row leaves the map's pages with its image."""
    blobs = dict(
        store.db.execute(
            "select image_id, vector from vectors where image_id in (select value from json_each(?))",
            [json.dumps(ids.tolist())],
        )
    )
    gone = bytes(len(next(iter(blobs.values()), b"")))
    return _decode([blobs.get(int(i), gone) for i in ids])


def _decode(blobs: list[bytes]) -> np.ndarray:
    if on_vectors_read is not None:
        on_vectors_read(len(blobs))
    return np.frombuffer(b"".join(blobs), "<f4").reshape(len(blobs), -1)


def _positions(store: Store, todo: list[tuple[int, str]], vectors: np.ndarray) -> np.ndarray:
    """Weighted mean positions of each vector's nearest neighbours on the map, found by
    the similar-image searcher: the work is per image placed, whatever the collection's size."""
    from .index import open_index  # not at import time: the map page imports this module

    searcher = open_index(store.path)
    skip = {image_id for image_id, _ in todo}
    # Neighbours placed in this same call are not on the map yet: ask for enough to spare.
    want = NEIGHBOURS + min(len(todo), NEIGHBOURS)

    def nearest(image_id: int, vector: np.ndarray) -> list[tuple[int, float]]:
        try:  # by id: after a batch, the searcher remembers matches' search for it
            return searcher.similar(image_id, want, -1.0)
        except KeyError:  # deleted meanwhile: by the vector read
            return searcher.similar_to_vector(vector, want, -1.0)

    found = [
        [(i, score) for i, score in nearest(image_id, vector) if i not in skip]
        for (image_id, _), vector in zip(todo, vectors)
    ]
    ids = sorted({i for neighbours in found for i, _ in neighbours})
    # Positions of the neighbours that are on the map (json_each: any number of ids).
    where = {
        row[0]: (row[1], row[2])
        for row in store.db.execute(
            "select p.image_id, p.x, p.y from json_each(?) j "
            "join projection p on p.image_id = j.value",
            [json.dumps(ids)],
        )
    }
    best = np.full((len(todo), NEIGHBOURS), -np.inf)
    best_xy = np.full((len(todo), NEIGHBOURS, 2), 0.5)
    for row, neighbours in enumerate(found):
        on_map = [(score, where[i]) for i, score in neighbours if i in where][:NEIGHBOURS]
        for column, (score, xy) in enumerate(on_map):
            best[row, column], best_xy[row, column] = score, xy
    # Without neighbours on the map (all of them gone) an image goes to the middle.
    return _weighted_mean(np.where(np.isfinite(best), best, -1e3), best_xy)


def summary(conn: sqlite3.Connection) -> dict | None:
    """What the map holds: None without one; else how it was made and how current it is."""
    meta = dict(
        conn.execute(
            "select key, value from collection_meta where key like 'projection\\_%' escape '\\'"
        )
    )
    if "projection_version" not in meta or not _has_projection_table(conn):
        return None
    # Counted in indexes (the map holds live images only, store.m009): quick at 1M images.
    counts = dict(conn.execute("select placed, count(*) from projection group by placed").fetchall())
    live = conn.execute("select count(*) from images where deleted_at is null").fetchone()[0]
    projected, placed = counts.get(0, 0), counts.get(1, 0)
    # Live images not on the map yet (an image whose content changed since it was placed
    # is still counted as on it until placed again, which the watcher does at once).
    unplaced = max(0, live - projected - placed)
    return {
        "version": int(meta["projection_version"]),
        "method": meta.get("projection_method"),
        "method_name": METHOD_NAMES.get(meta.get("projection_method"), "?"),
        "perplexity": float(meta.get("projection_perplexity") or PERPLEXITY),
        "at": meta.get("projection_at"),
        "seconds": float(meta.get("projection_seconds") or 0),
        "projected": projected,
        "placed": placed,
        "unplaced": unplaced,
    }


def needs_refresh(store: Store) -> bool:
    """Whether the map is due: none yet and AUTO_MAP_MIN images with vectors, or enough
    changed since it was computed (images placed since, plus images not on it yet, over
    REFRESH_FRACTION of it)."""
    state = summary(store.db.conn)
    if state is None:
        return _has_projection_table(store.db.conn) and store.db.execute(
            f"select count(*) >= ? from (select 1 {_LIVE_VECTORS} limit ?)",
            [AUTO_MAP_MIN, AUTO_MAP_MIN],
        ).fetchone()[0] == 1
    return state["placed"] + state["unplaced"] > REFRESH_FRACTION * max(state["projected"], 1)


_refreshing = threading.Lock()


def refresh_in_background(store: Store, stopping: threading.Event | None = None) -> threading.Thread | None:
    """Recompute the map in a daemon thread (with its own connection) when it needs it,
    as it was last asked for. None when nothing is due or a recompute is already running.
    Setting ``stopping`` makes the recompute give up without writing (see `project`);
    nobody joins the thread, so a stopping daemon exits without waiting for a layout."""
    if stopping is not None and stopping.is_set():
        return None
    if not needs_refresh(store) or not _refreshing.acquire(blocking=False):
        return None
    method = store.get_meta("projection_requested") or "auto"  # auto for the first map
    perplexity = float(store.get_meta("projection_perplexity") or PERPLEXITY)
    path = store.path

    def run() -> None:
        try:
            own = Store(path)
            try:
                project(own, method, perplexity, stopping=stopping)
            except ProjectionError:
                pass  # stopped, or every image deleted meanwhile: the next batch asks again
            finally:
                own.close()
        finally:
            _refreshing.release()

    thread = threading.Thread(target=run, name="projection-refresh", daemon=True)
    thread.start()
    return thread


# --- what the map page reads --------------------------------------------------------------


def _has_projection_table(conn: sqlite3.Connection) -> bool:
    # Datasette may serve a database no `collection` command has upgraded yet.
    return (
        conn.execute(
            "select 1 from sqlite_master where type = 'table' and name = 'projection'"
        ).fetchone()
        is not None
    )


def map_data(
    conn: sqlite3.Connection,
    box: tuple[float, float, float, float] | None = None,
    limit: int | None = None,
) -> dict:
    """The live images on the map, or in ``box`` (x0, y0, x1, y1), as parallel arrays.

    Level of detail: past ``limit`` images, an even sample of them, every ``stride``-th
    along the Z-order curve of the tiles (spread evenly over the map), read through the
    tile index; ``lod`` says how many there are and the stride taken (limit: FIRST_POINTS
    for the whole map, MAP_POINTS for a box). The page draws the whole map from a sample
    and asks for the box in view as it zooms in.

    ``labels`` and ``top_label`` hold indexes into ``label_names``, commonest first;
    ``tile`` is the image's place in the atlases; ``atlas.keys[n]`` (for the atlases
    these images are in) changes whenever atlas n does, for the browser's cache.
    """
    state = summary(conn)
    limit = limit or (FIRST_POINTS if box is None else MAP_POINTS)
    columns = {"id": [], "x": [], "y": [], "top_label": [], "labels": [], "placed": [], "tile": []}
    result = {
        "projection": state,
        "label_names": [],
        "images": columns,
        "atlas": {"tile": TILE, "columns": ATLAS_COLUMNS, "per_atlas": TILES_PER_ATLAS, "keys": {}},
        "lod": {"box": list(box) if box else None, "total": 0, "stride": 1},
    }
    if state is None:
        return result
    what = (
        "select p.image_id, p.x, p.y, p.placed, p.tile, images.labels, images.top_label "
        "from {source} join images on images.id = p.image_id "
        "where images.deleted_at is null {where} order by p.tile limit :limit"
    )
    if box is None:
        total, last = conn.execute("select count(*), max(tile) from projection").fetchone()
        # Tiles of images deleted or placed again leave gaps: the stride spans the tiles'
        # range, so that no more than ``limit`` are looked up.
        stride = 1 if total <= limit else math.ceil((last + 1) / limit)
        # The tiles stride apart, each found through the tile index: no scan of the map.
        rows = conn.execute(
            "with recursive pick(tile) as (select 0 union all "
            "select tile + :stride from pick where tile + :stride <= :last) "
            + what.format(source="pick join projection p on p.tile = pick.tile", where=""),
            {"stride": stride, "last": last if last is not None else -1, "limit": limit},
        ).fetchall()
    else:
        inside = "p.x between :x0 and :x1 and p.y between :y0 and :y1"
        bounds = dict(zip(("x0", "y0", "x1", "y1"), box))
        total = conn.execute(f"select count(*) from projection p where {inside}", bounds).fetchone()[0]
        stride = max(1, math.ceil(total / limit))
        rows = conn.execute(
            what.format(source="projection p", where=f"and {inside} and p.tile % :stride = 0"),
            {**bounds, "stride": stride, "limit": limit},
        ).fetchall()
    result["lod"].update(total=total, stride=stride)
    per_image = []
    frequency: dict[str, int] = {}
    for row in rows:
        names = json.loads(row[5] or "[]") or ([row[6]] if row[6] else [])
        per_image.append(names)
        for name in names:
            frequency[name] = frequency.get(name, 0) + 1
    label_names = sorted(frequency, key=lambda name: (-frequency[name], name))
    index = {name: i for i, name in enumerate(label_names)}
    result["label_names"] = label_names
    if rows:
        xy = np.round(np.array([(row[1], row[2]) for row in rows]), 5)
        columns["x"] = xy[:, 0].tolist()
        columns["y"] = xy[:, 1].tolist()
    columns["id"] = [row[0] for row in rows]
    columns["placed"] = [row[3] for row in rows]
    columns["tile"] = [row[4] for row in rows]
    columns["labels"] = [[index[name] for name in names] for names in per_image]
    columns["top_label"] = [index.get(row[6], -1) for row in rows]
    # Thumbnails for the images sent, except in a thinned whole map: drawn as dots at that
    # zoom, and the page asks for the box in view before it draws thumbnails.
    if box is not None or stride == 1:
        atlases = sorted({tile // TILES_PER_ATLAS for tile in columns["tile"]})
        result["atlas"]["keys"] = atlas_keys(conn, state["version"], atlases)
    return result


def map_card(conn: sqlite3.Connection, image_id: int) -> dict | None:
    """What the map's hover card shows of one live image: file name, top labels, dates."""
    row = conn.execute(
        "select path, taken_at, added_at from images where id = ? and deleted_at is null", [image_id]
    ).fetchone()
    if row is None:
        return None
    labels = conn.execute(
        "select label, score from labels where image_id = ? order by rank", [image_id]
    ).fetchall()
    return {
        "id": image_id,
        "name": os.path.basename(row[0]),
        "labels": [{"label": label, "score": score} for label, score in labels],
        "taken_at": row[1],
        "added_at": row[2],
    }


def _atlas_rows(conn: sqlite3.Connection, what: str, where: str = "", params=()) -> sqlite3.Cursor:
    return conn.execute(
        f"select {what} from projection p join images on images.id = p.image_id "
        f"join thumbnails t on t.image_id = p.image_id where images.deleted_at is null {where}",
        params,
    )


def _key(version, count, updated, ids) -> str:
    # Changes when a tile is added, emptied (deleted, moved on) or its image is updated.
    return f"{version}-{count}-{zlib.crc32(f'{updated}/{ids}'.encode()):08x}"


def atlas_keys(conn: sqlite3.Connection, version: int, atlases: list[int]) -> dict[str, str]:
    """A key per atlas of ``atlases`` that has tiles, changing with its content; each
    read through the tile index, so the work follows the atlases asked for."""
    keys = {}
    for n in atlases:
        first = n * TILES_PER_ATLAS
        count, updated, ids = _atlas_rows(
            conn,
            "count(*), max(images.updated_at), sum(p.image_id)",
            "and p.tile >= ? and p.tile < ?",
            [first, first + TILES_PER_ATLAS],
        ).fetchone()
        if count:
            keys[str(n)] = _key(version, count, updated, ids)
    return keys


def atlas_key(conn: sqlite3.Connection, n: int) -> str | None:
    """The key of atlas ``n`` as `atlas_keys` gives it; None when it has no tiles."""
    version = conn.execute(
        "select value from collection_meta where key = 'projection_version'"
    ).fetchone()
    if version is None or not _has_projection_table(conn):
        return None
    return atlas_keys(conn, int(version[0]), [n]).get(str(n))


def build_atlas(conn: sqlite3.Connection, n: int) -> bytes | None:
    """Atlas ``n``: the thumbnails of tiles n*TILES_PER_ATLAS onwards, each cropped to a
    TILE-pixel square, ATLAS_COLUMNS to a row, as one JPEG. None when it has no tiles."""
    from PIL import Image, ImageOps

    first = n * TILES_PER_ATLAS
    rows = _atlas_rows(
        conn, "p.tile, t.jpeg", "and p.tile >= ? and p.tile < ?", [first, first + TILES_PER_ATLAS]
    ).fetchall()
    if not rows:
        return None
    height = ((max(tile for tile, _ in rows) - first) // ATLAS_COLUMNS + 1) * TILE
    atlas = Image.new("RGB", (ATLAS_COLUMNS * TILE, height), (48, 48, 48))
    for tile, jpeg in rows:
        try:
            thumb = Image.open(io.BytesIO(jpeg))
            thumb.draft("RGB", (TILE, TILE))  # JPEG: decode at reduced scale, much faster
            thumb = ImageOps.fit(thumb.convert("RGB"), (TILE, TILE))
        except (OSError, ValueError, Image.DecompressionBombError):  # a broken thumbnail
            continue  # leaves its tile blank; the map still draws
        slot = tile - first
        atlas.paste(thumb, (slot % ATLAS_COLUMNS * TILE, slot // ATLAS_COLUMNS * TILE))
    out = io.BytesIO()
    atlas.save(out, "JPEG", quality=80)
    return out.getvalue()
