"""Fault and abuse (issue #12): each case the issue reproduced, as a regression test, and a
seeded corpus of hostile files through `collection add` and a running `collection watch`.

The corpus runs in a child process, so that its peak resident size (os.wait4) is its
own and an audit hook (sys.addaudithook, "open") sees every file it opens.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
import tracemalloc
from pathlib import Path

import pytest
from click.testing import CliRunner

from collection import files, images, serve
from collection.cli import cli
from collection.ingest import Ingester, iter_files
from collection.store import Store
from collection.watcher import Watcher
from conftest import free_port, make_image, responds, wait_until
from hostile import SYSTEM_TARGETS, make_corpus, png_claiming

RANDOM_MODEL = "efficientnet_lite0:random"
HOSTILE = Path(__file__).with_name("hostile.py")
ROOT = Path(__file__).resolve().parent.parent
# Peak resident size of a `collection add` or `collection watch` child over the whole
# hostile corpus: the model and TensorFlow take about 0.6-0.8 GB; one photo's worth of
# decoding on top. Before issue #12, one 74-byte PNG alone took 4.2 GB.
PEAK_RSS_BOUND = 1.5e9

_opened: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _opened is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)  # hooks cannot be removed: this one records only inside ``opened_files``


class opened_files:
    """Real paths of every file this process opens inside the ``with`` block."""

    def __enter__(self) -> list[str]:
        global _opened
        _opened = []
        return _opened

    def __exit__(self, *exc) -> None:
        global _opened
        _opened = None


def _ingester(store, model, folder, **options) -> Ingester:
    return Ingester(store, model, folders=[folder], **options)


def _add(store, model, folder, paths=None, **options):
    paths = [str(p) for p in paths] if paths is not None else list(iter_files([folder]))
    return _ingester(store, model, folder, **options).add(paths)


@pytest.fixture
def watch(inbox, db_path, small_model):
    watchers = []

    def start(**options) -> Watcher:
        options = {"recheck": 0.2, **options}
        watcher = Watcher(inbox, db_path, small_model, echo=lambda m: None, **options).start()
        watchers.append(watcher)
        wait_until(watcher.ready.is_set, 30, message="the first reconcile")
        return watcher

    yield start
    for watcher in watchers:
        watcher.stop()


def live(store, path) -> bool:
    row = store.by_path(str(path))
    return row is not None and row["deleted_at"] is None


# --- 1. names that are not UTF-8 ---------------------------------------------------------


def test_1_a_name_that_is_not_utf8_is_a_failure_and_the_rest_is_stored(store, small_model, images_dir):
    good = make_image(images_dir / "good.png", seed=1)
    bad = os.path.join(os.fsencode(images_dir), b"bad_\xff.jpg")
    shutil.copy(good, bad)
    summary = _add(store, small_model, images_dir)
    assert (summary.added, summary.failed) == (1, 1)
    assert live(store, good)
    failure = store.failure(os.fsdecode(bad))
    assert failure["path"] == f"{images_dir}/bad_\\xff.jpg"  # shown escaped
    assert "not valid UTF-8" in failure["error"]
    # not tried again until it changes; renamed to a valid name, it is stored
    assert _add(store, small_model, images_dir).failed == 1
    os.rename(bad, images_dir / "fixed.jpg")
    assert _add(store, small_model, images_dir).reused == 1


def test_1_the_watcher_goes_on_after_a_name_that_is_not_utf8(watch, inbox, store):
    watch()
    bad = os.path.join(os.fsencode(inbox), b"bad_\xff.png")
    make_image(Path(os.fsdecode(bad)), seed=2)
    wait_until(lambda: store.failure(os.fsdecode(bad)), 20, message="the failure")
    later = make_image(inbox / "later.png", seed=3)
    wait_until(lambda: live(store, later), 20, message="a later file")
    # a stored file renamed to such a name leaves the collection, with a failure saying why
    renamed = os.path.join(os.fsencode(inbox), b"later_\xfe.png")
    os.rename(later, renamed)
    wait_until(lambda: not live(store, later) and store.failure(os.fsdecode(renamed)), 20, message="the rename")
    after = make_image(inbox / "after.png", seed=4)
    wait_until(lambda: live(store, after), 20, message="a file after the rename")


# --- 2. and 3. FIFOs and devices ----------------------------------------------------------


def test_2_a_fifo_is_refused_at_once_not_waited_on(db_path, small_model, images_dir):
    fifo = images_dir / "p.jpg"
    os.mkfifo(fifo)
    done: list = []

    def add() -> None:  # on a thread of its own, so that a hang fails the test instead of hanging it
        store = Store(db_path)
        done.append(_add(store, small_model, images_dir, [fifo]))
        store.close()

    worker = threading.Thread(target=add, daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "reading a FIFO blocked"
    assert done[0].failed == 1
    store = Store(db_path)
    assert "not a regular file (a FIFO)" in store.failure(str(fifo))["error"]
    store.close()


def test_3_a_symlink_to_dev_zero_is_refused_unread(watch, inbox, store):
    watch()
    (inbox / "zero.jpg").symlink_to("/dev/zero")
    os.mkfifo(inbox / "fifo.png")
    failure = wait_until(lambda: store.failure(str(inbox / "zero.jpg")), 20, message="the failure")
    assert "outside the folder" in failure["error"]
    wait_until(lambda: store.failure(str(inbox / "fifo.png")), 20, message="the FIFO's failure")
    good = make_image(inbox / "good.png", seed=5)
    wait_until(lambda: live(store, good), 20, message="a good file after them")


# --- 4. symlinks out of the folder --------------------------------------------------------


def test_4_symlinks_are_followed_only_inside_the_folder(store, small_model, tmp_path, images_dir):
    outside = tmp_path / "outside"
    secret = make_image(outside / "secret.png", seed=6)
    inside = make_image(images_dir / "sub" / "inside.png", seed=7)
    links = {"secret.png": secret, "passwd.jpg": Path("/etc/passwd"), "environ.jpg": Path("/proc/self/environ")}
    for name, target in links.items():
        (images_dir / name).symlink_to(target)
    (images_dir / "in.png").symlink_to(inside)
    with opened_files() as opened:
        summary = _add(store, small_model, images_dir, [images_dir / n for n in [*links, "in.png"]])
    assert (summary.added, summary.failed) == (1, 3)
    assert live(store, images_dir / "in.png")
    for name in links:
        assert "outside the folder" in store.failure(str(images_dir / name))["error"]
    forbidden = {str(secret), "/etc/passwd", os.path.realpath("/proc/self/environ")}
    assert not forbidden & set(opened)


def test_4_serving_refuses_a_link_re_pointed_outside_or_content_swapped(store, small_model, tmp_path, images_dir):
    outside = tmp_path / "outside"
    photo = make_image(images_dir / "photo.png", seed=8)
    link = images_dir / "link.png"
    link.symlink_to(photo)
    _add(store, small_model, images_dir, [link])
    row = store.by_path(str(link))
    assert serve.read_image_file(row) == photo.read_bytes()

    # an outside file of the same size and mtime: not even opened
    twin = outside / "twin.png"
    twin.parent.mkdir()
    twin.write_bytes(b"root:x:0:0" + b"\0" * (row["size"] - 10))
    st = photo.stat()
    os.utime(twin, ns=(st.st_atime_ns, st.st_mtime_ns))
    link.unlink()
    link.symlink_to(twin)
    with opened_files() as opened, pytest.raises(serve.Refused, match="outside the folder"):
        serve.read_image_file(row)
    assert str(twin) not in opened

    # the photo's bytes swapped in place, size and mtime kept: the sha256 tells
    link.unlink()
    link.symlink_to(photo)
    data = bytearray(photo.read_bytes())
    data[-20] ^= 0xFF
    photo.write_bytes(bytes(data))
    os.utime(photo, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(serve.Refused, match="changed since it was added"):
        serve.read_image_file(row)


# --- 5. memory follows limits, not what a file claims ---------------------------------------


def test_5_a_header_claiming_too_many_pixels_is_refused_before_decoding(store, small_model, images_dir):
    bomb = images_dir / "thin.png"
    bomb.write_bytes(png_claiming(1, 178_000_000))  # 74 bytes; once 4.2 GB and 18 s
    assert bomb.stat().st_size < 100
    summary = _add(store, small_model, images_dir, [bomb])
    assert summary.failed == 1
    assert "178,000,000 pixels, over the limit of 120,000,000" in store.failure(str(bomb))["error"]
    # the limit is configurable
    with pytest.raises(images.ImageError, match="over the limit of 1,000"):
        images.decode(make_image(images_dir / "small.png", size=(40, 30)), max_pixels=1000)


def test_5_a_file_over_the_byte_limit_is_refused_unread(store, small_model, images_dir):
    sparse = images_dir / "sparse.jpg"
    sparse.write_bytes(make_image(images_dir / "x.jpg", size=(32, 32)).read_bytes())
    os.truncate(sparse, 1_000_000_000)  # 1 GB, sparse: once read whole (1.8 GB peak)
    tracemalloc.start()
    try:
        summary = _add(store, small_model, images_dir, [sparse])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary.failed == 1
    assert "over the limit of 200,000,000" in store.failure(str(sparse))["error"]
    assert peak < 20e6
    with pytest.raises(files.TooBig):  # a file growing while read: never more than limit + 1 read
        files.read(str(make_image(images_dir / "y.png")), None, max_bytes=100)


# --- 6. "will be retried" is true -----------------------------------------------------------


def test_6_content_replaced_mid_run_is_stored_not_failed(watch, inbox, store, tmp_path):
    """cp eagle.jpg a.jpg; cp flower.jpg a.jpg; cp eagle.jpg b.jpg in a watched folder."""
    eagle = make_image(tmp_path / "eagle.png", seed=10).read_bytes()
    flower = make_image(tmp_path / "flower.png", seed=11).read_bytes()
    watch()
    a, b = inbox / "a.png", inbox / "b.png"
    a.write_bytes(eagle)
    wait_until(lambda: live(store, a), 20, message="a.png")
    a.write_bytes(flower)
    wait_until(lambda: store.by_path(str(a))["sha256"] == images.sha256_bytes(flower), 20, message="a replaced")
    b.write_bytes(eagle)
    wait_until(lambda: live(store, b) or store.failure(str(b)), 20, message="b.png")
    assert store.failure(str(b)) is None
    assert store.by_path(str(b))["sha256"] == images.sha256_bytes(eagle)


def test_6_a_failure_is_retried_when_its_cause_can_have_gone(store, small_model, images_dir):
    path = make_image(images_dir / "locked.png", seed=12)
    st = path.stat()
    # what a run by a user without read permission left (as root, chmod cannot make it)
    store.record_failure(str(path), "cannot read file: Permission denied", st.st_size, st.st_mtime, st.st_ctime)
    assert _add(store, small_model, images_dir, [path]).failed == 1  # unchanged: not tried
    os.chmod(path, 0o644)  # made readable: size and mtime stay, ctime moves
    assert _add(store, small_model, images_dir, [path]).added == 1
    assert store.failure(str(path)) is None

    # a transient failure whose next try has come is tried, unchanged or not
    other = make_image(images_dir / "busy.png", seed=13)
    st = other.stat()
    store.record_failure(str(other), "changed while being read", st.st_size, st.st_mtime, st.st_ctime,
                         next_try="2000-01-01T00:00:00+00:00")
    assert _add(store, small_model, images_dir, [other]).added == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_6_permission_denied_is_due_again_later(store, small_model, images_dir):
    path = make_image(images_dir / "locked.png", seed=14)
    path.chmod(0)
    assert _add(store, small_model, images_dir, [path]).failed == 1
    failure = store.failure(str(path))
    assert "Permission denied" in failure["error"] and failure["next_try"] is not None


def test_6_add_and_retry_commands_try_again_and_failures_says_when(tmp_path, images_dir):
    db = str(tmp_path / "c.db")
    bad = images_dir / "cut.png"
    bad.write_bytes(make_image(tmp_path / "src.png", size=(100, 80)).read_bytes()[:200])
    run = lambda *args: CliRunner().invoke(cli, [*args, "--db", db], catch_exceptions=False)  # noqa: E731
    model = ["--model", RANDOM_MODEL]
    assert "1 failed" in run("add", str(bad), *model).output
    assert "1 failed" in run("add", str(bad), *model).output  # an explicit add tries again
    assert Store(db).failure(str(bad))["attempts"] == 2
    listed = run("failures").output
    assert "next try: when the file changes, or now with `collection retry`" in listed
    assert "1 failed" in run("retry", *model).output
    assert Store(db).failure(str(bad))["attempts"] == 3
    bad.unlink()
    assert "No failures to retry" in run("retry", *model).output
    assert Store(db).failure(str(bad)) is None


# --- 9. id lists in chunks ------------------------------------------------------------------


def test_9_id_lists_go_to_sqlite_in_chunks(store):
    store.db.conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
    with store.db.atomic():
        store.db.conn.executemany(
            "insert into images (id, path, sha256, size, mtime) values (?, ?, ?, 1, 1)",
            [(i, f"/x/{i}.jpg", f"{i}") for i in range(1, 2501)],
        )
        store.db.conn.executemany(
            "insert into vectors (image_id, model, vector) values (?, 'm', x'00')", [(i,) for i in range(1, 2501)]
        )
    store.mark_deleted(range(1, 2501))
    assert store.counts()["deleted"] == 2500
    store.delete_rows(range(1, 2001))
    assert store.db.execute("select count(*) from images").fetchone()[0] == 500
    assert store.db.execute("select count(*) from vectors").fetchone()[0] == 500


# --- 10. the watchdog floor -----------------------------------------------------------------


def test_10_watchdog_floor_is_the_tested_version_and_a_chmod_after_close_does_not_wait(watch, inbox, store):
    import watchdog.version
    from watchdog.events import FileAttribEvent  # noqa: F401 (attribute changes are their own event)

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    floor = next(d for d in pyproject["project"]["dependencies"] if d.startswith("watchdog"))
    assert floor == "watchdog>=7.1"  # 4.0.0 lacks event_filter; to 6.0.0 chmod reads as a write
    assert (watchdog.version.VERSION_MAJOR, watchdog.version.VERSION_MINOR) >= (7, 1)
    watch(stuck=60.0)
    path = make_image(inbox / "wget.png", seed=15)
    os.utime(path, (1_000_000_000, 1_000_000_000))  # as wget sets the server's mtime
    path.chmod(0o600)
    wait_until(lambda: live(store, path), 15, message="a file whose attributes changed after close")


# --- 11. `collection start` relays the server from the first byte -----------------------------


def test_11_start_relays_the_server_and_keeps_requests_out_of_the_terminal(tmp_path, inbox):
    port = free_port()
    command = [sys.executable, "-m", "collection", "start", str(inbox), "--db", str(tmp_path / "c.db"),
               "--model", RANDOM_MODEL, "--port", str(port)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT)
    try:
        wait_until(lambda: responds(f"http://127.0.0.1:{port}/") or process.poll() is not None, 90, 0.25)
        for _ in range(3):
            responds(f"http://127.0.0.1:{port}/-/versions.json")
        first_scan = lambda: _query(tmp_path / "c.db", "select count(*) from ingest_log")[0][0]  # noqa: E731
        wait_until(lambda: first_scan() or process.poll() is not None, 90, 0.25, "the model and first scan")
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, err
    assert "Uvicorn running on" in err  # the server's own lines come through
    assert "GET /" not in err  # request lines do not


# --- the hostile corpus ---------------------------------------------------------------------


def _audited(args: list[str], forbidden: list[str], out: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "FORBIDDEN": os.pathsep.join(forbidden), "AUDIT_OUT": str(out),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(HOSTILE), *args], env=env, cwd=ROOT, **popen)


def _finish(process: subprocess.Popen, timeout: float) -> tuple[int, float]:
    """Wait for ``process``: its exit code and its own peak resident size in bytes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return process.returncode, usage.ru_maxrss * 1024
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"{process.args} did not finish in {timeout}s")


