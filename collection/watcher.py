"""Keep the collection in step with a folder: watchdog handler -> queue -> one worker.

The handler only enqueues events. One worker thread owns the SQLite connection and
the model: it turns events into pending paths, waits until each file is whole, then
drains everything ready into one ``Ingester.add`` call, so a burst is embedded in
full batches while a single dropped file is stored about a second after it lands.
When a file is whole is settle.py's to decide; the status line is status.py's.
Only regular files inside the folder are read (files.py); a failed file is tried
again when it changes, or, for a cause that can pass (permissions), when due.

Renames are applied to the row directly (same id, no model run); deletes mark the
row deleted. A reconcile scan on start, and again every ``rescan_every`` seconds,
adds what changed while the daemon was down or the event stream missed, and marks
deleted the rows whose files are gone. A folder that disappears (an unmounted
share) is waited for, and its rows are left alone.
"""

from __future__ import annotations

import errno
import os
import queue
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from . import files, live
from .ingest import IGNORE, Ingester, Summary, ignored, iter_files, wanted
from .models import Model
from .settle import Pending, Seen, Settle
from .status import Stats, StatusLine
from .store import Store, now
from .upkeep import Upkeep

__all__ = ["Watcher", "Stats", "StatusLine", "run_until_stopped"]

# What the worker acts on; opens, reads and attribute changes are never delivered.
EVENTS = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
]
LIMITS = (errno.ENOSPC, errno.EMFILE)  # inotify's watch and instance limits
TICK = 0.05  # seconds the worker waits for an event before looking at pending files
RETRY = 30.0  # seconds to the next rescan after an unexpected error


class _Enqueue(FileSystemEventHandler):
    """The watchdog handler: it only enqueues, so the observer never waits on SQLite or the model."""

    def __init__(self, events: queue.Queue):
        self.events = events

    def dispatch(self, event: FileSystemEvent) -> None:
        self.events.put(event)


