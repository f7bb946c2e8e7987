"""Backfill on Ray Data: embed a large folder (or bucket: sources.py) on many machines
into Parquet shards (shards.py), which ``collection import`` then merges into the one
collection.

The pipeline, scaled to whatever cluster Ray is connected to:

    list files, skip done ones (driver)
      -> read, hash, decode, fit to the model, thumbnail (CPU tasks)
      -> the model (an actor pool: one model per actor, a GPU each when the cluster has them)
      -> shards (write tasks, one unit of work per file pair)

Each stage uses the same code as ``collection add``: ``images.decode`` and
``images.thumbnail``, the model's ``prepare``, ``embed_batch`` and ``top_labels``.
Ray retries a task or restarts an actor that dies; shards are named by their input
list and renamed into place, so a retry replaces rather than duplicates. This module
imports Ray at the top: the CLI checks that Ray is installed before importing it
(the default install has no Ray).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import Datasink
from ray.data.block import BlockAccessor

from . import files, images, shards
from .models import Model, get_model
from .sources import Source, SourceError

BLOCK_ROWS = 256  # files per decoding task, at most
SHARD_ROWS = 1000  # files per unit of work (shard pair); about 20 MB of Parquet

# What a decoding task hands to the model: the file's key and metadata, its pixels
# fitted to the model (uint8, input_size² x 3) and thumbnail, or why it failed.
DECODED = pa.schema(
    [
        *shards.KEY_FIELDS,
        *shards.METADATA_FIELDS,
        pa.field("thumbnail", pa.binary()),
        pa.field("pixels", pa.binary()),
        pa.field("error", pa.string()),
    ]
)


class EngineError(Exception):
    """The backfill cannot run as asked; the message says why."""


@dataclass(frozen=True)
class ModelSpec:
    """What every worker needs to build the same model as the driver resolved."""

    model_id: str  # a registry name, with ":random" for seeded random weights
    weights: str | None
    precision: str
    runtime: str = "auto"  # as asked: each worker resolves it on its own machine (a GPU, OpenVINO)

    @classmethod
    def of(cls, model: Model) -> ModelSpec:
        return cls(model.model_id, model.weights, model.precision, model.runtime)

    def build(self) -> Model:
        """The model object, not yet loaded: ``prepare`` needs no TensorFlow."""
        return get_model(self.model_id, self.weights, self.precision, self.runtime)

    def info(self) -> shards.ModelInfo:
        return shards.ModelInfo(self.model_id, self.build().dimensions, self.precision)


@dataclass
class BackfillSummary:
    files: int = 0  # image files under the source
    skipped: int = 0  # already in the shards or the collection, as they are now
    embedded: int = 0
    failed: int = 0
    units: int = 0  # units of work written (an images and/or a failures shard each)
    seconds: float = 0.0

    def line(self) -> str:
        rate = f" ({self.embedded / self.seconds:.1f} images/s)" if self.seconds and self.embedded else ""
        return (
            f"{self.embedded} embedded, {self.failed} failed, {self.skipped} skipped (already done) "
            f"of {self.files} files; {self.units} shard units written in {self.seconds:.1f}s{rate}"
        )


def listing(source: Source) -> pa.Table:
    """Image files under ``source`` (all subfolders, as ``collection add -r`` sees them)
    with their size and mtime. Held as Arrow, built in slices: a file costs its path's
    bytes and 16 more, so 10 million files fit in the driver's memory."""
    return file_table(source.states())


def file_table(states: Iterable[tuple[str, int | None, float | None]], slice_rows: int = 100_000) -> pa.Table:
    """(path, size, mtime) rows as a table of binary paths, built ``slice_rows`` at a time."""
    schema = pa.schema(shards.KEY_FIELDS)
    batches, states = [], iter(states)
    while chunk := list(islice(states, slice_rows)):
        paths, sizes, mtimes = zip(*chunk)
        batches.append(pa.record_batch([[os.fsencode(p) for p in paths], sizes, mtimes], schema=schema))
    return pa.Table.from_batches(batches, schema)


# --- the stages -------------------------------------------------------------------


def decode_batch(batch: pa.Table, spec: ModelSpec, source: Source) -> pa.Table:
    """CPU task: each file read, hashed, decoded, fitted to the model and thumbnailed."""
    model = spec.build()
    rows = [_decode_one(row, model, source) for row in batch.select(["path", "size", "mtime"]).to_pylist()]
    return pa.Table.from_pylist(rows, schema=DECODED)


