"""Files -> decoded images -> model batches -> one transaction per batch.

Decoding runs in worker threads ahead of the model, so the model is rarely
idle; the model and the batch's own writes stay on the calling thread. What
follows a committed batch (``on_batch``: matches, duplicates, the index) may run
on a thread of its own (``Behind``) while the next batch is decoded and embedded.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
import time
from collections import Counter, deque
from datetime import datetime, timedelta, timezone
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from . import files, images
from .models import Model
from .runtimes import OPENVINO
from .store import Store, embedded, now


@dataclass
class Summary:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    reused: int = 0
    failed: int = 0
    batches: list[int] = field(default_factory=list)  # sizes of the model calls
    ids: list[int] = field(default_factory=list)  # ids written (added, updated or reused)
    # Wall-clock seconds the calling thread spent, by what it was doing: waiting for
    # decoded images, in the model, writing to SQLite, and in ``on_batch``.
    seconds: Counter = field(default_factory=Counter)

    @property
    def seen(self) -> int:
        return self.added + self.updated + self.unchanged + self.reused + self.failed

    @contextmanager
    def timing(self, what: str) -> Iterator[None]:
        """Add the wall-clock time of the ``with`` block to ``seconds[what]``."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[what] += time.perf_counter() - started

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
    ctime: float = 0.0
    sha256: str | None = None
    decoded: images.Decoded | None = None
    pixels: np.ndarray | None = None
    thumbnail: tuple[bytes, int, int] | None = None
    error: str | None = None
    transient: bool = False  # the error can pass without the file changing: try again later
    stored: bool = False  # the path already had a row when triaged: an update, not an add


# A failure whose cause can pass by itself is tried again after 1 minute, then 10, 100 ...
# up to a day; any other waits for the file to change (or `collection add` / `retry`).
RETRY_FIRST = 60.0
RETRY_LAST = 86400.0


def next_try(attempts: int) -> str:
    """When a transient failure that has happened ``attempts`` times is tried again."""
    seconds = min(RETRY_FIRST * 10 ** max(attempts - 1, 0), RETRY_LAST)
    return (datetime.now(timezone.utc) + timedelta(seconds=seconds)).isoformat(timespec="seconds")


# Never added from a folder: hidden files and folders, downloads and copies still being
# written, editors' swap and backup files, and NAS thumbnail and recycle folders.
IGNORE = (".*", "*~", "*.part", "*.crdownload", "*.tmp", "*.swp", "@eaDir", "#recycle", "$RECYCLE.BIN")


def ignored(relative: str, patterns: Iterable[str] = IGNORE) -> bool:
    """Whether a path below a scanned or watched folder is left alone: a pattern
    (fnmatch, case-sensitive) matches one of its parts or the whole relative path."""
    parts = Path(relative).parts
    return any(fnmatchcase(relative, p) or any(fnmatchcase(part, p) for part in parts) for p in patterns)


def wanted(relative: str, patterns: Iterable[str] = IGNORE) -> bool:
    """An image file, by its path below a folder, that a folder scan or the watcher adds."""
    return Path(relative).suffix.lower() in images.EXTENSIONS and not ignored(relative, patterns)


def folders_of(paths: Iterable[str | Path]) -> list[str]:
    """The folders files named on a command line may be read from (resolved): each named
    folder, and the folder of each named file. A symlink is followed only inside these."""
    return sorted({
        os.path.realpath(p if os.path.isdir(p) else os.path.dirname(os.path.abspath(p))) for p in paths
    })


def iter_files(
    paths: Iterable[str | Path], recursive: bool = False, ignore: Iterable[str] = IGNORE
) -> Iterator[str]:
    """Image files under ``paths``, as absolute paths. Named files are always included;
    a folder contributes files with an image extension, skipping ``ignored`` ones."""
    ignore = tuple(ignore)
    for path in paths:
        path = Path(os.path.abspath(path))
        if not path.is_dir():
            yield str(path)
            continue
        walker = os.walk(path) if recursive else [(str(path), [], os.listdir(path))]
        for root, dirs, names in walker:
            below = os.path.relpath(root, path)
            relative = lambda name: os.path.normpath(os.path.join(below, name))  # noqa: E731
            dirs[:] = sorted(d for d in dirs if not ignored(relative(d), ignore))
            for name in sorted(names):
                if not wanted(relative(name), ignore):
                    continue
                full = Path(root) / name
                if full.is_file():
                    yield str(full)


