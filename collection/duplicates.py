"""Duplicates in three tiers, as groups with a suggested keeper, kept current per batch.

- ``exact``: the same bytes (sha256).
- ``near``: the same picture resized, re-encoded, slightly cropped, rotated by EXIF or
  lightly edited: cosine of the vectors at least the near threshold, confirmed by the
  layout of the stored thumbnails (below).
- ``similar``: look-alikes (burst shots, the same scene): the cosine alone.

The vectors of an ImageNet model say what is in a picture, not where: a crop keeping
half the scene, or the next frame of a pan, scores as high as a re-encode. The layout
check compares the thumbnails' fine structure (24x24, high-passed, normalised
correlation), allowing for the crops and bands a near-duplicate may have; on the
labelled set of bench/duplicates.py it takes the near tier's precision from 0.79 to
0.99 at the same cosine threshold, losing 1 % of recall.

The two vector tiers use one rule, applied in id order (the order images arrive): an
image joins the representative with the highest cosine among the representatives of
smaller id within the tier's threshold; with none, it is a representative itself. So
every member is within the threshold of its group's representative (nothing chains
through intermediates), an image added later never moves anyone else, and the grouping
is a function of the live vectors alone: updating after a batch gives exactly what
regrouping from scratch gives. A change or a deletion re-decides the images it can
affect (the members of a representative that changed or went, and the later
neighbours of an image that became a representative), in id order, so the work per
batch is proportional to the batch and the neighbourhoods it touches.

Candidates come from the similar-image searcher; scores are recomputed here in float64
from the stored vectors, so a pair scores the same whichever side asks. Decisions
(keep, not a duplicate, ignore) are a person's, in their own table, keyed by image and
group ids that a regrouping reproduces; they are applied when groups are read, never
written into the grouping. Nothing here deletes or moves a file.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import io
import json
import logging
import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from . import images
from .background import Jobs
from .search import NEIGHBOURHOOD
from .store import Store, decode, now

TIERS = ("exact", "near", "similar")
VECTOR_TIERS = ("near", "similar")
# Calibrated with bench/duplicates.py on a labelled set (see README). Other models'
# cosines spread differently; set the environment variables for them.
THRESHOLDS = {
    "efficientnet_lite0": {"near": 0.70, "near_layout": 0.70, "similar": 0.70},
}
DEFAULT_THRESHOLDS = THRESHOLDS["efficientnet_lite0"]
ENVIRONMENT = {
    "near": "COLLECTION_NEAR_DUPLICATE",
    "near_layout": "COLLECTION_NEAR_LAYOUT",
    "similar": "COLLECTION_SIMILAR",
}
LAYOUT_SIDE = 24  # pixels of the thumbnail windows compared
LAYOUT_BLUR = 2  # box radius taken off as the low frequencies every photo shares
# The windows of one thumbnail matched against the whole of the other: as it is, 10 %
# off each side in turn (a crop, a caption band) and 5 % off every side.
LAYOUT_WINDOWS = (
    (0, 0, 1, 1), (0.1, 0, 1, 1), (0, 0, 0.9, 1), (0, 0.1, 1, 1), (0, 0, 1, 0.9), (0.05, 0.05, 0.95, 0.95),
)
# Formats a camera or scanner writes; a PNG, WebP, GIF or BMP copy is usually an export.
ORIGINAL_FORMATS = {"JPEG", "MPO", "TIFF", "HEIF", "HEIC"}
# The most neighbours within a threshold one image's search returns: past this, a group
# of look-alikes so large that reviewing it pair by pair means nothing anyway.
MAX_NEIGHBOURS = 1000
_CACHED_VECTORS = 5_000  # memory bound of one pass: 50-80 MB of float64 vectors
_MARGIN = 1e-4  # the searcher scores in float32; ask it for a little below the threshold
DECISIONS = ("keep", "not_duplicate", "ignore")
# A collection with no groups yet (or new thresholds) this small is grouped inside the
# batch's upkeep; a larger one in a background thread, REGROUP_CHUNK images per transaction.
GROUP_AT_ONCE = 2000
REGROUP_CHUNK = 500
# Called with the images of each chunk a regrouping commits: a hook for tests.
on_regroup_chunk: Callable[[int], None] | None = None

log = logging.getLogger(__name__)
_locks: dict[str, threading.Lock] = {}  # one writer of a database's groups per process
_regroupers = Jobs("grouping the duplicates")
_registry_lock = threading.Lock()


class DuplicatesError(Exception):
    """A request about duplicates that cannot be done; the message says why."""


def thresholds(model: str | None) -> dict[str, float]:
    """The near (cosine and layout) and similar thresholds for a collection's model,
    after the environment."""
    base = (model or "").split(":")[0]
    chosen = dict(THRESHOLDS.get(base, DEFAULT_THRESHOLDS))
    for tier, variable in ENVIRONMENT.items():
        value = os.environ.get(variable)
        if value:
            try:
                chosen[tier] = float(value)
            except ValueError:
                raise DuplicatesError(f"{variable} must be a cosine from -1 to 1, not {value!r}") from None
            if not -1.0 <= chosen[tier] <= 1.0:
                raise DuplicatesError(f"{variable} must be a cosine from -1 to 1, not {value!r}")
    return chosen


def layout(jpeg: bytes | None) -> np.ndarray | None:
    """A thumbnail's fine structure in each of LAYOUT_WINDOWS: one unit row per window.

    The grey image is the JPEG's own luma, decoded without its colour (``draft``).
    Each window is box-reduced to LAYOUT_SIDE pixels a side, as Pillow's BOX resize
    would, then its blur (LAYOUT_BLUR) is taken off, both as products with fixed
    matrices: 0.92 ms a thumbnail against 1.42 for a Pillow resize per window and a
    blur by running sums (bench/ingest.py's corpus, side by side; the layouts agree to
    a cosine of 0.998, and bench/duplicates.py finds the same groups). Decoding at half
    size was faster still, but let more of that bench's hard negatives through."""
    if jpeg is None:
        return None
    try:
        image = Image.open(io.BytesIO(jpeg))
        image.draft("L", image.size)
        image = image.convert("L")
    except OSError:
        return None
    # Weights are kept for thumbnail sizes only: a larger image (an imported or crafted
    # row) gets its own, so the cache stays within 64 x 0.3 MB whatever the table holds.
    weights = _window_weights if max(image.size) <= images.THUMBNAIL_SIDE else _window_weights.__wrapped__
    rows, columns = weights(*image.size)
    count, side, height = rows.shape
    # Every window's rows in one product: the same values as six products, 0.44 against
    # 0.47 ms a layout (session 10, side by side).
    reduced = (rows.reshape(count * side, height) @ np.asarray(image, np.float32)).reshape(count, side, -1)
    windows = (reduced @ columns).astype(np.float64)
    blur = _blur_matrix(LAYOUT_SIDE, LAYOUT_BLUR)
    detail = (windows - blur @ windows @ blur.T).reshape(len(windows), -1)
    detail -= detail.mean(axis=1, keepdims=True)
    return detail / np.maximum(np.linalg.norm(detail, axis=1, keepdims=True), 1e-9)


