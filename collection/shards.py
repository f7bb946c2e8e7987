"""Backfill shards: Parquet files of embedded images, written by many machines and
merged into one collection by ``collection import``.

A shards folder holds, for each unit of work a backfill wrote:

    images-<key>.parquet    one row per embedded file (IMAGE_FIELDS)
    failures-<key>.parquet  one row per file that could not be embedded (FAILURE_FIELDS)

``<key>`` is a hash of the unit's input list (path, size, mtime of each file), so a
write that Ray retries produces the same file name and replaces the first attempt
instead of adding a second copy. Each file is written under a temporary name and
renamed, so a reader never sees half a shard and a killed writer leaves only a
``.tmp-`` file that the next run deletes. The model that made the vectors (id,
dimensions, precision) is in every file's Parquet metadata.

Paths are stored as the bytes of the file name (``os.fsencode``): a name that is
not UTF-8 survives the round trip.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import categories
from .sources import is_uri
from .store import Store, StoreError

IMAGES = "images-"
FAILURES = "failures-"
SUFFIX = ".parquet"
TEMPORARY = ".tmp-"
MODEL_KEY = b"collection.model"
# Rows per transaction on import: enough to spread each commit's sync over many rows,
# few enough that the upkeep after each (matches for the new ids) stays short.
IMPORT_CHUNK = 500

# What identifies one file's state: a rerun skips a file whose key is already done.
KEY_FIELDS = [
    pa.field("path", pa.binary(), nullable=False),
    pa.field("size", pa.int64()),
    pa.field("mtime", pa.float64()),
]
PROBABILITIES = pa.list_(pa.float16(), categories.CLASSES)
LABEL = pa.struct([("wnid", pa.string()), ("label", pa.string()), ("score", pa.float32())])
METADATA_FIELDS = [  # images.Decoded.metadata(), beyond size
    pa.field("sha256", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("format", pa.string()),
    pa.field("taken_at", pa.string()),
    pa.field("camera", pa.string()),
    pa.field("latitude", pa.float64()),
    pa.field("longitude", pa.float64()),
]


def image_schema(dimensions: int) -> pa.Schema:
    return pa.schema(
        [
            *KEY_FIELDS,
            *METADATA_FIELDS,
            pa.field("vector", pa.list_(pa.float32(), dimensions)),  # L2-normalised
            pa.field("labels", pa.list_(LABEL)),  # the top labels, best first
            # The model's 1,000 class probabilities, rounded to float16 as the collection
            # stores them (categories.py): import derives the image's categories from them.
            pa.field("probabilities", PROBABILITIES),
            pa.field("thumbnail", pa.binary()),  # JPEG, at most 256 px a side
        ]
    )


FAILURE_SCHEMA = pa.schema([*KEY_FIELDS, pa.field("error", pa.string())])


@dataclass(frozen=True)
class ModelInfo:
    """The model a shard's vectors come from, as ``Store.claim_model`` checks it."""

    model_id: str
    dimensions: int
    precision: str

    def encode(self) -> dict[bytes, bytes]:
        return {MODEL_KEY: json.dumps(self.__dict__).encode()}

    @classmethod
    def of(cls, schema: pa.Schema) -> ModelInfo | None:
        raw = (schema.metadata or {}).get(MODEL_KEY)
        return cls(**json.loads(raw)) if raw else None


def shard_key(table: pa.Table) -> str:
    """A name for a unit of work that depends only on its input list, in any order."""
    keys = sorted(zip(table["path"].to_pylist(), table["size"].to_pylist(), table["mtime"].to_pylist()))
    digest = hashlib.sha256()
    for path, size, mtime in keys:
        digest.update(path + b"\0" + f"{size}\0{mtime!r}\n".encode())
    return digest.hexdigest()[:32]


def write(folder: str | Path, key: str, images: pa.Table, failures: pa.Table) -> None:
    """Write one unit's shards: failures first, so that a unit whose images shard
    exists is whole (a rerun redoes the files of a unit that has neither)."""
    if failures.num_rows:
        _write_atomically(Path(folder) / f"{FAILURES}{key}{SUFFIX}", failures)
    if images.num_rows:
        _write_atomically(Path(folder) / f"{IMAGES}{key}{SUFFIX}", images)