def _query(db: Path, sql: str, params=()) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def _accounted(db: Path, corpus) -> None:
    """Each file is a row or a failure, by kind; none of the refused kinds is a row."""
    rows = {r[0] for r in _query(db, "select path from images where deleted_at is null")}
    failures = dict(_query(db, "select path, error from failures"))
    for kinds, reasons in [
        (("symlink_out",), ("outside the folder",)),
        (("fifo",), ("not a regular file",)),
        (("nonutf8",), ("not valid UTF-8",)),
        (("empty",), ("empty file",)),
        (("bomb_png", "bomb_jpeg"), ("over the limit", "decompression bomb", "truncated", "cannot")),
    ]:
        for path in corpus.of_kind(*kinds):
            error = failures[files.display(path)]
            assert any(r in error for r in reasons), (path, error)
            assert path not in rows
    for path in corpus.of_kind("good"):
        assert path in rows, path
    for path in corpus.of_kind("truncated", "bitflip", "random", "mode000"):
        assert path in rows or path in failures, path


def test_hostile_corpus_through_collection_add(tmp_path):
    folder, db, out = tmp_path / "hostile", tmp_path / "c.db", tmp_path / "audit.json"
    corpus = make_corpus(folder, tmp_path / "outside", 210, seed=12)
    log_path = tmp_path / "add.log"
    with open(log_path, "w") as log:
        process = _audited(["add", str(folder), "--db", str(db), "--model", RANDOM_MODEL], corpus.forbidden(),
                           out, stdout=log, stderr=log)
        code, peak = _finish(process, 300)
    assert code == 0, log_path.read_text()
    assert json.loads(out.read_text()) == []  # nothing outside the folder was opened
    print(f"peak RSS {peak / 1e9:.2f} GB")
    assert peak < PEAK_RSS_BOUND, f"peak RSS {peak / 1e9:.2f} GB"
    # A folder scan passes over FIFOs and links to non-files; named, they are refused too.
    named = corpus.of_kind("fifo", "symlink_out")
    with open(log_path, "w") as log:
        process = _audited(["add", *named, "--db", str(db), "--model", RANDOM_MODEL], corpus.forbidden(), out,
                           stdout=log, stderr=log)
        code, _ = _finish(process, 120)
    assert code == 0, log_path.read_text()
    assert json.loads(out.read_text()) == []
    _accounted(db, corpus)