@functools.lru_cache(maxsize=64)  # thumbnails come in few sizes: 19 MB at most
def _window_weights(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """For an image of this size, ``rows @ image @ columns`` is each of LAYOUT_WINDOWS
    box-reduced to LAYOUT_SIDE x LAYOUT_SIDE: shapes (windows, side, height) and
    (windows, width, side)."""
    rows = np.stack([
        _box_weights(height, round(top * height), round(bottom * height)) for _, top, _, bottom in LAYOUT_WINDOWS
    ])
    columns = np.stack([
        _box_weights(width, round(left * width), round(right * width)).T for left, _, right, _ in LAYOUT_WINDOWS
    ])
    rows.setflags(write=False)
    columns.setflags(write=False)
    return rows, columns


def _box_weights(pixels: int, start: int, stop: int) -> np.ndarray:
    """(LAYOUT_SIDE, pixels): row i averages the whole pixels whose centres fall in the
    i-th of LAYOUT_SIDE equal spans of [start, stop) (enlarging: the nearest pixel).
    Pillow's BOX filter, in its own arithmetic, so that edge cases fall alike."""
    scale = (stop - start) / LAYOUT_SIDE
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    centres = start + (np.arange(LAYOUT_SIDE) + 0.5) * scale
    first = np.maximum((centres - support + 0.5).astype(int), 0)
    last = np.minimum((centres + support + 0.5).astype(int), pixels)
    x = np.arange(pixels)
    offset = (x - centres[:, None] + 0.5) * (1.0 / filterscale)
    inside = (x >= first[:, None]) & (x < last[:, None]) & (offset > -0.5) & (offset <= 0.5)
    return (inside / np.maximum(inside.sum(axis=1, keepdims=True), 1)).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _blur_matrix(side: int, radius: int) -> np.ndarray:
    """``blur @ image @ blur.T`` gives each pixel the mean of the (2 radius + 1)^2 box
    around it, edges extended (Pillow's BoxBlur, without its rounding to whole levels)."""
    blur = np.zeros((side, side))
    for i in range(side):
        for j in range(i - radius, i + radius + 1):
            blur[i, min(max(j, 0), side - 1)] += 1 / (2 * radius + 1)
    blur.setflags(write=False)
    return blur


class LayoutCache:
    """The layouts of the thumbnails seen last, by a digest of the JPEG's bytes, kept
    across passes: the representatives a new image is checked against come back batch
    after batch, and working out a layout (a JPEG decode and six resizes) was most of the
    upkeep after a batch (bench/ingest.py). The same bytes give the same layout, so a
    replaced thumbnail is simply another key; at most ``entries`` layouts (27 kB each),
    least recently used out first. Shared by threads."""

    def __init__(self, entries: int):
        self.entries = entries
        self._layouts: OrderedDict[bytes, np.ndarray | None] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._layouts)

    def __call__(self, jpeg: bytes | None) -> np.ndarray | None:
        """``layout(jpeg)``, computed only when not cached."""
        if jpeg is None:
            return None
        key = hashlib.blake2b(jpeg, digest_size=16).digest()
        with self._lock:
            if key in self._layouts:
                self._layouts.move_to_end(key)
                return self._layouts[key]
        found = layout(jpeg)  # outside the lock: another thread may compute the same one
        if found is not None:
            found.setflags(write=False)  # one array for every pass that asks
        with self._lock:
            self._layouts[key] = found
            while len(self._layouts) > self.entries:
                self._layouts.popitem(last=False)
        return found


