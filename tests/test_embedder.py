"""The image-search channel: a watcher daemon (real EfficientNet-Lite0 weights) or an
on-demand worker embeds an image for a caller that never loads the model."""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from PIL import Image, ImageOps

from collection.embedder import EmbedError, EmbedServer, compute, embed, ping, serving, socket_path
from collection.ingest import Ingester
from collection.models import get_model
from collection.store import Store
from conftest import make_image, sample_photos, wait_until
from hostile import jpeg_claiming, png_claiming

PHOTOS = ("chelsea", "coffee", "rocket", "china")
RANDOM_MODEL = "efficientnet_lite0:random"


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def stored(store: Store, name: str) -> tuple[np.ndarray, list[tuple[str, float]]]:
    image_id = store.db.execute("select id from images where path like ?", [f"%/{name}"]).fetchone()[0]
    blob = store.db.execute("select vector from vectors where image_id = ?", [image_id]).fetchone()[0]
    labels = [(row["label"], row["score"]) for row in store.labels_for(image_id)]
    return np.frombuffer(blob, "<f4"), labels


def alive(pid: int) -> bool:
    """Running (a zombie left for its parent to reap counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """Real photos added with the real model: (store, db path, folder)."""
    folder = tmp_path_factory.mktemp("photos")
    photos = sample_photos()
    for name in PHOTOS:
        Image.fromarray(photos[name]).save(folder / f"{name}.png")
    db_path = tmp_path_factory.mktemp("db") / "collection.db"
    store = Store(db_path)
    summary = Ingester(store, get_model("efficientnet_lite0").load()).add(sorted(str(p) for p in folder.iterdir()))
    assert summary.added == len(PHOTOS)
    yield store, db_path, folder
    store.close()


@pytest.fixture(scope="module")
def daemon(collection, tmp_path_factory):
    """`collection watch` on the collection's folder, once it answers on the socket."""
    _, db_path, folder = collection
    log = open(tmp_path_factory.mktemp("log") / "watch.log", "w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "collection", "watch", str(folder), "--db", str(db_path)], stderr=log
    )
    try:
        wait_until(lambda: ping(db_path) or process.poll() is not None, 240, 0.25, "the daemon's socket")
        assert process.poll() is None, log.seek(0) or log.read()
        yield process
    finally:
        process.terminate()
        process.wait(60)
        log.close()
    assert not socket_path(db_path).exists()  # removed on the way out


def test_the_daemon_embeds_an_upload_as_add_stored_it(collection, daemon):
    store, db_path, folder = collection
    assert ping(db_path)["via"] == "daemon" and ping(db_path)["pid"] == daemon.pid
    for name in ("chelsea", "rocket"):
        embedding = embed(db_path, (folder / f"{name}.png").read_bytes())
        vector, labels = stored(store, f"{name}.png")
        assert embedding.via == "daemon" and embedding.model == "efficientnet_lite0"
        assert embedding.vector.dtype == np.float32 and embedding.vector.shape == vector.shape
        assert float(embedding.vector @ vector) >= 0.9999
        assert [label for label, _ in embedding.labels] == [label for label, _ in labels]
        assert np.allclose([s for _, s in embedding.labels], [s for _, s in labels], atol=1e-3)
        assert 0 < embedding.seconds < 30


def test_the_socket_is_only_the_users(collection, daemon):
    _, db_path, _ = collection
    st = os.stat(socket_path(db_path))
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.getuid()


def test_a_region_embeds_what_is_in_it(collection, daemon):
    """Chelsea the cat beside a rocket: the left half searches like the cat, the right like the rocket."""
    store, db_path, _ = collection
    photos = sample_photos()
    composite = Image.new("RGB", (600, 300))
    composite.paste(Image.fromarray(photos["chelsea"]).resize((300, 300)), (0, 0))
    composite.paste(Image.fromarray(photos["rocket"]).resize((300, 300)), (300, 0))
    data = jpeg(composite)
    cat, _ = stored(store, "chelsea.png")
    rocket, _ = stored(store, "rocket.png")
    left = embed(db_path, data, box=(0.0, 0.0, 0.5, 1.0)).vector
    right = embed(db_path, data, box=(0.5, 0.0, 1.0, 1.0)).vector
    assert left @ cat > left @ rocket + 0.1
    assert right @ rocket > right @ cat + 0.1
    # A box is in the image as shown: on an EXIF-rotated copy it lands on the same pixels.
    rotated = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    composite.transpose(Image.Transpose.ROTATE_90).save(rotated, "JPEG", quality=90, exif=exif)
    shown_left = embed(db_path, rotated.getvalue(), box=(0.0, 0.0, 0.5, 1.0)).vector
    assert shown_left @ cat > shown_left @ rocket + 0.1