def decode_workers(model: Model) -> int:
    """Threads that decode while the model runs. A model on a GPU leaves the CPU free:
    up to 4 threads. On a CPU, TensorFlow already spreads the model over every core;
    each decoding thread takes a core from it, so one per 4 cores (measured on 2 cores
    with EfficientNet-Lite0: one thread decoding one batch ahead gave 3-11 % more
    images/s than decoding on both cores while the model waits, and a second thread
    alongside the model gave nothing more)."""
    cores = os.cpu_count() or 1
    if model.accelerated:
        return min(4, cores)
    if model.runtime == OPENVINO:
        # OpenVINO needs less than decoding's core-seconds per image (bench/ingest.py,
        # EfficientNet-Lite0 on 2 cores: 6.5 core-ms against 11.4 at fp32), so decoding
        # is the limit: a thread per core, the model's short passes interleaving with them.
        return cores
    return max(1, cores // 4)


# Batches decoded ahead of the one the model takes next. The decoding threads keep busy
# while the calling thread waits for the model, for the upkeep in flight or writes,
# instead of running dry: on 2 cores with OpenVINO, 4 ahead gave `add` a higher share of
# the bound than 2 in 13 rounds of 18 (bench/ingest.py's corpus, both in one process,
# in turn). A decoded image waiting is ~0.2 MB: 13 MB for 4 batches of 16.
DECODE_AHEAD = 4


class KnownContent:
    """``sha256 in known``: whether content with that hash already has a vector, asked by
    the decoding threads, each through a connection of its own, on the sha256 index. (A
    set of every hash, read as `add` started, cost 8 s and some 150 MB at a million images.)
    A row committed since is seen; ``forget`` one whose stored rows were replaced mid-run."""

    def __init__(self, db_path: str | Path):
        self.db_path = db_path
        self._local = threading.local()
        self._opened: list[sqlite3.Connection] = []
        self._forgotten: set[str] = set()
        self._lock = threading.Lock()

    def __contains__(self, sha256: str) -> bool:
        if sha256 in self._forgotten:
            return False
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = sqlite3.connect(self.db_path, timeout=30, check_same_thread=False)
            with self._lock:
                self._opened.append(conn)
        return embedded(conn, sha256)

    def forget(self, sha256: str) -> None:
        self._forgotten.add(sha256)

    def close(self) -> None:
        """Close every thread's connection (call when those threads are done)."""
        with self._lock:
            opened, self._opened = self._opened, []
        for conn in opened:
            conn.close()
        self._local = threading.local()


class Behind:
    """``on_batch`` work on one thread of its own, so that it overlaps the next batches'
    decoding, model calls and commits instead of following them, and on several batches
    at once.

    ``start`` runs on that thread and returns the callable for a list of written ids and
    one to call at the end: whatever SQLite connection they use is opened there, the only
    thread that uses it. Ids gather until there are ``at_least`` of them, then one call
    takes them all: the upkeep after a batch (matches, duplicates) costs less per image
    in larger calls (bench/ingest.py's corpus, EfficientNet-Lite0: 8.1 core-ms per image
    in calls of 16, 3.7 in calls of 64), and all that `collection add` promises is that
    everything is current when it returns. Calls run one at a time, in order. The
    Ingester does not wait for the call in flight: its next batches commit meanwhile and
    their ids gather for the next call, up to ``at_most`` (then it waits, so the work
    behind stays bounded). After a last call with what is left, ``add`` returns. A call
    may find later batches committed too; the upkeep reads its change logs, so what it
    does with them is what an inline call after each batch would have left (tested), and
    the next call does not redo them. An error in a call is raised on the calling thread
    at its next call or at the end.

    Once nothing is left to decode (``hurry``), ids go as soon as their batch is
    committed, so that the upkeep overlaps the last model calls rather than following
    them with the other cores idle."""

    def __init__(
        self, start: Callable[[], tuple[Callable[[list[int]], None], Callable[[], None]]], at_least: int = 1
    ):
        self.at_least = at_least
        self.at_most = 4 * at_least  # ids gathered while a call runs before the writer waits
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="after-batch")
        self._call, self._finish = self._thread.submit(start).result()
        self._gathered: list[int] = []
        self._pending: Future | None = None
        self._hurrying = False
        self._failed = False
        self.core_seconds = 0.0  # CPU time of the calls, on their thread

    def __call__(self, ids: list[int]) -> None:
        self._gathered.extend(ids)
        if self._pending is not None and not self._pending.done():
            if len(self._gathered) < self.at_most:
                return  # it takes these when it is done
            self.wait()
        if len(self._gathered) >= (1 if self._hurrying else self.at_least):
            self._submit()

    def hurry(self) -> None:
        """The caller has nothing more to decode: what has gathered goes now unless a
        call is in flight, and until ``drain`` each call takes what there is."""
        self._hurrying = True
        if self._gathered and (self._pending is None or self._pending.done()):
            self._submit()

    def _submit(self) -> None:
        self.wait()
        gathered, self._gathered = self._gathered, []
        self._pending = self._thread.submit(self._timed, gathered)

    def _timed(self, ids: list[int]) -> None:
        started = time.thread_time()
        try:
            self._call(ids)
        finally:
            self.core_seconds += time.thread_time() - started

    def wait(self) -> None:
        """Until the call in flight is done; raises what it raised (once: after that,
        ``drain`` makes no more calls)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.result()
            except BaseException:
                self._failed = True
                raise

    def drain(self) -> None:
        """One call with the ids gathered so far, if any, and wait for it."""
        self._hurrying = False
        if self._gathered and not self._failed:
            self._submit()
        self.wait()

    def close(self) -> None:
        try:
            self.drain()
        finally:
            try:
                self._thread.submit(self._finish).result()
            finally:
                self._thread.shutdown()


def upkeep_behind(db_path: str | Path, refresh_map: bool = False, at_least: int = 64) -> Behind:
    """The upkeep after each batch (upkeep.py) on a connection and a thread of its own,
    on at least ``at_least`` images a call."""
    from .upkeep import Upkeep

    def start():
        store = Store(db_path)
        upkeep = Upkeep(store, refresh_map=refresh_map)

        def finish() -> None:
            try:
                upkeep.join()
            finally:
                store.close()

        return upkeep.after_batch, finish

    return Behind(start, at_least)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class Ingester:
    """Adds files to a store with a model. Owns no thread-shared state beyond its pool."""

    def __init__(
        self,
        store: Store,
        model: Model,
        batch_size: int | None = None,
        workers: int | None = None,
        thumbnails: bool = True,
        on_batch: Callable[[list[int]], None] | None = None,
        folders: Iterable[str] | None = None,
        limits: files.Limits | None = None,
        retry_failed: bool = False,
    ):
        """``folders``: where files may be read from, symlinks resolved (default: each
        file's own folder). ``retry_failed``: try files that failed before even when
        unchanged (an explicit `collection add` or `collection retry`)."""
        self.store = store
        self.model = model
        self.folders = None if folders is None else [os.path.realpath(f) for f in folders]
        self.limits = limits or files.Limits()
        self.retry_failed = retry_failed
        self._again: list[str] = []  # paths whose known content went mid-run: decoded after
        self.batch_size = batch_size or model.batch_size
        self.workers = workers or decode_workers(model)
        self.thumbnails = thumbnails
        self.on_batch = on_batch  # called with the ids each committed batch wrote
        self.store.claim_model(model.model_id, model.dimensions, model.precision)
        # Content already embedded: a worker that finds its hash skips decoding.
        self.known = KnownContent(store.path)

    def add(self, paths: Iterable[str], progress: Callable[[int], None] | None = None) -> Summary:
        """Add files; a batch of them is decoded by all workers, then embedded and written."""
        summary = Summary()

        def to_read() -> Iterator[_Read]:
            for path in paths:
                read = self._triage(path, summary)
                if read is not None:
                    yield read
                elif progress:
                    progress(1)

        self._add_reads(to_read(), summary, progress)
        if self._again:
            # Content whose stored copy went while this run was under way (it was
            # replaced): decoded this time, now that its hash is no longer "known".
            again, self._again = self._again, []
            self._add_reads((r for p in again if (r := self._triage(p, summary))), summary, None)
        drain = getattr(self.on_batch, "drain", None)  # work still running behind (Behind)
        if drain is not None:
            with summary.timing("after batch"):
                drain()
        return summary

    def _add_reads(
        self, reads: Iterable[_Read], summary: Summary, progress: Callable[[int], None] | None
    ) -> None:
        batch: list[_Read] = []
        other: list[_Read] = []

        def handle(chunk: list[Future]) -> None:
            for future in chunk:
                with summary.timing("decoding"):
                    read = future.result()
                (batch if read.decoded is not None else other).append(read)
                if len(batch) >= self.batch_size:
                    self._write(batch, other, summary)
                    batch.clear()
                    other.clear()
                if progress:
                    progress(1)

        # Decoding runs DECODE_AHEAD batches ahead of the model, in the background.
        queued: deque[list[Future]] = deque()
        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="decode") as pool:
                for chunk in _chunks(reads, self.batch_size):
                    queued.append([pool.submit(self._read, read) for read in chunk])
                    while len(queued) > DECODE_AHEAD:
                        handle(queued.popleft())
                hurry = getattr(self.on_batch, "hurry", None)  # the last batches are decoding
                if hurry is not None:
                    hurry()
                while queued:
                    handle(queued.popleft())
        finally:
            self.known.close()  # the decoding threads' connections; they end with the pool
        if batch or other:
            self._write(batch, other, summary)

    def _triage(self, path: str, summary: Summary) -> _Read | None:
        """Cheap checks on the calling thread: None when the file needs no work."""
        try:
            stat = os.stat(path)
        except OSError as e:
            return _Read(path, 0, 0.0, error=f"cannot read file: {e.strerror or e}",
                         transient=e.errno == errno.EACCES)
        failure = self.store.failure(path)
        if (
            failure
            and not self.retry_failed
            and (failure["size"], failure["mtime"], failure["ctime"])
            == (stat.st_size, stat.st_mtime, stat.st_ctime)
            and (failure["next_try"] is None or failure["next_try"] > now())
        ):
            summary.failed += 1  # failed before, unchanged since, and not due: not tried
            return None
        problem = files.name_problem(path)
        if problem:
            return _Read(path, stat.st_size, stat.st_mtime, stat.st_ctime, error=problem)
        row = self.store.by_path(path)
        if (
            row
            and row["deleted_at"] is None
            and row["size"] == stat.st_size
            and row["mtime"] == stat.st_mtime
        ):
            summary.unchanged += 1
            return None
        return _Read(path, stat.st_size, stat.st_mtime, stat.st_ctime, stored=row is not None)

    def _read(self, read: _Read) -> _Read:
        """Worker thread: read, hash, and (for unknown content) decode and fit."""
        if read.error:
            return read
        folders = self.folders or [os.path.realpath(os.path.dirname(read.path))]
        try:
            data, stat = files.read(read.path, folders, self.limits.max_bytes)
        except files.Unreadable as e:
            read.error, read.transient = str(e), e.transient
            return read
        # What was read, not what triage saw: a file replaced in between is stored as read.
        read.size, read.mtime, read.ctime = stat.st_size, stat.st_mtime, stat.st_ctime
        read.sha256 = images.sha256_bytes(data)
        if read.sha256 in self.known:
            return read
        try:
            decoded = images.decode(
                read.path, data, self.model.min_side, read.sha256, self.limits.max_pixels
            )
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
        with summary.timing("model"):
            if batch:
                vectors, probs = self.model.embed_batch([r.pixels for r in batch])
                summary.batches.append(len(batch))
                labels = self.model.top_labels(probs)
        store = self.store
        first = len(summary.ids)
        with summary.timing("writing"), store.db.atomic():
            for read in other:
                if read.error:
                    self._fail(read)
                    summary.failed += 1
                else:
                    self._reuse(read, summary)
            for i, read in enumerate(batch):
                image_id = store.save_image(
                    read.path,
                    read.mtime,
                    read.decoded.metadata(),
                    vectors[i],
                    labels[i],
                    self.model.model_id,
                    read.thumbnail,
                    probabilities=probs[i],
                )
                store.clear_failure(read.path)
                summary.ids.append(image_id)
                if read.stored:
                    summary.updated += 1
                else:
                    summary.added += 1
        if self.on_batch and len(summary.ids) > first:
            with summary.timing("after batch"):
                self.on_batch(summary.ids[first:])

    def _fail(self, read: _Read) -> None:
        previous = self.store.failure(read.path)
        attempts = (previous["attempts"] if previous else 0) + 1
        self.store.record_failure(
            read.path,
            read.error,
            read.size or None,
            read.mtime or None,
            read.ctime or None,
            next_try(attempts) if read.transient else None,
        )

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
        if not sources:  # hash was known at start, but its rows have been replaced since
            self.known.forget(read.sha256)
            self._again.append(read.path)
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