LAYOUTS_CACHED = 1024  # 28 MB at most
_layouts = LayoutCache(LAYOUTS_CACHED)


def layout_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """The best correlation of either whole thumbnail with a window of the other; the
    same whichever is ``a``."""
    return float(max((b[1:] @ a[0]).max(), (a[1:] @ b[0]).max(), a[0] @ b[0]))


# --- keeping the groups current --------------------------------------------------------


def update(store: Store, ids: Iterable[int] = (), background: bool = True, upto: int | None = None) -> int:
    """Bring ``duplicate_groups`` up to date after committed writes; returns how many
    images were re-decided. What is decided is what the change log names since the last
    update, up to ``upto`` (or its newest entry), joined by the ``ids`` given; so a
    change made elsewhere is caught too. Thresholds other than those the groups were made with, or
    a database that never had groups (one from before them), mean a regrouping from
    scratch: at once for a small collection, else in the background (returning 0),
    never inside an ``add``; the groups then fill as it goes. With ``background`` False
    (a command that lists the groups) it regroups here."""
    config = thresholds(store.model)
    done = store.get_meta("duplicates_seq")
    if done is None or store.get_meta("duplicates_thresholds") != json.dumps(config, sort_keys=True):
        live = store.db.execute(
            "select count(*) from (select 1 from images where deleted_at is null limit ?)", [GROUP_AT_ONCE + 1]
        ).fetchone()[0]
        if background and live > GROUP_AT_ONCE:
            regroup_in_background(store.path)
            return 0
        return regroup(store)
    with _lock_for(store.path):
        return _update(store, config, int(done), ids, upto)


def _update(store: Store, config: dict[str, float], done: int, ids: Iterable[int], upto: int | None = None) -> int:
    upto = _last_change(store.db.conn) if upto is None else upto
    changed = {int(i) for i in ids}
    changed.update(
        r[0] for r in store.db.execute("select image_id from duplicate_changes where seq > ? and seq <= ?", [done, upto])
    )
    if not changed:
        return 0
    grouper = _Grouper(store, config, fresh=False)
    grouper.run(sorted(changed))
    with store.db.atomic():
        grouper.write()
        _finish(store, config, upto)
    return grouper.decided


