"""The watcher's status line: what it counts, and how it is drawn on a terminal or a log."""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass
from typing import TextIO


@dataclass
class Stats:
    """What the status line shows."""

    state: str = "starting"
    observer: str = ""  # inotify, polling, ...
    seen: int = 0  # files looked at
    stored: int = 0  # added, updated or reused
    failed: int = 0  # files under the folder in the failures table
    deleted: int = 0
    queued: int = 0
    rate: float = 0.0  # images embedded per second in the latest batch

    def line(self) -> str:
        return (
            f"{self.state}: {self.seen} seen, {self.stored} stored, {self.failed} failed, "
            f"{self.deleted} deleted, {self.queued} queued, {self.rate:.1f} images/s"
        )


class StatusLine:
    """The daemon's state on a terminal: redrawn in place on a TTY, else a plain line
    now and then (when it has changed), so a log file stays readable."""

    def __init__(self, stream: TextIO | None = None, every: float | None = None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every if every is not None else (0.2 if self.tty else 10.0)
        self._drawn = ""
        self._at = 0.0
        self._lock = threading.Lock()

    def update(self, stats: Stats, force: bool = False) -> None:
        line = stats.line()
        with self._lock:
            clock = time.monotonic()
            if line == self._drawn or (not force and clock - self._at < self.every):
                return
            self._at, self._drawn = clock, line
            self.stream.write(f"\r\x1b[K{line}" if self.tty else f"{line}\n")
            self.stream.flush()

    def say(self, message: str) -> None:
        """A line of its own, above the status line."""
        with self._lock:
            if self.tty:
                self.stream.write(f"\r\x1b[K{message}\n{self._drawn}")
            else:
                self.stream.write(f"{message}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