class Watcher:
    """Keeps a collection database in step with a folder and its subfolders, until stopped.

    ``start()`` returns once the worker has opened the database (raising what that
    raised); ``ready`` is set once the first reconcile scan is done and watching runs.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        db_path: str | os.PathLike,
        model: Model,
        *,
        poll: bool = False,
        rescan_every: float = 600.0,
        ignore: Iterable[str] = IGNORE,
        batch_size: int | None = None,
        debounce: float = 0.25,
        max_wait: float = 1.0,
        settle: float = 1.0,
        stuck: float = 60.0,
        recheck: float = 2.0,
        poll_interval: float = 1.0,
        limits: files.Limits | None = None,
        echo: Callable[[str], None] | None = None,
        report: Callable[[Stats, bool], None] | None = None,
    ):
        self.root = os.path.abspath(folder)
        self.db_path = db_path
        self.model = model
        self.poll = poll
        self.rescan_every = rescan_every
        self.ignore = tuple(ignore)
        self.batch_size = batch_size
        self.settle = settle  # a file changed more recently than this waits like an event
        self.recheck = recheck  # how often a missing or replaced folder is looked for
        self.poll_interval = poll_interval
        self.limits = limits or files.Limits()
        self.echo = echo or (lambda message: print(message, file=sys.stderr))
        self.report, self.echo = live.recording(db_path, report, self.echo)  # for /-/status
        self.stats = Stats()
        self.ready = threading.Event()
        self._events: queue.Queue[FileSystemEvent] = queue.Queue()
        self._stopping = threading.Event()
        self._opened = threading.Event()
        # Set as the worker exits. Waited on instead of Thread.join: on Python 3.11 a join
        # interrupted by KeyboardInterrupt (SIGTERM, see run_until_stopped) marks the thread
        # stopped while it runs, so a later join returned at once and the process exited
        # mid-batch, without its final status line.
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="watcher", daemon=True)
        # Everything below belongs to the worker thread.
        self._observer: BaseObserver | None = None
        self._closes = False
        self._root_id: tuple[int, int] | None = None
        self._settle = Settle(debounce, max_wait, settle, stuck)
        self._in_flight = 0
        self._moved = 0
        self._deleted: list[int] = []
        self._said_empty = False

    # --- control, from any thread -------------------------------------------------

    def start(self) -> Watcher:
        self._thread.start()
        self._opened.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def stop(self) -> None:
        """Finish the batch in hand, write it, and exit."""
        self._stopping.set()
        if self._thread.ident is not None:
            self._done.wait()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker to exit; whether it has."""
        return self._done.wait(timeout)

    def __enter__(self) -> Watcher:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- the worker ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._work()
        finally:
            self._done.set()

    def _work(self) -> None:
        try:
            self.store = Store(self.db_path)
            self.upkeep = Upkeep(self.store, stopping=self._stopping)
            self.ingester = self._ingester()
        except BaseException as e:
            self._error = e
            self._opened.set()
            return
        self._opened.set()
        try:
            self._loop()
        finally:
            self._unwatch()
            # Background work is told to stop, not waited for: a matches fill resumes and a
            # map recompute runs again after the next start; an index build is abandoned
            # and its temporaries cleaned then.
            self.upkeep.join()
            self.stats.state = "stopped"
            self._report(force=True)
            self.store.close()

    def _loop(self) -> None:
        scan: str | None = "start"
        next_rescan = next_check = 0.0
        while not self._stopping.is_set():
            try:
                if self._observer is None:
                    if not self._watch():
                        self._stopping.wait(self.recheck)
                        continue
                    scan = scan or "rescan"  # back after a gap: catch up
                if scan:
                    self._reconcile(scan)
                    scan = None
                    next_rescan = time.monotonic() + self.rescan_every
                    self.ready.set()
                self._collect()
                paths = self._take_ready(time.monotonic())
                if paths or self._moved or self._deleted:
                    self._ingest(paths, "events")
                clock = time.monotonic()
                if clock >= next_rescan:
                    scan = "rescan"
                if clock >= next_check:
                    next_check = clock + self.recheck
                    if not self._folder_is_ours():
                        self._lost_folder()
                    else:
                        self._retry_due()
            except Exception as e:  # the daemon outlives any one failure; a rescan catches up
                self.echo(f"error: {type(e).__name__}: {e} (rescanning in {RETRY:.0f} s)")
                next_rescan = time.monotonic() + RETRY
                self._stopping.wait(1.0)
            self._report()

    # --- watching the folder ------------------------------------------------------

    def _watch(self) -> bool:
        """Start observing the folder; False while it is missing or cannot be watched."""
        try:
            st = os.stat(self.root)
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
            self._observer = self._start_observer()
        except OSError as e:
            self._waiting(f"cannot watch {self.root}: {e.strerror or e}")
            return False
        self._root_id = (st.st_dev, st.st_ino)
        self.stats.state = "watching"
        self.stats.observer = type(self._observer).__name__.removesuffix("Observer").lower()
        self.echo(f"Watching {self.root} ({self.stats.observer})")
        return True

    def _start_observer(self) -> BaseObserver:
        if not self.poll:
            try:
                return self._schedule(*self._native())
            except OSError as e:
                if e.errno not in LIMITS:
                    raise
                self.echo(
                    f"inotify limit reached ({e.strerror}): polling {self.root} instead. "
                    "Raise fs.inotify.max_user_watches / max_user_instances for instant events."
                )
        return self._schedule(PollingObserver(timeout=self.poll_interval), closes=False)

    @staticmethod
    def _native() -> tuple[BaseObserver, bool]:
        """The platform's observer, and whether it reports a file closed after writing."""
        if sys.platform.startswith("linux"):
            from watchdog.observers.inotify import InotifyObserver

            # Full events tell a file moved in (whole) from one being created (written to).
            return InotifyObserver(generate_full_events=True), True
        from watchdog.observers import Observer

        return Observer(), False

    def _schedule(self, observer: BaseObserver, closes: bool) -> BaseObserver:
        observer.schedule(_Enqueue(self._events), self.root, recursive=True, event_filter=EVENTS)
        try:
            observer.start()
        except BaseException:
            observer.stop()
            raise
        self._closes = closes
        return observer

    def _unwatch(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join()
            self._observer = None

    def _folder_is_ours(self) -> bool:
        """The folder is there and is the one being watched (not a mount point left empty
        by an unmounted share, nor a new folder of the same name)."""
        try:
            st = os.stat(self.root)
        except OSError:
            return False
        return stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) == self._root_id

    def _lost_folder(self) -> None:
        """Stop watching and leave every row alone; the loop waits for the folder to return."""
        self._unwatch()
        self._settle.clear()
        while not self._events.empty():  # events from the old folder mean nothing now
            self._events.get_nowait()
        self._waiting(f"{self.root} has gone (an unmounted share?)")

    def _waiting(self, why: str) -> None:
        if not self.stats.state.startswith("waiting"):
            self.echo(f"{why}: waiting for it, checking every {self.recheck:g} s")
        self.stats.state = "waiting for the folder"

    # --- events -> pending paths, moves and deletes ---------------------------------

    def _collect(self) -> None:
        """Apply every queued event: renames and deletes now, new and changed files to pending."""
        try:
            events = [self._events.get(timeout=TICK)]
        except queue.Empty:
            return
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        if not self._folder_is_ours():
            self._lost_folder()
            return
        clock = time.monotonic()
        with self.store.db.atomic():
            for event in events:
                self._apply(event, clock)

    def _apply(self, event: FileSystemEvent, clock: float) -> None:
        src, dest = event.src_path, event.dest_path
        kind = event.event_type
        if kind == "moved" and event.is_directory:
            if not src:
                self._scan_in(dest, clock)  # moved in from outside
            elif not dest:
                self._gone_tree(src)  # moved out
            # within the folder: a moved event follows for each file in it
        elif kind == "moved":
            if not src:
                self._add(dest, clock, closes=True)  # moved in from outside: whole already
            elif not dest:
                self._gone(src)
            else:
                self._move(src, dest, clock)
        elif kind == "created" and event.is_directory:
            self._scan_in(src, clock)
        elif kind == "created":
            self._add(src, clock, closes=self._closes)
        elif kind == "modified":
            self._add(src, clock, writing=self._closes)
        elif kind == "closed":
            self._add(src, clock, closes=True, writing=False)
        elif kind == "deleted" and event.is_directory:
            self._gone_tree(src)
        elif kind == "deleted":
            self._gone(src)

    def _wanted(self, path: str) -> bool:
        relative = os.path.relpath(path, self.root)
        return not relative.startswith(os.pardir) and wanted(relative, self.ignore)

    def _add(self, path: str, clock: float, closes: bool = False, writing: bool | None = None) -> None:
        if self._wanted(path):
            self._settle.event(path, clock, closes, writing)

    def _scan_in(self, folder: str, clock: float) -> None:
        """A folder created or moved in: everything in it is pending."""
        if ignored(os.path.relpath(folder, self.root), self.ignore):
            return
        for path in iter_files([folder], recursive=True, ignore=self.ignore):
            self._add(path, clock, closes=self._closes)

    def _move(self, src: str, dest: str, clock: float) -> None:
        """Renamed or moved within the folder: the same image, id and vector under the new path."""
        entry = self._settle.take(src)
        if not self._wanted(dest) or files.name_problem(dest):
            self._gone(src)  # renamed to something ignored: as good as deleted
            self._add(dest, clock, closes=True)  # a name that cannot be stored: a failure says so
            return
        self.store.clear_failure(src)
        row = self.store.by_path(src)
        if row is not None and row["deleted_at"] is None:
            replaced = self.store.by_path(dest)
            self.store.move(row["id"], dest, row["mtime"])  # a rename keeps the mtime
            if replaced is not None and replaced["id"] != row["id"]:
                self._deleted.append(replaced["id"])  # store.move dropped the row it replaced
            self._moved += 1
            if entry is None and not _unchanged(dest, row):
                entry = Pending(clock, closes=True)
        elif entry is None:
            entry = Pending(clock, closes=True)  # a download or copy renamed into place when done
        if entry is not None:
            self._settle.put(dest, entry, clock)

    def _gone(self, path: str) -> None:
        self._settle.take(path)
        if os.path.lexists(path):
            return  # deleted and put back since
        row = self.store.by_path(path)
        if row is not None and row["deleted_at"] is None:
            self._mark_deleted([row["id"]])
        self.store.clear_failure(path)

    def _gone_tree(self, folder: str) -> None:
        prefix = os.path.join(folder, "")
        for path in self._settle.under(prefix):
            self._settle.take(path)
        self._mark_deleted(
            image_id for image_id, path in self._rows_under(prefix) if not os.path.lexists(path)
        )

    def _mark_deleted(self, image_ids: Iterable[int]) -> None:
        image_ids = list(image_ids)
        self.store.mark_deleted(image_ids)
        self._deleted.extend(image_ids)

    def _rows_under(self, prefix: str) -> list[tuple[int, str]]:
        return self.store.db.execute(
            "select id, path from images where deleted_at is null and substr(path, 1, ?) = ?",
            [len(files.display(prefix)), files.display(prefix)],
        ).fetchall()

    # --- pending -> whole files --------------------------------------------------------

    def _take_ready(self, clock: float) -> list[str]:
        return self._settle.ready(clock, _look)

    # --- reconcile and ingest --------------------------------------------------------

    def _reconcile(self, source: str) -> None:
        """Make the database match the folder: add new and changed files, mark deleted
        the rows whose files have gone. Files written to very recently wait like events."""
        self.stats.state = "scanning"
        self._report(force=True)
        self.ingester = self._ingester()  # with the hashes as they are now
        files = list(iter_files([self.root], recursive=True, ignore=self.ignore))
        clock, recent = time.monotonic(), time.time() - self.settle
        whole = []
        for path in files:
            if path in self._settle:
                continue
            try:
                mtime = os.stat(path).st_mtime
            except OSError:
                continue
            if mtime > recent:
                self._settle.event(path, clock)
            else:
                whole.append(path)
        if self._folder_is_ours():
            self._forget_missing(bool(files))
        self._ingest(whole, source, logged=True)
        self.stats.state = "watching"

    def _forget_missing(self, found_any: bool) -> None:
        prefix = os.path.join(self.root, "")
        gone = [image_id for image_id, path in self._rows_under(prefix) if not os.path.lexists(path)]
        if gone and not found_any:
            if not self._said_empty:
                self.echo(
                    f"{self.root} has no images, but {len(gone)} in the collection came from it: "
                    "leaving them as they are (an unmounted share?) until it has images again"
                )
                self._said_empty = True
            return
        self._said_empty = False
        failures = self.store.failures_under(prefix)
        with self.store.db.atomic():
            self._mark_deleted(gone)
            for path in failures:
                if not os.path.lexists(path):
                    self.store.clear_failure(path)

    def _ingester(self) -> Ingester:
        # Each committed batch is in similar-image results, matches and the map at once.
        return Ingester(
            self.store,
            self.model,
            batch_size=self.batch_size,
            on_batch=self.upkeep.after_batch,
            folders=[self.root],
            limits=self.limits,
        )

    def _retry_due(self) -> None:
        """Failures whose cause may have passed (permissions, a file changing while read)
        and whose next try has come: tried again, without waiting for a rescan."""
        due = [p for p in self.store.failures_under(os.path.join(self.root, ""), due_by=now())
               if os.path.lexists(p) and p not in self._settle]
        if due:
            self._ingest(due, "retry")

    def _ingest(self, paths: list[str], source: str, logged: bool = False) -> None:
        """One ``Ingester.add`` call for everything ready, then one ingest_log row."""
        started = time.monotonic()
        self._in_flight = len(paths)
        try:
            summary = (
                self.ingester.add(self._until_stopped(paths), progress=self._progress) if paths else Summary()
            )
        finally:
            self._in_flight = 0
        seconds = time.monotonic() - started
        moved, deleted = self._moved, self._deleted
        self._moved, self._deleted = 0, []
        if moved or deleted:  # a deleted image leaves the lists that named it
            self.upkeep.after_delete(deleted)
        if logged or summary.seen or moved or deleted:
            self.store.log_ingest(
                {
                    "at": now(),
                    "source": source,
                    "files": summary.seen,
                    "added": summary.added,
                    "updated": summary.updated,
                    "reused": summary.reused,
                    "moved": moved,
                    "unchanged": summary.unchanged,
                    "failed": summary.failed,
                    "deleted": len(deleted),
                    "seconds": round(seconds, 3),
                    "runtime": self.model.runtime_version,
                }
            )
        self.stats.stored += summary.added + summary.updated + summary.reused
        self.stats.deleted += len(deleted)
        if summary.batches:
            self.stats.rate = sum(summary.batches) / max(seconds, 1e-6)
        self.stats.failed = self.store.count_failures_under(os.path.join(self.root, ""))

    def _until_stopped(self, paths: list[str]) -> Iterator[str]:
        """Hand paths to the ingester until a stop is asked for: the batch in hand is
        finished, the rest is picked up by the next start's reconcile."""
        for path in paths:
            if self._stopping.is_set():
                return
            yield path

    def _progress(self, n: int) -> None:
        self.stats.seen += n
        self._in_flight -= n
        self._report()

    def _report(self, force: bool = False) -> None:
        self.stats.queued = len(self._settle) + max(self._in_flight, 0)
        if self.report:
            self.report(self.stats, force)


def _look(path: str) -> Seen | None:
    """What settle.py needs to know about a path now; None when it has gone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return Seen(st.st_size, st.st_mtime_ns, stat.S_ISREG(st.st_mode))


def _unchanged(path: str, row: dict) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_size == row["size"] and st.st_mtime == row["mtime"]


def run_until_stopped(watcher: Watcher, alive: Callable[[], bool] = lambda: True) -> None:
    """Run the watcher until Ctrl-C or SIGTERM (or until ``alive()`` turns false); the
    batch in hand is finished and written first."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # the same as Ctrl-C
    try:
        watcher.start()
        while not watcher.join(0.5) and alive():
            pass
    except KeyboardInterrupt:
        pass
    finally:
        watcher.stop()
        signal.signal(signal.SIGTERM, previous)