def regroup(store: Store, stop: threading.Event | None = None) -> int:
    """Group every live image from scratch (the first time, or after a threshold
    changed), REGROUP_CHUNK images per transaction in id order, resuming where an
    earlier regrouping with the same thresholds stopped (``duplicates_fill`` in
    collection_meta), then catch up with the changes made meanwhile. Returns how many
    images were decided; stops after a chunk when ``stop`` is set."""
    config = thresholds(store.model)
    key = json.dumps(config, sort_keys=True)
    with _lock_for(store.path):
        progress = json.loads(store.get_meta("duplicates_fill") or "null")
        if progress is None or progress["config"] != key:
            progress = {"seq": _last_change(store.db.conn), "after": 0, "config": key}
            with store.db.atomic():
                store.db.execute("delete from duplicate_groups")
                store.set_meta("duplicates_fill", json.dumps(progress))
        decided = 0
        while stop is None or not stop.is_set():
            chunk = [
                r[0]
                for r in store.db.execute(
                    "select id from images where deleted_at is null and id > ? order by id limit ?",
                    [progress["after"], REGROUP_CHUNK],
                )
            ]
            if not chunk:
                break
            # The groups of the images before the chunk are in the table; those after it
            # are decided in their own chunk, in id order, so none is decided early.
            grouper = _Grouper(store, config, fresh=False, upto=chunk[-1])
            grouper.run(chunk)
            before = json.dumps(progress)
            progress["after"] = chunk[-1]
            with store.db.atomic():
                # Another process regrouping too (`collection duplicates` beside the
                # watcher) may have moved on: then this chunk was decided on an old
                # table; go on from where it got to.
                current = store.get_meta("duplicates_fill")
                if current == before:
                    grouper.write()
                    store.set_meta("duplicates_fill", json.dumps(progress))
            if current != before:
                if current is None:  # it finished
                    return decided
                progress = json.loads(current)
                continue
            decided += grouper.decided
            if on_regroup_chunk is not None:
                on_regroup_chunk(len(chunk))
        else:
            return decided
        with store.db.atomic():
            store.db.execute("delete from collection_meta where key = 'duplicates_fill'")
            _finish(store, config, progress["seq"])
        return decided + _update(store, config, progress["seq"], ())


def regroup_in_background(db_path: str | Path) -> bool:
    """Start ``regroup`` in a thread with its own connection unless one runs; True when started."""
    return _regroupers.start(db_path, regroup)


def stop_regrouping(db_path: str | Path, timeout: float | None = None) -> None:
    """Stop a background regrouping after its current chunk (it resumes next time) and wait."""
    _regroupers.stop(db_path, timeout)


def wait_for_regroup(db_path: str | Path, timeout: float | None = None) -> None:
    _regroupers.wait(db_path, timeout)


def _lock_for(db_path: str | Path) -> threading.Lock:
    with _registry_lock:
        return _locks.setdefault(os.path.realpath(db_path), threading.Lock())


def _last_change(conn: sqlite3.Connection) -> int:
    row = conn.execute("select seq from sqlite_sequence where name = 'duplicate_changes'").fetchone()
    return row[0] if row else 0


def _finish(store: Store, config: dict[str, float], upto: int) -> None:
    store.set_meta("duplicates_seq", upto)
    store.set_meta("duplicates_thresholds", json.dumps(config, sort_keys=True))
    store.db.execute("delete from duplicate_changes where seq <= ?", [upto])