def _decode_one(row: dict, model: Model, source: Source) -> dict:
    path = os.fsdecode(row["path"])
    try:
        # As `collection add` reads: a regular file, its real path inside the source folder.
        data = source.read(path, row["size"])
        sha256 = images.sha256_bytes(data)
        decoded = images.decode(path, data, model.min_side, sha256, source.limits.max_pixels)
        pixels = model.prepare(decoded.image)
        thumbnail = images.thumbnail(decoded.image)
    except files.Unreadable as e:
        return {**row, "error": str(e)}
    except images.ImageError as e:
        return {**row, "error": str(e)}
    except Exception as e:  # a bug or an exotic file must not stop the run
        return {**row, "error": f"unexpected error: {type(e).__name__}: {e}"}
    metadata = decoded.metadata()
    del metadata["size"]  # the listing's size stays: with the mtime, it is the file's key
    return {**row, **metadata, "thumbnail": thumbnail, "pixels": pixels.tobytes()}


class Embedder:
    """Actor: one model, loaded once, run over batches of decoded files."""

    def __init__(self, spec: ModelSpec):
        self.model = spec.build().load()

    def __call__(self, batch: pa.Table) -> pa.Table:
        model = self.model
        ok = pc.is_null(batch["error"]).to_numpy(zero_copy_only=False)
        size = model.input_size
        pixels = [
            np.frombuffer(blob, np.uint8).reshape(size, size, 3)
            for blob, good in zip(batch["pixels"].to_pylist(), ok)
            if good
        ]
        vectors, probs = model.embed_batch(pixels)
        top = iter(model.top_labels(probs))
        labels = [
            [{"wnid": w, "label": name, "score": score} for w, name, score in next(top)] if good else None
            for good in ok
        ]
        return (
            batch.drop_columns(["pixels"])
            .append_column("vector", _rows_of(vectors, ok, "<f4"))
            .append_column("labels", pa.array(labels, pa.list_(shards.LABEL)))
            .append_column("probabilities", _rows_of(probs, ok, "<f2"))
        )


def _rows_of(values: np.ndarray, ok: np.ndarray, dtype: str) -> pa.FixedSizeListArray:
    """One fixed-size list per file: the next row of ``values`` where ``ok``, else null."""
    full = np.zeros((len(ok), values.shape[1]), dtype)
    full[ok] = values
    return pa.FixedSizeListArray.from_arrays(pa.array(full.ravel()), values.shape[1], mask=pa.array(~ok))


class ShardSink(Datasink):
    """Write tasks: each unit of work becomes an images shard and a failures shard."""

    def __init__(self, folder: Path, model: shards.ModelInfo, rows: int):
        self.folder = folder
        self.model = model
        self.rows = rows
        self.written: list[tuple[int, int]] = []  # (embedded, failed) per unit, on the driver

    @property
    def min_rows_per_write(self) -> int:
        return self.rows

    def write(self, blocks, ctx) -> tuple[int, int]:
        table = pa.concat_tables([BlockAccessor.for_block(b).to_arrow() for b in blocks])
        if not table.num_rows:
            return (0, 0)
        ok = pc.is_null(table["error"])
        schema = shards.image_schema(self.model.dimensions).with_metadata(self.model.encode())
        embedded = table.filter(ok).select(schema.names).cast(schema)
        failed = table.filter(pc.invert(ok)).select(shards.FAILURE_SCHEMA.names).cast(shards.FAILURE_SCHEMA)
        shards.write(self.folder, shards.shard_key(table), embedded, failed)
        return (embedded.num_rows, failed.num_rows)

    def on_write_complete(self, write_result) -> None:
        self.written = [r for r in write_result.write_returns if r != (0, 0)]


# --- the run ----------------------------------------------------------------------


