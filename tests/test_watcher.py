"""The watcher with real watchdog observers on a temporary folder."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from collection.index import open_index
from collection.ingest import IGNORE
from collection.watcher import Stats, StatusLine, Watcher
from conftest import free_port, make_image, wait_until

RANDOM_MODEL = "efficientnet_lite0:random"


@pytest.fixture
def watch(inbox, db_path, counting_model):
    """Start a Watcher on ``inbox`` (stopped at the end); returns it once its first scan is done."""
    watchers = []

    def start(**options) -> Watcher:
        options = {"recheck": 0.2, "poll_interval": 0.25, **options}
        messages = options.pop("messages", [])
        watcher = Watcher(inbox, db_path, counting_model, echo=messages.append, **options).start()
        watchers.append(watcher)
        wait_until(watcher.ready.is_set, 30, message="the first reconcile")
        return watcher

    yield start
    for watcher in watchers:
        watcher.stop()


def live_paths(store) -> set[str]:
    return {row[0] for row in store.db.execute("select path from images where deleted_at is null")}


def count_live(store) -> int:
    return store.db.execute("select count(*) from images where deleted_at is null").fetchone()[0]


def logged(store, column: str) -> int:
    return store.db.execute(f"select coalesce(sum({column}), 0) from ingest_log").fetchone()[0]


def png_bytes(tmp_path: Path, seed: int) -> bytes:
    return make_image(tmp_path / f"source-{seed}.png", seed=seed, size=(320, 240)).read_bytes()


@pytest.mark.parametrize("poll", [False, True], ids=["inotify", "polling"])
def test_a_burst_of_50_files_is_stored_in_batches(watch, inbox, store, counting_model, poll):
    watch(poll=poll)
    paths = {str(make_image(inbox / f"{i:02}.png", seed=i)) for i in range(50)}
    wait_until(lambda: count_live(store) == 50, 60, message="50 rows")
    assert live_paths(store) == paths
    assert sum(counting_model.calls) == 50
    assert max(counting_model.calls) > 1


@pytest.mark.parametrize("poll", [False, True], ids=["inotify", "polling"])
def test_a_file_written_slowly_is_stored_once_and_complete(
    watch, inbox, store, tmp_path, counting_model, poll
):
    watch(poll=poll)
    data = png_bytes(tmp_path, seed=7)
    path = inbox / "slow.png"
    with open(path, "wb") as f:  # eight chunks over two seconds, as a slow copy writes them
        for i in range(8):
            f.write(data[i * len(data) // 8 : (i + 1) * len(data) // 8])
            f.flush()
            time.sleep(0.25)
    row = wait_until(lambda: store.by_path(str(path)), 20, message="the slow file's row")
    assert row["sha256"] == hashlib.sha256(data).hexdigest()
    wait_until(lambda: logged(store, "added"), 10, message="the batch's ingest_log row")
    assert (logged(store, "added"), logged(store, "updated"), logged(store, "failed")) == (1, 0, 0)
    assert counting_model.calls == [1]
    assert store.failure(str(path)) is None


def test_partial_hidden_and_ignored_files_are_never_added(watch, inbox, store, tmp_path):
    watch(ignore=IGNORE + ("drafts",))
    for name in (".hidden.png", "b.png~", "c.png.part", "d.tmp", "@eaDir/e.png", "drafts/f.png"):
        make_image(inbox / name, seed=1, fmt="PNG")
    download = inbox / "photo.png.crdownload"  # a browser download, renamed when complete
    download.write_bytes(png_bytes(tmp_path, seed=2)[:100])
    with open(download, "ab") as f:
        f.write(png_bytes(tmp_path, seed=2)[100:])
    download.rename(inbox / "photo.png")
    wait_until(lambda: store.by_path(str(inbox / "photo.png")), 20, message="the finished download")
    assert live_paths(store) == {str(inbox / "photo.png")}
    assert store.db["failures"].count == 0


def test_rename_keeps_the_id_and_delete_hides_the_image(watch, inbox, store, db_path, counting_model):
    watch()
    first = make_image(inbox / "first.png", seed=1)
    other = make_image(inbox / "other.png", seed=2)
    wait_until(lambda: count_live(store) == 2, 20, message="two rows")
    image_id, other_id = store.by_path(str(first))["id"], store.by_path(str(other))["id"]
    similar = lambda: [i for i, _ in open_index(db_path).similar(other_id, 10, -1.0)]  # noqa: E731
    assert similar() == [image_id]
    calls = list(counting_model.calls)

    renamed = inbox / "album" / "renamed.png"
    renamed.parent.mkdir()
    first.rename(renamed)
    moved = wait_until(lambda: store.by_path(str(renamed)), 20, message="the renamed row")
    assert moved["id"] == image_id
    assert store.by_path(str(first)) is None
    assert counting_model.calls == calls  # no model run
    assert similar() == [image_id]

    renamed.unlink()
    wait_until(lambda: store.by_id(image_id)["deleted_at"], 20, message="deleted_at")
    assert live_paths(store) == {str(other)}
    assert similar() == []
    # The lists that named it are rewritten by the upkeep that follows the deletion's commit.
    naming = lambda: store.db.execute("select count(*) from matches where match_id = ?", [image_id]).fetchone()[0]  # noqa: E731
    wait_until(lambda: naming() == 0, 20, message="no list naming the deleted image")
    assert counting_model.calls == calls


def test_a_folder_moved_in_is_scanned_and_one_moved_out_is_deleted(watch, inbox, store, tmp_path):
    watch()
    outside = tmp_path / "outside"
    for i in range(3):
        make_image(outside / "trip" / f"{i}.png", seed=10 + i)
    (outside / "trip").rename(inbox / "trip")
    wait_until(lambda: count_live(store) == 3, 20, message="the moved-in folder's files")
    (inbox / "trip").rename(outside / "back")
    wait_until(lambda: count_live(store) == 0, 20, message="the moved-out folder's rows deleted")
    assert store.counts()["deleted"] == 3


def test_changes_while_stopped_are_reconciled_on_start(watch, inbox, store, counting_model):
    originals = [make_image(inbox / f"old{i}.png", seed=i) for i in range(5)]
    watcher = watch()
    wait_until(lambda: count_live(store) == 5, 20, message="the first five")
    watcher.stop()
    ids = {p.name: store.by_path(str(p))["id"] for p in originals}

    for i in range(10):
        make_image(inbox / "new" / f"{i}.png", seed=100 + i)
    originals[0].unlink()
    originals[1].unlink()
    originals[2].rename(inbox / "renamed.png")
    calls = len(counting_model.calls)

    watch()
    on_disk = {str(p) for p in inbox.rglob("*.png")}
    wait_until(lambda: live_paths(store) == on_disk, 20, message="the database to match the folder")
    assert store.by_path(str(inbox / "renamed.png"))["id"] == ids["old2.png"]
    assert sum(counting_model.calls[calls:]) == 10  # the renamed file reused its vector
    assert {store.by_id(ids[f"old{i}.png"])["deleted_at"] is not None for i in (0, 1)} == {True}


def test_a_bad_file_is_recorded_and_retried_when_it_changes(watch, inbox, store, tmp_path):
    watch()
    bad = inbox / "bad.png"
    bad.write_bytes(b"not an image at all")
    failure = wait_until(lambda: store.failure(str(bad)), 20, message="the failure")
    assert failure["error"]
    bad.write_bytes(png_bytes(tmp_path, seed=3))
    wait_until(lambda: store.by_path(str(bad)), 20, message="the fixed file")
    assert store.failure(str(bad)) is None


def test_a_vanished_folder_is_waited_for_and_its_rows_kept(watch, inbox, store):
    paths = {str(make_image(inbox / f"{i}.png", seed=i)) for i in range(3)}
    watcher = watch()
    wait_until(lambda: live_paths(store) == paths, 20, message="the first three")
    inbox.rename(inbox.with_name("unmounted"))  # as an unmounted share: no delete events
    wait_until(lambda: watcher.stats.state.startswith("waiting"), 10, message="waiting")
    assert live_paths(store) == paths
    inbox.with_name("unmounted").rename(inbox)
    paths.add(str(make_image(inbox / "after.png", seed=9)))
    wait_until(lambda: live_paths(store) == paths, 20, message="the new file, after the folder came back")
    assert store.counts()["deleted"] == 0


def test_inotify_limits_fall_back_to_polling(watch, inbox, store, monkeypatch):
    from watchdog.observers.inotify import InotifyObserver

    def limit(self):
        raise OSError(errno.ENOSPC, "inotify watch limit reached")

    monkeypatch.setattr(InotifyObserver, "start", limit)
    messages = []
    watcher = watch(messages=messages)
    assert watcher.stats.observer == "polling"
    assert messages[0].startswith("inotify limit reached") and "polling" in messages[0]
    assert messages[1:] == [f"Watching {inbox} (polling)"]
    path = make_image(inbox / "a.png", seed=1)
    wait_until(lambda: store.by_path(str(path)), 20, message="a file found by polling")


def test_status_line_redraws_on_a_tty_and_prints_lines_otherwise():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty, log = Terminal(), io.StringIO()
    for stream in (tty, log):
        status = StatusLine(stream, every=0)
        status.update(Stats(state="watching", seen=3, stored=2, failed=1, queued=4, rate=12.5))
        status.say("a message")
        status.update(Stats(state="watching", seen=4, stored=3, failed=1))
    assert tty.getvalue().count("\r") == 3 and "\n" in tty.getvalue()
    assert "watching: 3 seen, 2 stored, 1 failed, 0 deleted, 4 queued, 12.5 images/s" in tty.getvalue()
    assert log.getvalue().splitlines() == [
        "watching: 3 seen, 2 stored, 1 failed, 0 deleted, 4 queued, 12.5 images/s",
        "a message",
        "watching: 4 seen, 3 stored, 1 failed, 0 deleted, 0 queued, 0.0 images/s",
    ]


# --- the daemon as a real process ----------------------------------------------------


def sql(port: int, query: str) -> list:
    url = f"http://127.0.0.1:{port}/collection.json?" + urllib.parse.urlencode(
        {"sql": query, "_shape": "array"}
    )
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def answers(port: int) -> bool:
    try:
        sql(port, "select 1")
    except OSError:
        return False
    return True


def test_kill_9_mid_batch_then_start_adds_every_file_exactly_once(inbox, tmp_path, store):
    db = tmp_path / "collection.db"
    for i in range(100):
        make_image(inbox / f"{i:03}.png", seed=i)
    command = [sys.executable, "-m", "collection"]
    options = ["--db", str(db), "--model", RANDOM_MODEL, "--batch-size", "8"]
    daemon = subprocess.Popen([*command, "watch", str(inbox), *options], stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: count_live(store) > 0 or daemon.poll() is not None, 120, message="the first batch")
    finally:
        daemon.kill()  # SIGKILL, in the middle of the run
        _, err = daemon.communicate(timeout=30)
    assert 0 < count_live(store) < 100, err

    # `start` runs the daemon and Datasette together; Datasette reads while it writes.
    port = free_port()
    both = subprocess.Popen(
        [*command, "start", str(inbox), *options, "--port", str(port)], stderr=subprocess.PIPE, text=True
    )
    try:
        wait_until(lambda: answers(port) or both.poll() is not None, 60, 0.25, "Datasette to answer")
        rows = lambda: sql(port, "select count(*) n from images")[0]["n"]  # noqa: E731
        wait_until(lambda: rows() == 100, 120, 0.25, "100 rows, read through Datasette")
        both.terminate()  # SIGTERM: finish the batch, stop Datasette too, exit
        _, err = both.communicate(timeout=60)
    finally:
        if both.poll() is None:
            both.kill()
    assert both.returncode == 0, err
    assert "stopped: " in err
    assert not answers(port)  # stopping `start` stopped Datasette too

    counts = store.db.execute(
        "select count(*), count(distinct path), count(distinct sha256) from images"
    ).fetchone()
    assert counts == (100, 100, 100)
    half_written = store.db.execute(
        "select count(*) from images where id not in (select image_id from vectors) "
        "or (select count(*) from labels where image_id = images.id) != 5 or labels is null"
    ).fetchone()[0]
    assert half_written == 0
    assert store.db["failures"].count == 0


def test_sigterm_to_watch_finishes_the_worker_and_says_stopped(inbox, tmp_path, store):
    """SIGTERM mostly lands while the main thread waits for the worker. On Python 3.11 an
    interrupted Thread.join marked the running worker stopped, so `watch` exited at once
    with the batch unwritten and no final status line; the wait is on an event now."""
    make_image(inbox / "one.png", seed=1)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "collection", "watch", str(inbox), "--db", str(tmp_path / "collection.db"),
         "--model", RANDOM_MODEL],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: logged(store, "files") == 1 or daemon.poll() is not None, 120, 0.25, "the first scan")
        time.sleep(1.0)  # the main thread is back in its wait for the worker
        daemon.terminate()
        _, err = daemon.communicate(timeout=60)
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert daemon.returncode == 0, err
    assert "stopped: 1 seen, 1 stored" in err, err