class _Grouper:
    """One pass of re-deciding images in id order, in memory until ``write``."""

    def __init__(self, store: Store, config: dict[str, float], fresh: bool, upto: int | None = None):
        from .index import open_index

        self.db = store.db
        self.searcher = open_index(store.path)
        self.config = config
        self.fresh = fresh  # from scratch: the table's current rows do not count
        self.upto = upto  # a chunk of a regrouping: later images wait for their own chunk
        self.changed: set[int] = set()
        self.live: dict[int, np.ndarray | None] = {}  # id -> vector, None when not live
        self.layouts: dict[int, np.ndarray | None] = {}
        self.old_group_ids: dict[tuple[str, int], int | None] = {}
        self.exact_groups: dict[int, list[int]] = {}
        self.decided = 0
        # tier -> id -> its new representative (itself for one), None when not live
        self.chosen: dict[str, dict[int, int | None]] = {tier: {} for tier in VECTOR_TIERS}
        self.touched: dict[str, set[int]] = {tier: set() for tier in TIERS}  # group ids to rewrite

    # --- deciding ---

    def run(self, changed: list[int]) -> None:
        self.changed = set(changed)
        self._exact(changed)
        heap = list(changed)
        heapq.heapify(heap)
        pending = {i: set(VECTOR_TIERS) for i in changed}
        while heap:
            image_id = heapq.heappop(heap)
            tiers = pending.pop(image_id, None)
            if not tiers:
                continue
            self.decided += 1
            found = self._within(image_id)
            for tier in sorted(tiers):
                for later in self._decide(tier, image_id, found):
                    if self.upto is not None and later > self.upto:
                        continue
                    if later not in pending:
                        pending[later] = set()
                        heapq.heappush(heap, later)
                    pending[later].add(tier)

    def _decide(self, tier: str, image_id: int, found: list[tuple[int, float]] | None) -> list[int]:
        """Choose the image's representative in ``tier``; return the later images whose
        choice this can change."""
        was_representative, old_members = self._old_group(tier, image_id)
        old_group_id = self._old_group_id(tier, image_id)
        if old_group_id is not None:
            self.touched[tier].add(old_group_id)
        if found is None:  # deleted, or gone since
            self.chosen[tier][image_id] = None
            return old_members if was_representative else []
        threshold = self.config[tier]
        within = [(other, score) for other, score in found if score >= threshold]
        # The best-scoring earlier representative that passes the tier's check; the
        # layout is looked at only as far down that list as needed (it costs a decode).
        candidates = sorted(
            ((score, -other) for other, score in within if other < image_id and self._is_representative(tier, other)),
            reverse=True,
        )
        representative = next(
            (-negative for _, negative in candidates if tier != "near" or self._same_layout(image_id, -negative)),
            image_id,
        )
        self.chosen[tier][image_id] = representative
        self.touched[tier].add(representative)
        is_representative = representative == image_id
        again: list[int] = []
        if was_representative and (not is_representative or image_id in self.changed):
            again += old_members
        if is_representative and (not was_representative or image_id in self.changed):
            # Near: some of these fail the layout check and will not move; re-deciding
            # them costs less than checking every one here.
            again += [other for other, _ in within if other > image_id]
        return again

    def _is_representative(self, tier: str, image_id: int) -> bool:
        if image_id in self.chosen[tier]:
            return self.chosen[tier][image_id] == image_id
        group_id = self._old_group_id(tier, image_id)
        return group_id is None or group_id == image_id

    def _old_group_id(self, tier: str, image_id: int) -> int | None:
        """The image's group in a vector tier of the table as the pass found it (read
        once: the table changes only in ``write``; exact groups are ``_exact``'s)."""
        if self.fresh:
            return None
        self._read_old_group_ids([image_id])
        return self.old_group_ids[(tier, image_id)]

    def _read_old_group_ids(self, image_ids: list[int]) -> None:
        """``_old_group_id`` in every vector tier of the images not yet read, in one
        statement (the candidates a search found are asked about in turn)."""
        missing = [i for i in image_ids if (VECTOR_TIERS[0], i) not in self.old_group_ids]
        if self.fresh or not missing:
            return
        if len(self.old_group_ids) + len(VECTOR_TIERS) * len(missing) > 4 * _CACHED_VECTORS:
            self.old_group_ids.clear()
        self.old_group_ids.update(((tier, i), None) for tier in VECTOR_TIERS for i in missing)
        self.old_group_ids.update(
            ((tier, image_id), group_id)
            for tier, image_id, group_id in self.db.execute(
                "select tier, image_id, group_id from duplicate_groups where tier in (select value from json_each(?)) "
                "and image_id in (select value from json_each(?))",
                [json.dumps(VECTOR_TIERS), json.dumps(missing)],
            )
        )

    def _old_group(self, tier: str, image_id: int) -> tuple[bool, list[int]]:
        """Whether the table has the image as a representative, and its members if so."""
        group_id = self._old_group_id(tier, image_id)
        if group_id is not None and group_id != image_id:
            return False, []
        return True, self._old_members(tier, image_id)

    def _old_members(self, tier: str, group_id: int) -> list[int]:
        if self.fresh:
            return []
        return [
            r[0]
            for r in self.db.execute(
                "select image_id from duplicate_groups where tier = ? and group_id = ? and image_id != group_id",
                [tier, group_id],
            )
        ]

    def _within(self, image_id: int) -> list[tuple[int, float]] | None:
        """The live images within the loosest threshold of this one, rescored exactly;
        None when this one is not live."""
        vector = self._vector(image_id)
        if vector is None:
            return None
        loosest = min(self.config[tier] for tier in VECTOR_TIERS) - _MARGIN
        k = NEIGHBOURHOOD  # what matches asked for the same new image: remembered
        while True:
            try:
                found = self.searcher.similar(image_id, k, loosest)
            except KeyError:  # deleted between our read and the searcher's
                return None
            if len(found) < k or k >= MAX_NEIGHBOURS:
                break
            k = min(4 * k, MAX_NEIGHBOURS)
        others = [other for other, _ in found]
        theirs = self._vectors(others)  # one read for all of them, as is their table rows'
        self._read_old_group_ids(others)
        return [(other, float(np.dot(vector, v))) for other, v in zip(others, theirs) if v is not None]

    def _vector(self, image_id: int) -> np.ndarray | None:
        """The live image's vector in float64 (a dot product then scores a pair the same
        whichever side asks), None when it is deleted or has none."""
        return self._vectors([image_id])[0]

    def _vectors(self, image_ids: list[int]) -> list[np.ndarray | None]:
        """``_vector`` of each, those not yet read in one statement."""
        missing = [i for i in image_ids if i not in self.live]
        if missing:
            if len(self.live) + len(missing) > _CACHED_VECTORS:  # a pass from scratch sees every vector once
                self.live.clear()
            rows = dict(self.db.execute(
                "select v.image_id, v.vector from vectors v join images i on i.id = v.image_id "
                "where v.image_id in (select value from json_each(?)) and i.deleted_at is null",
                [json.dumps(missing)],
            ).fetchall())
            for image_id in missing:
                row = rows.get(image_id)
                self.live[image_id] = None if row is None else decode(row).astype(np.float64)
        return [self.live.get(i) for i in image_ids]

    def _same_layout(self, a: int, b: int) -> bool:
        """The near tier's second look; a pair without both thumbnails has only the cosine."""
        first, second = self._layout(a), self._layout(b)
        if first is None or second is None:
            return True
        return layout_similarity(first, second) >= self.config["near_layout"]

    def _layout(self, image_id: int) -> np.ndarray | None:
        if image_id not in self.layouts:
            if len(self.layouts) >= _CACHED_VECTORS:
                self.layouts.clear()
            row = self.db.execute("select jpeg from thumbnails where image_id = ?", [image_id]).fetchone()
            self.layouts[image_id] = _layouts(row[0] if row else None)
        return self.layouts[image_id]

    def _exact(self, changed: list[int]) -> None:
        """Same bytes: the groups of every sha256 the changed images had or have now."""
        shas: set[str] = set()
        for start in range(0, len(changed), 500):
            chunk = changed[start : start + 500]
            shas.update(
                r[0]
                for r in self.db.execute(
                    "select sha256 from images where deleted_at is null and sha256 is not null "
                    "and id in (select value from json_each(?))",
                    [json.dumps(chunk)],
                )
            )
            if not self.fresh:
                for (group_id,) in self.db.execute(
                    "select distinct group_id from duplicate_groups where tier = 'exact' "
                    "and image_id in (select value from json_each(?))",
                    [json.dumps(chunk)],
                ):
                    self.touched["exact"].add(group_id)
                    shas.update(
                        r[0]
                        for r in self.db.execute(
                            "select i.sha256 from duplicate_groups g join images i on i.id = g.image_id "
                            "where g.tier = 'exact' and g.group_id = ? and i.sha256 is not null",
                            [group_id],
                        )
                    )
        for sha in shas:
            members = [
                r[0]
                for r in self.db.execute(
                    "select id from images where sha256 = ? and deleted_at is null order by id", [sha]
                )
            ]
            if members:
                self.exact_groups[members[0]] = members
                self.touched["exact"].add(members[0])

    # --- writing ---

    def write(self) -> None:
        """Rewrite every group the pass touched, with its keeper and scores to it."""
        for tier in TIERS:
            regrouped = [(g, members) for g, members in self._groups(tier) if len(members) > 1]
            for column, ids in (("group_id", sorted(self.touched[tier])), ("image_id", list(self.chosen.get(tier, ())))):
                for start in range(0, len(ids), 500):
                    self.db.execute(
                        f"delete from duplicate_groups where tier = ? and {column} in (select value from json_each(?))",
                        [tier, json.dumps(ids[start : start + 500])],
                    )
            for group_id, members in regrouped:
                self._write_group(tier, group_id, members)

    def _groups(self, tier: str) -> Iterator[tuple[int, list[int]]]:
        """Each touched group's members as they are now: read before the rewrite, since
        members nobody re-decided stay where the table has them."""
        if tier == "exact":
            yield from self.exact_groups.items()
            return
        chosen = self.chosen[tier]
        by_group: dict[int, list[int]] = {}
        for image_id, representative in chosen.items():
            if representative is not None:
                by_group.setdefault(representative, []).append(image_id)
        for group_id in sorted(self.touched[tier]):
            if chosen.get(group_id, group_id) != group_id:
                continue  # no longer a representative: its members were all re-decided
            if group_id not in chosen and self._vector(group_id) is None:
                continue
            members = set(by_group.get(group_id, [])) | {group_id}
            members.update(m for m in self._old_members(tier, group_id) if m not in chosen)
            yield group_id, sorted(members)

    def _write_group(self, tier: str, group_id: int, members: list[int]) -> None:
        rows = {
            r[0]: r
            for r in self.db.execute(
                "select id, width, height, format, taken_at, mtime from images "
                "where id in (select value from json_each(?))",
                [json.dumps(members)],
            )
        }
        keeper = min(members, key=lambda i: keeper_order(*rows[i][1:], image_id=i))
        if tier == "exact":
            scores = {i: 1.0 for i in members}
        else:
            vectors = dict(zip(members, self._vectors(members)))
            scores = {i: float(np.dot(v, vectors[keeper])) for i, v in vectors.items()}
        self.db.conn.executemany(
            "insert into duplicate_groups (tier, group_id, image_id, is_keeper, score) values (?, ?, ?, ?, ?)",
            [(tier, group_id, i, int(i == keeper), round(scores[i], 6)) for i in members],
        )