def _write_atomically(path: Path, table: pa.Table) -> None:
    temporary = path.with_name(f"{TEMPORARY}{uuid.uuid4().hex}-{path.name}")
    try:
        with open(temporary, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)  # a retried write of the same unit replaces it whole
    finally:
        temporary.unlink(missing_ok=True)


def image_files(folder: str | Path) -> list[Path]:
    return sorted(Path(folder).glob(f"{IMAGES}*{SUFFIX}"))


def failure_files(folder: str | Path) -> list[Path]:
    return sorted(Path(folder).glob(f"{FAILURES}*{SUFFIX}"))


def count_rows(folder: str | Path) -> int:
    """Rows in every shard in ``folder``, from the Parquet footers alone."""
    return sum(pq.ParquetFile(p).metadata.num_rows for p in (*image_files(folder), *failure_files(folder)))


def remove_temporary(folder: str | Path) -> int:
    """Delete what killed writers left behind; only while no backfill writes here."""
    stale = list(Path(folder).glob(f"{TEMPORARY}*"))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def done(folder: str | Path) -> pa.Table:
    """The (path, size, mtime) of every file the shards in ``folder`` hold, embedded or failed."""
    tables = [
        pq.read_table(path, columns=["path", "size", "mtime"])
        for path in (*image_files(folder), *failure_files(folder))
    ]
    return pa.concat_tables(tables) if tables else pa.schema(KEY_FIELDS).empty_table()


def without(todo: pa.Table, finished: pa.Table) -> pa.Table:
    """The rows of ``todo`` whose (path, size, mtime) is not in ``finished`` (a hash anti-join)."""
    if not finished.num_rows or not todo.num_rows:
        return todo
    finished = finished.select(["path", "size", "mtime"]).cast(pa.schema(KEY_FIELDS))
    keys = ["path", "size", "mtime"]
    return todo.join(finished.group_by(keys).aggregate([]), keys, join_type="left anti").sort_by("path")


def model_of(folder: str | Path) -> ModelInfo:
    """The one model every images shard in ``folder`` was made with."""
    models = {ModelInfo.of(pq.read_schema(path)) for path in image_files(folder)}
    if None in models or len(models) > 1:
        found = ", ".join(sorted(f"{m.model_id} {m.precision}" for m in models if m))
        raise StoreError(f"the shards in {folder} do not all come from one model ({found}): import them separately")
    return models.pop()


# --- import --------------------------------------------------------------------


@dataclass
class ImportSummary:
    added: int = 0
    updated: int = 0
    moved: int = 0  # a known image's file under a new path: its row follows it, keeping its id
    unchanged: int = 0  # already in the collection as imported (or a newer version is)
    gone: int = 0  # no longer on disk: not imported
    failed: int = 0  # failures recorded
    shards: int = 0

    def line(self) -> str:
        return (
            f"{self.added} added, {self.updated} updated, {self.moved} moved, {self.unchanged} unchanged, "
            f"{self.gone} gone, {self.failed} failed, from {self.shards} shards"
        )


def import_shards(
    store: Store,
    folder: str | Path,
    after_batch: Callable[[list[int]], None] | None = None,
    chunk: int = IMPORT_CHUNK,
    progress: Callable[[int], None] | None = None,
) -> ImportSummary:
    """Merge every shard in ``folder`` into ``store`` through the same writes as
    ``collection add`` (``Store.save_image``), one transaction per ``chunk`` rows,
    calling ``after_batch`` with the ids each committed chunk wrote.

    A file already in the collection with the same size, mtime, content and model is
    left alone, as is one the collection holds a newer version of: importing twice
    changes nothing, and an image keeps its id. As with ``add``, a file with the
    content of an image whose file has gone takes over that image's row (a move), and
    a file that has itself gone since the backfill is not imported. Each image gets its
    categories from the class probabilities in the shard."""
    summary = ImportSummary()
    images = image_files(folder)
    if images:
        model = model_of(folder)
        store.claim_model(model.model_id, model.dimensions, model.precision)
    for path in images:
        summary.shards += 1
        for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk):
            ids = _import_images(store, batch, model, summary)
            if after_batch and ids:
                after_batch(ids)
            if progress:
                progress(batch.num_rows)
    for path in failure_files(folder):
        summary.shards += 1
        for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk):
            with store.db.atomic():
                for row in batch.to_pylist():
                    _import_failure(store, row, summary)
            if progress:
                progress(batch.num_rows)
    return summary