def test_hostile_uploads_get_a_status_and_a_reason_and_the_daemon_goes_on(collection, daemon, monkeypatch):
    _, db_path, folder = collection
    good = (folder / "coffee.png").read_bytes()
    whole = jpeg(Image.open(folder / "coffee.png"))
    cases = [
        (b"%PDF-1.4 not an image at all" * 10, None, 415, "not an image"),
        (png_claiming(100_000, 100_000), None, 422, "decompression bomb"),
        (jpeg_claiming(whole, 15_000, 10_000), None, 422, "decompression bomb"),  # over our limit, not Pillow's
        (whole[: len(whole) // 2], None, 422, "truncated"),
        (b"", None, 422, "empty"),
        (good, (0.5, 0.0, 0.4, 1.0), 400, "left < right"),
        (good, (0.0, 0.0, 1.0, 1.5), 400, "bottom <= 1"),
        (good, (0.0, float("nan"), 1.0, 1.0), 400, "finite"),
        (good, ("left", 0, 1, 1), 400, "four numbers"),
        (good, (0.0, 0.0, 0.5), 400, "four numbers"),
        (good, "0,0,1,1", 400, "four numbers"),
        (good, (0.0, 0.0, 0.005, 0.005), 400, "too small"),
    ]
    for data, box, status, words in cases:
        with pytest.raises(EmbedError) as refused:
            embed(db_path, data, box)
        assert refused.value.status == status, refused.value.message
        assert words in refused.value.message
        assert embed(db_path, good).via == "daemon"
    monkeypatch.setenv("COLLECTION_UPLOAD_MAX_BYTES", "1000")
    with pytest.raises(EmbedError) as refused:
        embed(db_path, good)
    assert refused.value.status == 413 and "over the upload limit of 1,000 bytes" in refused.value.message
    monkeypatch.delenv("COLLECTION_UPLOAD_MAX_BYTES")
    assert embed(db_path, good).via == "daemon"


def raw(db_path, request: bytes, close_early: bool = False) -> bytes:
    """Talk to the socket without the client's checks."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(30)
        conn.connect(str(socket_path(db_path)))
        conn.sendall(request)
        if close_early:
            return b""
        conn.shutdown(socket.SHUT_WR)
        return conn.makefile("rb").readline()


def test_a_bad_client_never_stops_the_server(collection, daemon):
    _, db_path, folder = collection
    answers = {
        "huge": raw(db_path, b'{"op": "embed", "size": 10000000000}\n'),
        "garbage": raw(db_path, b"\x00\xff not json\n"),
        "long header": raw(db_path, b"{" + b" " * 10_000),
        "unknown op": raw(db_path, b'{"op": "rm -rf"}\n'),
        "bad size": raw(db_path, b'{"op": "embed", "size": "12"}\n'),
        "cut short": raw(db_path, b'{"op": "embed", "size": 5000}\n' + b"x" * 100),
        "quit": raw(db_path, b'{"op": "quit"}\n'),  # a daemon does not quit on request
    }
    statuses = {name: json.loads(line)["status"] for name, line in answers.items()}
    assert statuses == {"huge": 413, "garbage": 400, "long header": 400, "unknown op": 400, "bad size": 400,
                        "cut short": 400, "quit": 400}
    raw(db_path, b'{"op": "embed", "size": 5000}\nxx', close_early=True)  # hangs up mid-request
    raw(db_path, b"", close_early=True)
    assert embed(db_path, (folder / "china.png").read_bytes()).via == "daemon"


def test_similar_file_asks_the_daemon(collection, daemon, tmp_path):
    store, db_path, _ = collection
    photo = ImageOps.mirror(Image.fromarray(sample_photos()["china"]))
    copy = tmp_path / "china-copy.jpg"
    photo.resize((photo.width * 2 // 3, photo.height * 2 // 3)).save(copy, quality=85)
    result = subprocess.run(
        [sys.executable, "-m", "collection", "similar", str(copy), "--db", str(db_path), "-k", "2"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Embedded by the watcher daemon" in result.stderr
    score, _, path = result.stdout.splitlines()[0].split(maxsplit=2)
    assert path.endswith("/china.png") and float(score) > 0.8


def test_the_daemon_keeps_ingesting_while_it_answers(collection, daemon):
    store, db_path, folder = collection
    Image.fromarray(sample_photos()["astronaut"]).save(folder / "astronaut.png")
    query = (folder / "coffee.png").read_bytes()

    def added_while_answering():
        assert embed(db_path, query).via == "daemon"
        return store.by_path(str(folder / "astronaut.png"))

    wait_until(added_while_answering, 120, 0.05, "the new photo to be stored")
    vector, _ = stored(store, "astronaut.png")
    embedding = embed(db_path, (folder / "astronaut.png").read_bytes())
    assert float(embedding.vector @ vector) >= 0.9999


# --- without a daemon: a worker, with a random-weight model to keep it quick ------------------


@pytest.fixture
def small_collection(tmp_path, small_model):
    folder = tmp_path / "photos"
    paths = [str(make_image(folder / f"{i}.png", seed=i, size=(320, 240))) for i in range(3)]
    db_path = tmp_path / "c.db"
    store = Store(db_path)
    Ingester(store, small_model).add(paths)
    yield store, db_path, folder
    store.close()


def test_with_no_daemon_a_worker_answers_stays_warm_and_exits_when_idle(small_collection):
    """The caller is a fresh process: it starts the worker and never imports TensorFlow."""
    store, db_path, folder = small_collection
    caller = textwrap.dedent(
        f"""
        import json, sys
        from collection.embedder import embed, ping
        data = open({str(folder / "1.png")!r}, "rb").read()
        first = embed({str(db_path)!r}, data)
        pid = ping({str(db_path)!r})["pid"]
        second = embed({str(db_path)!r}, data)
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "openvino"))
        print(json.dumps({{"via": [first.via, second.via], "pid": pid, "again": ping({str(db_path)!r})["pid"],
                          "vector": second.vector.tolist(), "heavy": heavy}}))
        """
    )
    env = {**os.environ, "COLLECTION_EMBED_IDLE": "3"}
    result = subprocess.run([sys.executable, "-c", caller], capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["via"] == ["worker", "worker"]
    assert answer["pid"] == answer["again"] and answer["pid"] != os.getpid()
    assert answer["heavy"] == []
    vector, _ = stored(store, "1.png")
    assert float(np.asarray(answer["vector"], np.float32) @ vector) >= 0.9999
    wait_until(lambda: not alive(answer["pid"]), 60, 0.2, "the idle worker to exit")
    assert not socket_path(db_path).exists()


def test_a_worker_that_cannot_load_a_model_says_why(tmp_path):
    db_path = tmp_path / "empty.db"
    Store(db_path).close()
    with pytest.raises(EmbedError) as failed:
        embed(db_path, make_image(tmp_path / "a.png").read_bytes(), timeout=120)
    assert failed.value.status == 503 and "the collection is empty" in failed.value.message


def test_no_server_and_no_worker_wanted(small_collection):
    _, db_path, folder = small_collection
    with pytest.raises(EmbedError) as refused:
        embed(db_path, (folder / "0.png").read_bytes(), start_worker=False)
    assert refused.value.status == 503 and "no embedding server" in refused.value.message


def test_a_stale_socket_is_replaced(small_collection, small_model):
    store, db_path, folder = small_collection
    path = socket_path(db_path)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()  # a process that died: its socket file stays, nothing listens
    assert path.exists() and ping(db_path) is None
    server = EmbedServer(db_path, small_model, via="worker")
    assert server.start()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        embedding = embed(db_path, (folder / "2.png").read_bytes(), start_worker=False)
        assert embedding.via == "worker"
        assert float(embedding.vector @ stored(store, "2.png")[0]) >= 0.9999
        assert not EmbedServer(db_path, small_model).start()  # one server at a time
    finally:
        server.stop()
    assert not path.exists()


def test_a_daemon_takes_over_from_a_worker(small_collection, small_model):
    _, db_path, folder = small_collection
    worker = EmbedServer(db_path, small_model, via="worker")
    assert worker.start()
    idle = threading.Thread(target=worker.serve_until_idle, args=(600,))
    idle.start()
    try:
        with serving(db_path, echo=lambda line: None) as daemon:
            assert not daemon.serving  # the worker answers while the daemon's model loads
            assert ping(db_path)["via"] == "worker"
            daemon.model = small_model
            idle.join(60)
            assert not idle.is_alive()  # the worker quit when asked
            wait_until(lambda: daemon.serving, 30, message="the daemon to take over")
            assert ping(db_path)["via"] == "daemon"
            assert embed(db_path, (folder / "0.png").read_bytes(), start_worker=False).via == "daemon"
            messages = []
            with serving(db_path, echo=messages.append) as second:
                second.model = small_model
                wait_until(lambda: messages, 30, message="a word from the second daemon")
                assert not second.serving  # it leaves the channel to the first
            assert "another daemon" in messages[0]
    finally:
        worker.stop()
        idle.join(30)
    assert ping(db_path) is None


def test_a_request_waits_for_the_model_while_it_loads(small_collection, small_model):
    store, db_path, folder = small_collection
    with serving(db_path) as daemon:
        assert daemon.serving and ping(db_path)["model"] is None
        threading.Timer(1.0, lambda: setattr(daemon, "model", small_model)).start()
        embedding = embed(db_path, (folder / "1.png").read_bytes(), start_worker=False)
        assert embedding.via == "daemon"
        assert float(embedding.vector @ stored(store, "1.png")[0]) >= 0.9999
    with serving(db_path) as daemon:
        threading.Timer(1.0, daemon.stop).start()  # e.g. the model failed to load
        with pytest.raises(EmbedError) as stopped:
            embed(db_path, (folder / "1.png").read_bytes(), start_worker=False)
        assert stopped.value.status == 503 and "before its model was loaded" in stopped.value.message


def test_compute_is_the_same_path_in_process(small_collection, small_model):
    store, _, folder = small_collection
    embedding = compute(small_model, (folder / "0.png").read_bytes())
    assert embedding.via == "in-process"
    assert float(embedding.vector @ stored(store, "0.png")[0]) >= 0.9999
    assert len(embedding.labels) == 5


def test_a_socket_path_too_long_for_unix_goes_to_a_private_folder(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "collection.db"
    path = socket_path(deep)
    assert len(os.fsencode(path)) <= 107 and path.name.endswith(".embed.sock")
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert socket_path(deep) == path != socket_path(tmp_path / "collection.db")