def keeper_order(width, height, fmt, taken_at, mtime, image_id: int) -> tuple:
    """Sort key for the suggested keeper: the most pixels, then an original format, then
    the oldest (taken first, else modified first), then the first added."""
    return (
        -((width or 0) * (height or 0)),
        (fmt or "").upper() not in ORIGINAL_FORMATS,
        taken_at is None,
        taken_at or "",
        mtime if mtime is not None else float("inf"),
        image_id,
    )


# --- reading groups, with decisions applied --------------------------------------------

_MEMBER_SQL = """
select g.group_id, g.image_id, g.is_keeper, g.score, i.path, i.width, i.height, i.size,
  i.format, i.taken_at, i.mtime, i.added_at,
  (select d.decision from duplicate_decisions d where d.tier = g.tier and d.group_id = g.group_id
     and d.image_id = g.image_id) as decision,
  exists (select 1 from duplicate_decisions d where d.tier = g.tier and d.group_id = g.group_id
     and d.image_id is null and d.decision = 'ignore') as ignored
from duplicate_groups g join images i on i.id = g.image_id
where g.tier = :tier and g.group_id in (select value from json_each(:groups))
order by g.group_id, g.is_keeper desc, g.score desc, g.image_id
"""


def _check_tier(tier: str) -> str:
    if tier not in TIERS:
        raise DuplicatesError(f"tier must be one of {', '.join(TIERS)}, not {tier!r}")
    return tier