def test_hostile_corpus_through_a_running_watcher(tmp_path):
    folder, db, out = tmp_path / "inbox", tmp_path / "c.db", tmp_path / "audit.json"
    folder.mkdir()
    log = open(tmp_path / "watch.log", "w")
    process = _audited(["watch", str(folder), "--db", str(db), "--model", RANDOM_MODEL],
                       [str(tmp_path / "outside"), *SYSTEM_TARGETS], out, stdout=log, stderr=log)
    try:
        def started() -> bool:
            assert process.poll() is None, (tmp_path / "watch.log").read_text()
            try:
                return bool(_query(db, "select count(*) from ingest_log")[0][0])
            except sqlite3.Error:
                return False

        wait_until(started, 120, 0.25, "the watcher's first scan")
        corpus = make_corpus(folder, tmp_path / "outside", 210, seed=13)
        good = make_image(folder / "afterwards.png", seed=99)

        def stored() -> bool:
            assert process.poll() is None, (tmp_path / "watch.log").read_text()
            return bool(_query(db, "select 1 from images where path = ?", [str(good)]))

        wait_until(stored, 120, 0.25, "a good image dropped after the corpus")
        # A sparse file truncated after its close waits the watcher's 60 s for a close that never comes.
        wait_until(lambda: _try(_accounted, db, corpus), 150, 0.5, "every hostile file accounted for")
        process.send_signal(signal.SIGTERM)  # FIFOs in the folder do not keep it from stopping
        code, peak = _finish(process, 60)
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    assert code == 0, (tmp_path / "watch.log").read_text()
    assert json.loads(out.read_text()) == []
    print(f"peak RSS {peak / 1e9:.2f} GB")
    assert peak < PEAK_RSS_BOUND, f"peak RSS {peak / 1e9:.2f} GB"
    _accounted(db, corpus)


def _try(check, *args) -> bool:
    try:
        check(*args)
    except (AssertionError, KeyError):
        return False
    return True
