"""When a pending file is whole: pure logic over events and looks, with an injected clock.

A file named by events is pending until it is completely written: closed after its
last write (inotify says so), or moved in whole, or, where the platform has no
close events, once its size and mtime have held still for ``settle`` seconds. A
file written to and never closed, or still empty, is taken anyway after ``stuck``
seconds unchanged, in case a close event was lost. Something that is not a
regular file (a FIFO, a device) never becomes whole by waiting: it is handed on
at once, for the reader to refuse. Pending files are handed on together once
events pause for ``debounce`` seconds (or a steady stream has run on for
``max_wait``), so files that arrive together go to the model together.

Nothing here touches the filesystem: the caller passes the clock and a ``look``
function that says what a path is now.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Seen:
    """What a look at a path found."""

    size: int
    mtime_ns: int
    regular: bool = True


# A look returns what the path is now, None when it has gone; OSError: cannot tell yet.
Look = Callable[[str], "Seen | None"]


@dataclass
class Pending:
    """A file events have named, waiting to be whole."""

    last_event: float
    closes: bool  # completeness is told by close events (not guessed from looks)
    writing: bool = False  # written to and not closed since
    seen: tuple[int, int] | None = None  # (size, mtime_ns) at the last look
    stable_since: float = 0.0
    next_look: float = 0.0


class Settle:
    """The pending files, and which of them are whole."""

    def __init__(self, debounce: float = 0.25, max_wait: float = 1.0, settle: float = 1.0, stuck: float = 60.0):
        self.debounce = debounce  # quiet time before a burst is handed on
        self.max_wait = max_wait  # a steady stream is still handed on this often
        self.settle = settle  # size and mtime unchanged this long: whole (no close events)
        self.stuck = stuck  # written to, never closed, unchanged this long: whole anyway
        self.pending: dict[str, Pending] = {}
        self.last_event = 0.0
        self._held_since: float | None = None

    def __len__(self) -> int:
        return len(self.pending)

    def __contains__(self, path: str) -> bool:
        return path in self.pending

    def event(self, path: str, clock: float, closes: bool = False, writing: bool | None = None) -> None:
        """An event named ``path``: ``closes`` when it (or a later one) will tell the file is
        whole; ``writing`` True after a write, False after a close, None to leave as is."""
        entry = self.pending.get(path)
        if entry is None:
            entry = self.pending[path] = Pending(clock, closes)
        entry.last_event = self.last_event = clock
        entry.next_look = 0.0  # news: look again once the debounce is over
        entry.closes = entry.closes or closes
        if writing is not None:
            entry.writing = writing

    def take(self, path: str) -> Pending | None:
        """Stop waiting for ``path``; what was known about it (to carry over a rename)."""
        return self.pending.pop(path, None)

    def put(self, path: str, entry: Pending, clock: float) -> None:
        """Wait for ``path`` with ``entry`` (one taken from its old name, or a new one)."""
        entry.last_event = self.last_event = clock
        self.pending[path] = entry

    def under(self, prefix: str) -> Iterator[str]:
        return iter([p for p in self.pending if p.startswith(prefix)])

    def clear(self) -> None:
        self.pending.clear()
        self._held_since = None

    def ready(self, clock: float, look: Look) -> list[str]:
        """The whole files, sorted, once events pause; they stop being pending. Paths
        that have gone are dropped (their deleted event says what to do)."""
        ready, gone = [], []
        for path, entry in self.pending.items():
            whole = self._whole(path, entry, clock, look)
            if whole is None:
                gone.append(path)
            elif whole:
                ready.append(path)
        for path in gone:
            del self.pending[path]
        if not ready:
            self._held_since = None
            return []
        if clock - self.last_event < self.debounce:
            self._held_since = self._held_since or clock
            if clock - self._held_since < self.max_wait:
                return []
        self._held_since = None
        for path in ready:
            del self.pending[path]
        return sorted(ready)

    def _whole(self, path: str, entry: Pending, clock: float, look: Look) -> bool | None:
        """Whether the file is completely written; None when it has gone."""
        if clock - entry.last_event < self.debounce or clock < entry.next_look:
            return False
        try:
            seen = look(path)
        except OSError:
            return False
        if seen is None:
            return None
        if not seen.regular:
            return True  # a FIFO or device is never whole by waiting: let the reader refuse it
        key = (seen.size, seen.mtime_ns)
        if key != entry.seen:
            entry.seen, entry.stable_since = key, clock
        if entry.closes and not entry.writing and seen.size:
            return True  # closed after its last write, or moved in whole
        # No close to go by: still. Written to and never closed, or still empty: a close
        # event may have been lost (queue overflow), so give up waiting after a long while.
        needed = self.stuck if entry.writing or not seen.size else self.settle
        if clock - entry.stable_since >= needed:
            return True
        entry.next_look = clock + self.settle
        return False