def group_ids(conn: sqlite3.Connection, tier: str, after: int = 0, limit: int = 50, ignored: bool = False) -> list[int]:
    """Group ids of a tier in order, from after ``after``; ignored groups only if asked."""
    return [
        r[0]
        for r in conn.execute(
            "select distinct g.group_id from duplicate_groups g where g.tier = ? and g.group_id > ? "
            "and (? or not exists (select 1 from duplicate_decisions d where d.tier = g.tier "
            "and d.group_id = g.group_id and d.image_id is null and d.decision = 'ignore')) "
            "order by g.group_id limit ?",
            [_check_tier(tier), after, int(ignored), limit],
        )
    ]


def groups(conn: sqlite3.Connection, tier: str, ids: list[int]) -> list[dict]:
    """The groups with these ids, members keeper first, each with its role after the
    decisions: ``keeper``, ``duplicate`` or ``not_duplicate`` (``ignored`` for all of
    an ignored group). A member chosen with "keep" replaces the suggested keeper."""
    by_group: dict[int, list[dict]] = {}
    cursor = conn.execute(_MEMBER_SQL, {"tier": _check_tier(tier), "groups": json.dumps(ids)})
    names = [d[0] for d in cursor.description]
    for row in cursor:
        member = dict(zip(names, row))
        by_group.setdefault(member["group_id"], []).append(member)
    result = []
    for group_id in ids:
        members = by_group.get(group_id)
        if not members:
            continue
        chosen = [m for m in members if m["decision"] == "keep"]
        keeper = chosen[0] if chosen else next(m for m in members if m["is_keeper"])
        ignored = bool(members[0]["ignored"])
        for m in members:
            m["suggested_keeper"] = bool(m.pop("is_keeper"))
            del m["ignored"]
            if ignored:
                m["role"] = "ignored"
            elif m is keeper:
                m["role"] = "keeper"
            elif m["decision"] == "not_duplicate":
                m["role"] = "not_duplicate"
            else:
                m["role"] = "duplicate"
        members.sort(key=lambda m: (m is not keeper, -m["score"], m["image_id"]))
        wasted = sum(m["size"] or 0 for m in members if m["role"] == "duplicate")
        result.append(
            {"group_id": group_id, "tier": tier, "ignored": ignored, "keeper_id": keeper["image_id"],
             "wasted_bytes": wasted, "members": members}
        )
    return result


