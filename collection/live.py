"""What the watcher is doing, for the browser's /-/status page.

The watcher's worker hands every status update to a ``Recorder`` (one line in
watcher.py), which keeps a small JSON file beside the database,
``<db>.status.json``, replaced atomically (write a temporary file, ``os.replace``) at
most once a second while anything changes, and every ``HEARTBEAT`` seconds while
idle. A reader never sees a half-written file and never takes a database lock.

The file holds this run's counters and, per second, how many files the worker
finished and when the busy spell they belong to began (files were waiting); ``read``
turns those into images per second over the last minute at the moment of reading:
the files finished in the last minute over the time since work on them began (or a
minute, if longer). A burst shows its real pace while it runs, and the rate falls to 0
once the watcher is idle even if nothing writes. A watcher that has stopped writing
and whose process is gone (or that has not written for ten minutes) is reported as not
running. Totals (images, deleted, failures) are not here: the status page counts them
in the database, so a restart never looks like data lost.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

WINDOW = 60.0  # seconds the rate is measured over
EVERY = 1.0  # at most one write a second
HEARTBEAT = 10.0  # written at least this often while the watcher runs
GONE_AFTER = 3 * HEARTBEAT  # no write for this long, and no such process: not running
STALE_AFTER = 600.0  # no write for this long: not running, whatever holds its pid now
COUNTERS = ("seen", "stored", "failed", "deleted", "queued")


def status_path(db_path: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(db_path)}.status.json")


class Recorder:
    """Records a watcher's status updates into ``status_path(db_path)``.

    ``report(stats, force)`` and ``echo(message)`` have the watcher's own callbacks'
    shapes and pass everything on to them; ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        db_path: str | os.PathLike,
        report: Callable | None = None,
        echo: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.path = status_path(db_path)
        self._report, self._echo, self._clock = report, echo, clock
        self._lock = threading.Lock()
        self._started = clock()
        self._done: dict[int, list] = {}  # whole second -> [files finished in it, its spell's start]
        self._busy_since: float | None = None  # when files began waiting, while any do
        self._seen = 0
        self._state: dict = {}
        self._error: dict | None = None
        self._written_at = 0.0
        self._written: dict | None = None

    def report(self, stats, force: bool = False) -> None:
        if self._report:
            self._report(stats, force)
        now = self._clock()
        with self._lock:
            if self._busy_since is None and (stats.queued or stats.seen > self._seen):
                self._busy_since = now
            if stats.seen > self._seen:
                entry = self._done.setdefault(int(now), [0, self._busy_since])
                entry[0] += stats.seen - self._seen
            if not stats.queued:
                self._busy_since = None
            self._seen = stats.seen
            self._state = {
                "state": stats.state,
                "observer": stats.observer,
                **{name: getattr(stats, name) for name in COUNTERS},
            }
            self._write(now, force)

    def echo(self, message: str) -> None:
        if self._echo:
            self._echo(message)
        if message.startswith("error"):
            with self._lock:
                self._error = {"at": self._clock(), "message": message}
                self._write(self._clock(), force=True)

    def _write(self, now: float, force: bool) -> None:
        for second in [s for s in self._done if s < now - WINDOW]:
            del self._done[second]
        done = [[second, n, since] for second, (n, since) in sorted(self._done.items())]
        content = {**self._state, "last_error": self._error, "done": done}
        changed = content != self._written
        due = now - self._written_at >= (EVERY if changed else HEARTBEAT)
        if not (force or due):
            return
        record = {**content, "pid": os.getpid(), "started_at": self._started, "written_at": now}
        try:
            fd, temporary = tempfile.mkstemp(prefix=".status-", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            os.replace(temporary, self.path)
        except OSError:
            return  # the status page is a convenience: a full disk must not stop the watcher
        self._written, self._written_at = content, now


def recording(db_path, report, echo) -> tuple[Callable, Callable[[str], None]]:
    """The watcher's ``report`` and ``echo``, recording into the status file as well."""
    recorder = Recorder(db_path, report, echo)
    return recorder.report, recorder.echo


def read(db_path: str | os.PathLike, now: float | None = None) -> dict | None:
    """The watcher's last recorded status with its rate as of ``now``; None if it never
    ran on this database. ``running`` is False once it has not written for GONE_AFTER."""
    try:
        record = json.loads(status_path(db_path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    now = time.time() if now is None else now
    written_at = float(record.get("written_at") or 0)
    # A scan of a huge folder can go a while without a write: a live process still counts.
    quiet = now - written_at
    running = record.get("state") != "stopped" and (
        quiet < GONE_AFTER or (quiet < STALE_AFTER and _alive(record.get("pid")))
    )
    done = [entry for entry in record.get("done") or [] if entry[0] >= now - WINDOW]
    rate = 0.0
    if running and done:
        began = max(now - WINDOW, float(done[0][2] if done[0][2] is not None else done[0][0]))
        rate = sum(entry[1] for entry in done) / max(1.0, now - began)
    return {
        "running": running,
        "state": record.get("state") if running else "not running",
        "observer": record.get("observer"),
        "session": {name: record.get(name) for name in COUNTERS},
        "queued": record.get("queued") if running else 0,
        "rate": round(rate, 2),
        "last_error": record.get("last_error"),
        "started_at": record.get("started_at"),
        "written_at": written_at,
        "pid": record.get("pid"),
    }


def _alive(pid) -> bool:
    """Whether a process with this id exists here (the watcher and the server share a host)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True
