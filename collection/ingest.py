"""Files -> decoded images -> model batches -> one transaction per batch.

Decoding runs in worker threads ahead of the model, so the model is rarely
idle; everything that touches SQLite or the model stays on the calling thread.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from . import images
from .models import Model
from .store import Store


@dataclass
class Summary:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    reused: int = 0
    failed: int = 0
    batches: list[int] = field(default_factory=list)  # sizes of the model calls
    ids: list[int] = field(default_factory=list)  # ids written (added, updated or reused)

    @property
    def seen(self) -> int:
        return self.added + self.updated + self.unchanged + self.reused + self.failed

    def line(self) -> str:
        return (
            f"{self.added} added, {self.updated} updated, {self.unchanged} unchanged, "
            f"{self.reused} reused, {self.failed} failed"
        )


@dataclass
class _Read:
    """What a worker thread learned about one file."""

    path: str
    size: int
    mtime: float
    sha256: str | None = None
    decoded: images.Decoded | None = None
    pixels: np.ndarray | None = None
    thumbnail: tuple[bytes, int, int] | None = None
    error: str | None = None


def iter_files(paths: Iterable[str | Path], recursive: bool = False) -> Iterator[str]:
    """Image files under ``paths``, as absolute paths. Named files are always included;
    a folder contributes files with an image extension, skipping hidden ones."""
    for path in paths:
        path = Path(os.path.abspath(path))
        if not path.is_dir():
            yield str(path)
            continue
        walker = os.walk(path) if recursive else [(str(path), [], os.listdir(path))]
        for root, dirs, files in walker:
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith(".") or Path(name).suffix.lower() not in images.EXTENSIONS:
                    continue
                full = Path(root) / name
                if full.is_file():
                    yield str(full)


class Ingester:
    """Adds files to a store with a model. Owns no thread-shared state beyond its pool."""

    def __init__(
        self,
        store: Store,
        model: Model,
        batch_size: int | None = None,
        workers: int | None = None,
        thumbnails: bool = True,
    ):
        self.store = store
        self.model = model
        self.batch_size = batch_size or model.batch_size
        self.workers = workers or min(4, os.cpu_count() or 1)
        self.thumbnails = thumbnails
        self.store.claim_model(model.model_id, model.dimensions, model.precision)
        # Content hashes already embedded: a worker that finds one skips decoding.
        self.known = {row[0] for row in store.db.execute(
            "select sha256 from images join vectors on vectors.image_id = images.id"
        )}

    def add(self, paths: Iterable[str], progress: Callable[[int], None] | None = None) -> Summary:
        summary = Summary()
        batch: list[_Read] = []
        other: list[_Read] = []
        pending: deque[Future] = deque()
        lookahead = self.batch_size * 2 + self.workers

        def handle(read: _Read) -> None:
            if read.decoded is not None:
                batch.append(read)
            else:
                other.append(read)
            if len(batch) >= self.batch_size:
                self._write(batch, other, summary)
                batch.clear()
                other.clear()
            if progress:
                progress(1)

        with ThreadPoolExecutor(self.workers, thread_name_prefix="decode") as pool:
            for path in paths:
                read = self._triage(path, summary)
                if read is None:
                    if progress:
                        progress(1)
                    continue
                pending.append(pool.submit(self._read, read))
                while len(pending) > lookahead or (pending and pending[0].done()):
                    handle(pending.popleft().result())
            while pending:
                handle(pending.popleft().result())
        if batch or other:
            self._write(batch, other, summary)
        return summary

    def _triage(self, path: str, summary: Summary) -> _Read | None:
        """Cheap checks on the calling thread: None when the file needs no work."""
        try:
            stat = os.stat(path)
        except OSError as e:
            read = _Read(path, 0, 0.0, error=f"cannot read file: {e.strerror or e}")
            return read
        row = self.store.by_path(path)
        if (
            row
            and row["deleted_at"] is None
            and row["size"] == stat.st_size
            and row["mtime"] == stat.st_mtime
        ):
            summary.unchanged += 1
            return None
        failure = self.store.failure(path)
        if failure and failure["size"] == stat.st_size and failure["mtime"] == stat.st_mtime:
            summary.failed += 1  # failed before and has not changed since: not retried
            return None
        return _Read(path, stat.st_size, stat.st_mtime)

    def _read(self, read: _Read) -> _Read:
        """Worker thread: read, hash, and (for unknown content) decode and fit."""
        if read.error:
            return read
        try:
            data = Path(read.path).read_bytes()
        except OSError as e:
            read.error = f"cannot read file: {e.strerror or e}"
            return read
        read.sha256 = images.sha256_bytes(data)
        if read.sha256 in self.known:
            return read
        try:
            decoded = images.decode(read.path, data, min_side=self.model.min_side)
            read.pixels = self.model.prepare(decoded.image)
            if self.thumbnails:
                jpeg = images.thumbnail(decoded.image)
                read.thumbnail = (jpeg, decoded.width, decoded.height)
        except images.ImageError as e:
            read.error = str(e)
            return read
        except Exception as e:  # a bug or an exotic file must not stop the run
            read.error = f"unexpected error: {type(e).__name__}: {e}"
            return read
        decoded.image = None  # the pixels are all the model needs; free the full image
        read.decoded = decoded
        return read

    def _write(self, batch: list[_Read], other: list[_Read], summary: Summary) -> None:
        """Embed the batch, then write it and everything else in one transaction."""
        vectors = probs = None
        if batch:
            vectors, probs = self.model.embed_batch([r.pixels for r in batch])
            summary.batches.append(len(batch))
            labels = self.model.top_labels(probs)
        store = self.store
        with store.db.atomic():
            for read in other:
                if read.error:
                    store.record_failure(read.path, read.error, read.size or None, read.mtime or None)
                    summary.failed += 1
                else:
                    self._reuse(read, summary)
            for i, read in enumerate(batch):
                existing = store.by_path(read.path)
                image_id = store.save_image(
                    read.path,
                    read.mtime,
                    read.decoded.metadata(),
                    vectors[i],
                    labels[i],
                    self.model.model_id,
                    read.thumbnail,
                )
                store.clear_failure(read.path)
                self.known.add(read.sha256)
                summary.ids.append(image_id)
                if existing:
                    summary.updated += 1
                else:
                    summary.added += 1

    def _reuse(self, read: _Read, summary: Summary) -> None:
        """Known content: same file touched, a file renamed, or a second copy."""
        store = self.store
        store.clear_failure(read.path)
        current = store.by_path(read.path)
        if current and current["sha256"] == read.sha256 and store.vector(current["id"]) is not None:
            store.touch(current["id"], read.mtime)
            summary.unchanged += 1
            summary.ids.append(current["id"])
            return
        sources = [row for row in store.by_sha256(read.sha256) if row["path"] != read.path]
        if not sources:  # hash was known at start but its rows have gone since
            read.error = "content changed during ingest; will be retried"
            store.record_failure(read.path, read.error, read.size, read.mtime)
            summary.failed += 1
            return
        moved = next(
            (row for row in sources if row["deleted_at"] is not None or not os.path.exists(row["path"])),
            None,
        )
        if moved:
            if current:  # the path held other content before: replaced by the moved file
                store.delete_rows([current["id"]])
            store.move(moved["id"], read.path, read.mtime)
            summary.ids.append(moved["id"])
        else:
            summary.ids.append(store.copy(sources[0]["id"], read.path, read.mtime))
        summary.reused += 1