def listing(conn: sqlite3.Connection, tier: str, chunk: int = 500) -> Iterator[dict]:
    """Every member of every group of a tier, ignored groups included, group by group."""
    after = 0
    while True:
        ids = group_ids(conn, tier, after, chunk, ignored=True)
        if not ids:
            return
        for group in groups(conn, tier, ids):
            yield from group["members"]
        after = ids[-1]


def group_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Groups per tier, from the (tier, group_id) index alone."""
    counts = dict.fromkeys(TIERS, 0)
    counts.update(conn.execute("select tier, count(distinct group_id) from duplicate_groups group by tier"))
    return counts


def summary(conn: sqlite3.Connection) -> dict[str, dict]:
    """Per tier: groups, images in them, and bytes held by the non-keepers."""
    result = {tier: {"groups": 0, "images": 0, "wasted_bytes": 0} for tier in TIERS}
    for tier, n_groups, n_images, wasted in conn.execute(
        "select g.tier, count(distinct g.group_id), count(*), "
        "coalesce(sum(case when g.is_keeper then 0 else i.size end), 0) "
        "from duplicate_groups g join images i on i.id = g.image_id group by g.tier"
    ):
        result[tier] = {"groups": n_groups, "images": n_images, "wasted_bytes": wasted}
    return result


# --- decisions -------------------------------------------------------------------------


def decide(
    conn: sqlite3.Connection, tier: str, group_id: int, image_id: int | None, decision: str, actor: str | None
) -> None:
    """Record a person's decision about a current group (``image_id`` None: the whole
    group, for ``ignore``); ``clear`` withdraws a decision. Only one member of a group
    can be the chosen keeper. Run inside a write transaction; nothing touches a file."""
    _check_tier(tier)
    if decision not in (*DECISIONS, "clear"):
        raise DuplicatesError(f"decision must be one of {', '.join(DECISIONS)} or clear, not {decision!r}")
    member = group_id if image_id is None else image_id
    found = conn.execute(
        "select 1 from duplicate_groups where tier = ? and group_id = ? and image_id = ?", [tier, group_id, member]
    ).fetchone()
    if found is None:
        raise DuplicatesError(f"image {member} is not in {tier} group {group_id}")
    if decision == "ignore" or (decision == "clear" and image_id is None):
        conn.execute(
            "delete from duplicate_decisions where tier = ? and group_id = ? and image_id is null", [tier, group_id]
        )
        image_id = None
    else:
        if image_id is None:
            raise DuplicatesError(f"{decision} needs an image")
        if decision == "keep":  # one chosen keeper per group
            conn.execute(
                "delete from duplicate_decisions where tier = ? and group_id = ? and decision = 'keep'",
                [tier, group_id],
            )
        conn.execute(
            "delete from duplicate_decisions where tier = ? and group_id = ? and image_id = ?",
            [tier, group_id, image_id],
        )
    if decision != "clear":
        conn.execute(
            "insert into duplicate_decisions (tier, group_id, image_id, decision, actor, decided_at) "
            "values (?, ?, ?, ?, ?, ?)",
            [tier, group_id, image_id, decision, actor, now()],
        )
