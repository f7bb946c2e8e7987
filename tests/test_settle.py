"""settle.py: when a pending file is whole, with an injected clock and no filesystem."""

from __future__ import annotations

import pytest

from collection.settle import Pending, Seen, Settle


class Files:
    """A pretend folder: what ``look`` finds at each path."""

    def __init__(self):
        self.seen: dict[str, Seen] = {}
        self.failing: set[str] = set()
        self.looks = 0

    def look(self, path: str) -> Seen | None:
        self.looks += 1
        if path in self.failing:
            raise PermissionError(path)
        return self.seen.get(path)


@pytest.fixture
def files() -> Files:
    return Files()


def test_a_closed_file_is_ready_once_events_pause(files):
    settle = Settle(debounce=0.25, max_wait=1.0)
    files.seen["a.jpg"] = Seen(100, 1)
    settle.event("a.jpg", 0.0, closes=True, writing=True)
    settle.event("a.jpg", 0.1, closes=True, writing=False)  # closed after writing
    assert settle.ready(0.2, files.look) == []  # the burst may go on
    assert settle.ready(0.4, files.look) == ["a.jpg"]
    assert "a.jpg" not in settle and len(settle) == 0


def test_a_file_being_written_waits_for_its_close(files):
    settle = Settle(debounce=0.25, stuck=60.0)
    files.seen["a.jpg"] = Seen(100, 1)
    settle.event("a.jpg", 0.0, closes=True, writing=True)
    assert settle.ready(5.0, files.look) == []
    settle.event("a.jpg", 5.1, writing=False)
    assert settle.ready(5.5, files.look) == ["a.jpg"]


def test_a_written_file_never_closed_is_taken_after_stuck_seconds(files):
    settle = Settle(debounce=0.25, settle=1.0, stuck=10.0)
    files.seen["a.jpg"] = Seen(100, 1)
    settle.event("a.jpg", 0.0, closes=True, writing=True)  # its close event was lost
    clock = 0.5
    while clock < 10.4:
        assert settle.ready(clock, files.look) == []
        clock += 0.5
    assert settle.ready(11.0, files.look) == ["a.jpg"]


def test_without_close_events_a_file_is_whole_once_still_for_settle_seconds(files):
    settle = Settle(debounce=0.25, settle=1.0)
    files.seen["a.jpg"] = Seen(10, 1)
    settle.event("a.jpg", 0.0)  # polling: no close events
    assert settle.ready(0.5, files.look) == []  # first look starts the clock
    files.seen["a.jpg"] = Seen(20, 2)  # still growing
    assert settle.ready(1.6, files.look) == []
    assert settle.ready(2.2, files.look) == []
    assert settle.ready(2.7, files.look) == ["a.jpg"]


def test_looks_are_spaced_by_settle_seconds(files):
    settle = Settle(debounce=0.0, settle=1.0)
    files.seen["a.jpg"] = Seen(10, 1)
    settle.event("a.jpg", 0.0)
    for i in range(10):
        settle.ready(i * 0.05, files.look)  # ten ticks within half a second
    assert files.looks == 1


def test_a_fifo_or_device_is_handed_on_at_once_for_the_reader_to_refuse(files):
    settle = Settle(debounce=0.25, stuck=60.0)
    files.seen["p.jpg"] = Seen(0, 1, regular=False)
    settle.event("p.jpg", 0.0, closes=True, writing=True)
    assert settle.ready(0.3, files.look) == ["p.jpg"]


def test_a_file_that_has_gone_is_dropped_and_one_that_cannot_be_looked_at_waits(files):
    settle = Settle(debounce=0.0)
    files.failing.add("locked.jpg")
    settle.event("gone.jpg", 0.0, closes=True)
    settle.event("locked.jpg", 0.0, closes=True)
    assert settle.ready(0.1, files.look) == []
    assert "gone.jpg" not in settle and "locked.jpg" in settle


def test_a_steady_stream_is_still_handed_on_every_max_wait(files):
    settle = Settle(debounce=0.25, max_wait=1.0)
    files.seen["a.jpg"] = Seen(1, 1)
    settle.event("a.jpg", 0.0, closes=True)
    taken, clock, n = [], 0.3, 0
    while clock < 1.5:
        n += 1
        files.seen[f"b{n}.jpg"] = Seen(1, 1)
        settle.event(f"b{n}.jpg", clock, closes=True)  # a new file every 0.1 s: never a pause
        taken += settle.ready(clock + 0.01, files.look)
        clock += 0.1
    assert "a.jpg" in taken


def test_a_rename_carries_what_was_known(files):
    settle = Settle(debounce=0.25)
    files.seen["b.jpg"] = Seen(5, 1)
    settle.event("a.part", 0.0, closes=True, writing=True)
    entry = settle.take("a.part")
    entry.writing = False
    settle.put("b.jpg", entry, 1.0)
    assert settle.ready(1.1, files.look) == []
    assert settle.ready(1.3, files.look) == ["b.jpg"]
    settle.put("c.jpg", Pending(2.0, closes=True), 2.0)
    assert list(settle.under("c")) == ["c.jpg"]
    settle.clear()
    assert len(settle) == 0