def run(
    source: str | Path | Source,
    out: str | Path,
    spec: ModelSpec,
    done: pa.Table | None = None,
    address: str | None = None,
    batch_size: int | None = None,
    actors: int | None = None,
    shard_rows: int = SHARD_ROWS,
    embedder: type = Embedder,
    echo: Callable[[str], None] | None = None,
) -> BackfillSummary:
    """Embed every image file under ``source`` (a folder, a ``pyarrow.fs`` URI, or a
    Source) that is not in the shards in ``out`` nor in ``done`` (path, size, mtime)
    into new shards in ``out``.

    Connects to the Ray cluster at ``address`` (or ``RAY_ADDRESS``), or to the one this
    process is already connected to, or starts a local one on every core and stops it
    afterwards. ``out`` must be reachable at the same path from every node."""
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if shards.image_files(out) and shards.model_of(out) != spec.info():
        raise EngineError(f"the shards in {out} come from {shards.model_of(out).model_id}: use that model, or another --out")
    shards.remove_temporary(out)
    if not isinstance(source, Source):
        try:
            source = Source.of(source)
        except SourceError as e:
            raise EngineError(str(e)) from None
    listed = listing(source)
    todo = shards.without(listed, shards.done(out))
    if done is not None:
        todo = shards.without(todo, done)
    summary = BackfillSummary(files=listed.num_rows, skipped=listed.num_rows - todo.num_rows)
    if todo.num_rows:
        own_ray = not ray.is_initialized()
        if own_ray:
            _connect(address)
        try:
            sink = _pipeline(todo, source, out, spec, batch_size, actors, shard_rows, embedder, echo)
        finally:
            if own_ray:
                ray.shutdown()
        summary.embedded = sum(e for e, _ in sink.written)
        summary.failed = sum(f for _, f in sink.written)
        summary.units = len(sink.written)
    summary.seconds = time.perf_counter() - started
    return summary


def _connect(address: str | None) -> None:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), or start one on this machine."""
    options = {}
    if not (address or os.environ.get("RAY_ADDRESS")):
        # A local Ray only: autoscaler v1's monitor ignores the SIGTERM of ray.shutdown for
        # its full second (it reports its own death to the GCS, already stopped); v2's exits
        # at once. Nothing autoscales here, so only the shutdown changes: 1.3 s -> 0.35 s.
        # Workers' output stays in Ray's session logs (/tmp/ray/session_latest/logs) rather
        # than mixing TensorFlow's start-up lines and v2's "cannot add nodes" notes into ours.
        options = {"_system_config": {"enable_autoscaler_v2": True}, "log_to_driver": False}
    try:
        ray.init(address=address, include_dashboard=False, **options)
    except ConnectionError as e:
        raise EngineError(f"cannot connect to the Ray cluster at {address}: {e}") from None


def _pipeline(todo, source, out, spec, batch_size, actors, shard_rows, embedder, echo) -> ShardSink:
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    # On GPUs, one model per GPU. On CPUs, TensorFlow spreads one model over a node's
    # cores already, so one per node; the decoding tasks take the cores it leaves.
    actors = actors or gpus or nodes
    if echo:
        where = f"{gpus} GPUs" if gpus else "CPUs only"
        echo(f"Backfill of {todo.num_rows} files on {nodes} Ray nodes ({int(resources.get('CPU', 0))} CPUs, "
             f"{where}): {actors} model actors")
    model = spec.build()
    per_block = max(1, min(BLOCK_ROWS, math.ceil(todo.num_rows / (2 * max(1, resources.get("CPU", 1))))))
    blocks = [todo.slice(i, per_block) for i in range(0, todo.num_rows, per_block)]
    sink = ShardSink(out, spec.info(), shard_rows)
    (
        # from_blocks, not from_arrow: the same blocks, with their metadata read here rather
        # than by a round of remote tasks that holds the pipeline's start back by a second.
        ray.data.from_blocks(blocks)
        .map_batches(decode_batch, fn_kwargs={"spec": spec, "source": source}, batch_size=None, batch_format="pyarrow", num_cpus=1)
        .map_batches(
            embedder,
            fn_constructor_kwargs={"spec": spec},
            batch_size=batch_size or model.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=1,
            num_gpus=1 if gpus else None,
            # A dead actor is restarted and its batch retried (Ray Data's defaults, made
            # explicit). Arguments that differ from the decoding tasks' also keep Ray
            # from fusing decoding into the actors, where it would run one file at a
            # time per model instead of on every CPU of the cluster.
            max_restarts=-1,
            max_task_retries=-1,
        )
        .write_datasink(sink)
    )
    return sink