def _import_images(store: Store, batch: pa.RecordBatch, model: ModelInfo, summary: ImportSummary) -> list[int]:
    vectors = _vectors(batch, model.dimensions)
    probabilities = _probabilities(batch)
    columns = ["path", "size", "mtime", *(f.name for f in METADATA_FIELDS), "labels", "thumbnail"]
    rows = batch.select(columns).to_pylist()
    ids = []
    with store.db.atomic():
        for i, row in enumerate(rows):
            path = os.fsdecode(row["path"])
            current = store.by_path(path)
            if current and current["deleted_at"] is None and current["model"] == model.model_id and (
                current["mtime"] > row["mtime"]
                or (current["mtime"], current["size"], current["sha256"]) == (row["mtime"], row["size"], row["sha256"])
            ):
                summary.unchanged += 1
                continue
            if not is_uri(path) and not os.path.lexists(path):
                summary.gone += 1  # deleted or moved since the backfill: `add` would not add it either
                continue
            moved = None if current and current["sha256"] == row["sha256"] else _moved_from(store, path, row["sha256"])
            if moved:
                store.move(moved, path, row["mtime"])  # as `collection add` does: same id, no new row
                store.clear_failure(path)
                ids.append(moved)
                summary.moved += 1
                continue
            labels = [(label["wnid"], label["label"], label["score"]) for label in row["labels"]]
            thumbnail = (row["thumbnail"], row["width"], row["height"]) if row["thumbnail"] else None
            image_id = store.save_image(
                path, row["mtime"], row, vectors[i], labels, model.model_id, thumbnail,
                probabilities=None if probabilities is None else probabilities[i],
            )
            store.clear_failure(path)
            ids.append(image_id)
            if current:
                summary.updated += 1
            else:
                summary.added += 1
    return ids


def _moved_from(store: Store, path: str, sha256: str) -> int | None:
    """The id of a row with this content whose file has gone (marked deleted, or no
    longer on disk): the file was moved to ``path``, and keeps that row's id."""
    for row in store.by_sha256(sha256):
        gone = row["deleted_at"] is not None or (not is_uri(row["path"]) and not os.path.exists(row["path"]))
        if row["path"] != path and gone:
            return row["id"]
    return None


def _vectors(batch: pa.RecordBatch, dimensions: int) -> np.ndarray:
    column = batch.column("vector")
    if column.null_count or column.type.list_size != dimensions:
        raise StoreError(f"a shard holds vectors that are missing or not {dimensions}-dimensional")
    values = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    return values.astype("<f4", copy=False).reshape(len(batch), dimensions)


def _probabilities(batch: pa.RecordBatch) -> np.ndarray | None:
    """The class probabilities (float32 holding float16 values), or None for shards
    written before they were kept: those images are imported without categories."""
    if "probabilities" not in batch.schema.names:
        return None
    column = batch.column("probabilities")
    if column.null_count or column.type != PROBABILITIES:
        raise StoreError(f"a shard holds class probabilities that are missing or not {categories.CLASSES} float16s")
    return pc.list_flatten(column).to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(batch), -1)


def _import_failure(store: Store, row: dict, summary: ImportSummary) -> None:
    """Record a failure unless the file is in the collection, or the failure already is, as it is now."""
    path = os.fsdecode(row["path"])
    state = (row["size"], row["mtime"])
    current = store.by_path(path)
    known = store.failure(path)
    if (current and current["deleted_at"] is None and (current["size"], current["mtime"]) == state) or (
        known and (known["size"], known["mtime"]) == state
    ):
        summary.unchanged += 1
        return
    store.record_failure(path, row["error"], *state)
    summary.failed += 1

