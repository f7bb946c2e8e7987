"""Search by example over HTTP: `collection serve` on a free port answers /-/search and
/-/search.json, the embedding done by an on-demand worker (seeded random
EfficientNet-Lite0 weights, to keep it quick); hostile uploads get a status and a
reason and the server goes on; the server process never loads TensorFlow. The form
reader (collection.uploads) is also tested on its own, with a body fed message by
message. Real weights and a browser: tests/test_search_browser.py."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from PIL import Image

from collection.embedder import ping
from collection.ingest import Ingester
from collection.store import Store
from collection.uploads import Rejected, read_body, read_form
from conftest import free_port, make_image, responds, wait_until
from hostile import png_claiming

LIMIT = 300_000  # COLLECTION_UPLOAD_MAX_BYTES for the server under test


# --- the form reader on its own ----------------------------------------------------------


def feeder(*chunks: bytes):
    """An ASGI receive() that hands out ``chunks`` and counts what was taken."""
    taken = []

    async def receive():
        i = len(taken)
        taken.append(i)
        return {"type": "http.request", "body": chunks[i], "more_body": i < len(chunks) - 1}

    return receive, taken


def multipart(fields: dict[str, tuple | str], boundary: str = "XyZ") -> tuple[bytes, dict[str, str]]:
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f"--{boundary}\r\n".encode())
        if isinstance(value, tuple):
            filename, data, kind = value
            out.write(f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'.encode())
            out.write(f"Content-Type: {kind}\r\n\r\n".encode() + data + b"\r\n")
        else:
            out.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    out.write(f"--{boundary}--\r\n".encode())
    body = out.getvalue()
    return body, {"content-type": f"multipart/form-data; boundary={boundary}", "content-length": str(len(body))}


def test_a_form_is_read_into_its_fields():
    body, headers = multipart({"csrftoken": "t0k", "image": ("cat.jpg", b"\xff\xd8 bytes \r\n--Xy", "image/jpeg"), "k": "5"})
    receive, _ = feeder(body[:10], body[10:200], body[200:])
    form = asyncio.run(read_form(receive, headers, 1000))
    assert form["image"].data == b"\xff\xd8 bytes \r\n--Xy" and form["image"].filename == "cat.jpg"
    assert form["image"].content_type == "image/jpeg"
    assert form["k"].text == "5" and form["k"].filename is None and form["csrftoken"].text == "t0k"
    receive, _ = feeder(b"image_id=7&box=0%2C0%2C0.5%2C1")
    form = asyncio.run(read_form(receive, {"content-type": "application/x-www-form-urlencoded"}, 1000))
    assert form["image_id"].text == "7" and form["box"].text == "0,0,0.5,1"


def test_a_body_over_the_limit_is_refused_before_it_is_read():
    receive, taken = feeder(b"x" * 100)
    headers = {"content-type": "multipart/form-data; boundary=XyZ", "content-length": "2000000000"}
    with pytest.raises(Rejected) as refused:
        asyncio.run(read_form(receive, headers, 1000))
    assert refused.value.status == 413 and "2,000,000,000 bytes, over the limit of 1,000" in refused.value.message
    assert taken == []  # not one message of the body was read


def test_a_body_without_a_length_is_refused_once_it_passes_the_limit():
    """Chunked (no Content-Length): reading stops at the first message past the limit."""
    receive, taken = feeder(*[b"x" * 400] * 1000)
    with pytest.raises(Rejected) as refused:
        asyncio.run(read_body(receive, {}, 1000))
    assert refused.value.status == 413 and "over the limit of 1,000 bytes" in refused.value.message
    assert len(taken) == 3


@pytest.mark.parametrize(
    "fields, headers, status, words",
    [
        (None, {"content-type": "application/json"}, 415, "multipart/form-data"),
        (None, {}, 415, "no content type"),
        (None, {"content-type": "multipart/form-data"}, 400, "boundary"),
        ({"image": ("a.txt", b"hello", "text/plain")}, None, 415, "text/plain, not an image"),
        ({"image": ("a.png", b"x" * 2000, "image/png")}, None, 413, "2,000 bytes, over the limit of 1,000"),
        ({"box": "0," * 3000}, None, 400, "over 4,096 bytes"),
        ("image_id=1&box=" + "0," * 10000, {"content-type": "application/x-www-form-urlencoded"}, 413, "at most a few"),
    ],
)
def test_what_is_not_a_form_with_an_image_is_refused(fields, headers, status, words):
    if isinstance(fields, str):
        body, made = fields.encode(), {}
    else:
        body, made = multipart(fields) if fields else (b"{}", {})
    receive, _ = feeder(body)
    with pytest.raises(Rejected) as refused:
        asyncio.run(read_form(receive, headers or made, 1000))
    assert refused.value.status == status and words in refused.value.message


# --- the server ------------------------------------------------------------------------------


def jpeg(path, quality: int = 90) -> bytes:
    out = io.BytesIO()
    Image.open(path).convert("RGB").save(out, "JPEG", quality=quality)
    return out.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory, small_model):
    """`collection serve` on a small collection (random weights), the upload limit set small.
    Its first search starts the worker; the worker is stopped at the end."""
    tmp = tmp_path_factory.mktemp("search")
    paths = [str(make_image(tmp / "photos" / f"{i}.png", seed=i, size=(320, 240))) for i in range(5)]
    db_path = tmp / "collection.db"
    store = Store(db_path)
    Ingester(store, small_model).add(paths)
    ids = {os.path.basename(row["path"]): row["id"] for row in store.db.query("select id, path from images")}
    store.close()
    env = {**os.environ, "COLLECTION_UPLOAD_MAX_BYTES": str(LIMIT), "COLLECTION_EMBED_IDLE": "120"}
    process, base = start_server(["serve", "--db", str(db_path)], tmp / "datasette.log", env)
    try:
        yield base, ids, tmp / "photos", db_path, process
    finally:
        process.terminate()
        process.wait(timeout=10)
        worker = ping(db_path)
        if worker:
            os.kill(worker["pid"], signal.SIGTERM)


def start_server(command: list[str], log_path, env=None) -> tuple[subprocess.Popen, str]:
    """`collection <command>` on a free port, once Datasette answers."""
    port = free_port()
    with open(log_path, "w") as log:  # a file: a pipe nobody reads can fill and stall the server
        process = subprocess.Popen(
            [sys.executable, "-m", "collection", *command, "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: process.poll() is not None or responds(f"{base}/-/versions.json"), 240, 0.1, "the server")
        assert process.poll() is None, open(log_path).read()
    except BaseException:
        process.terminate()
        process.wait(timeout=10)
        raise
    return process, base


def search(base, data: bytes, name="photo.jpg", kind="image/jpeg", **params) -> httpx.Response:
    return httpx.post(f"{base}/-/search.json", params=params, files={"image": (name, data, kind)}, timeout=120)


def answers(base, photos, ids) -> None:
    """A good search still works: the photo itself comes first."""
    found = search(base, jpeg(photos / "3.png", 95), k=3)
    assert found.status_code == 200, found.text
    assert found.json()["results"][0]["id"] == ids["3.png"]


def test_an_upload_finds_its_original_and_says_what_the_model_sees(server):
    base, ids, photos, db_path, process = server
    started = time.monotonic()
    found = search(base, (photos / "2.png").read_bytes(), "2.png", "image/png", k=4)
    assert found.status_code == 200, found.text
    answer = found.json()
    print(f"first search (a worker started): {time.monotonic() - started:.1f} s")
    first = answer["results"][0]
    assert first["id"] == ids["2.png"] and first["path"].endswith("/photos/2.png") and first["score"] > 0.999
    assert len(answer["results"]) == 4
    assert [r["score"] for r in answer["results"]] == sorted((r["score"] for r in answer["results"]), reverse=True)
    assert len(answer["labels"]) == 5 and {"label", "score"} <= set(answer["labels"][0])
    assert answer["via"] == "worker" and answer["model"] == "efficientnet_lite0:random"
    assert ping(db_path)["pid"] != process.pid  # the model lives in another process

    too_strict = search(base, (photos / "2.png").read_bytes(), min_score=1.0)
    assert too_strict.status_code == 200 and len(too_strict.json()["results"]) <= 1


def test_the_server_process_never_loads_tensorflow(server):
    base, ids, photos, db_path, process = server
    answers(base, photos, ids)  # a search has been answered: the worker runs

    def libraries(pid: int) -> str:
        with open(f"/proc/{pid}/maps") as f:
            return f.read()

    assert "tensorflow" not in libraries(process.pid)
    assert "tensorflow" in libraries(ping(db_path)["pid"])  # where the check would find it


def test_a_region_of_a_collection_image_is_searched(server):
    base, ids, photos, _, _ = server
    url = f"{base}/-/search.json"
    found = httpx.get(url, params={"image_id": ids["1.png"], "box": "0.1,0.1,0.9,0.9", "k": 3}, timeout=120)
    assert found.status_code == 200, found.text
    answer = found.json()
    assert answer["query"] == {"image_id": ids["1.png"], "box": [0.1, 0.1, 0.9, 0.9]}
    assert ids["1.png"] not in [r["id"] for r in answer["results"]]  # the image itself is left out
    assert len(answer["results"]) == 3
    posted = httpx.post(url, data={"image_id": str(ids["1.png"]), "box": "0.1,0.1,0.9,0.9", "k": "3"}, timeout=120)
    assert posted.status_code == 200 and posted.json()["results"] == answer["results"]

    page = httpx.get(f"{base}/-/search", params={"image_id": ids["1.png"], "box": "0,0,0.5,0.5"}, timeout=120)
    assert page.status_code == 200
    assert 'style="left: 0.00%; top: 0.00%; width: 50.00%; height: 50.00%"' in page.text
    assert page.text.count('class="collection-score"') >= 5 + 3  # the labels' scores and the results'

    for params, status, words in [
        ({"image_id": ids["1.png"], "box": "0.5,0,0.4,1"}, 400, "left < right"),
        ({"image_id": ids["1.png"], "box": "0,0,1"}, 400, "four numbers"),
        ({"image_id": ids["1.png"], "box": "0,0,0.001,0.001"}, 400, "too small"),
        ({"image_id": 999999}, 404, "No image 999999"),
        ({"image_id": "1; drop table images"}, 400, "image_id must be"),
        ({"image_id": ids["1.png"], "k": "0"}, 400, "k must be"),
        ({}, 400, "POST a multipart/form-data field named image"),
    ]:
        refused = httpx.get(url, params=params, timeout=60)
        assert refused.status_code == status, (params, refused.text)
        assert words in refused.json()["error"], refused.json()


def test_hostile_uploads_get_a_status_and_a_reason_and_the_server_goes_on(server):
    base, ids, photos, _, _ = server
    whole = jpeg(photos / "4.png")
    body, headers = multipart({"k": "3"})
    unchosen, unchosen_headers = multipart({"image": ("", b"", "application/octet-stream")})  # as Chromium sends it
    cases = [
        ("not an image", lambda: search(base, b"%PDF-1.4 not an image at all" * 10, "a.jpg"), 415, "not an image"),
        ("decompression bomb", lambda: search(base, png_claiming(100_000, 100_000), "bomb.png", "image/png"),
         422, "decompression bomb"),
        ("over the limit", lambda: search(base, os.urandom(LIMIT + 1)), 413, f"over the limit of {LIMIT:,} bytes"),
        ("truncated JPEG", lambda: search(base, whole[: len(whole) // 2]), 422, "truncated"),
        ("empty file", lambda: search(base, b""), 422, "empty file"),
        ("a form sent with no file chosen", lambda: httpx.post(f"{base}/-/search.json", content=unchosen, headers=unchosen_headers),
         400, "no image"),
        ("a file that says it is text", lambda: search(base, whole, "a.txt", "text/plain"), 415, "not an image"),
        ("not a form", lambda: httpx.post(f"{base}/-/search.json", content=whole, headers={"content-type": "image/jpeg"}),
         415, "multipart/form-data"),
        ("no image field", lambda: httpx.post(f"{base}/-/search.json", content=body, headers=headers),
         400, "no image"),
        ("image as text", lambda: httpx.post(f"{base}/-/search.json", files={"image": (None, "abc")}),
         400, "must be a file"),
    ]
    for what, request, status, words in cases:
        refused = request()
        assert refused.status_code == status, (what, refused.text)
        assert words in refused.json()["error"], (what, refused.json())
        answers(base, photos, ids)

    # The page says the same in words, with its form to try again.
    page = httpx.post(f"{base}/-/search", files={"image": ("bomb.png", png_claiming(100_000, 100_000), "image/png")})
    assert page.status_code == 422
    assert "Not searched (422):" in page.text and "decompression bomb" in page.text
    assert 'name="image"' in page.text
    answers(base, photos, ids)


def test_a_huge_upload_is_refused_before_it_is_sent(server):
    """A body declared at 2 GB is answered 413 at once: the server never waits for it."""
    base, ids, photos, _, _ = server
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(
            b"POST /-/search.json HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 2000000000\r\n\r\n--b\r\n" + b"x" * 10_000
        )
        said = b""
        while b"}" not in said:  # the status line, the headers, then the JSON body
            chunk = conn.recv(65536)
            if not chunk:
                break
            said += chunk
    said = said.decode("latin-1")
    assert said.startswith("HTTP/1.1 413"), said
    assert "2,000,000,000 bytes, over the limit of 300,000 bytes" in said
    answers(base, photos, ids)


def test_the_page_form_needs_its_csrf_token(server):
    base, ids, photos, _, _ = server
    with httpx.Client(base_url=base, timeout=120) as browser:
        page = browser.get("/-/search")
        assert page.status_code == 200 and "ds_csrftoken" in browser.cookies
        token = re.search(r'name="csrftoken" value="([^"]+)"', page.text).group(1)
        assert page.text.index('name="csrftoken"') < page.text.index('name="image"')  # the token goes first
        upload = {"image": ("3.png", (photos / "3.png").read_bytes(), "image/png")}

        refused = browser.post("/-/search", files=upload, data={"k": "3"})
        assert refused.status_code == 403 and "csrf" in refused.text.lower()

        for forged in (token[:-2] + "xx", "ünïcode"):
            wrong = browser.post("/-/search", files=upload, data={"csrftoken": forged, "k": "3"})
            assert wrong.status_code == 403 and "Not searched (403)" in wrong.text
        refused = browser.post("/-/search.json", files=upload)  # the API too, from a browser with its cookies
        assert refused.status_code == 403 and "CSRF token" in refused.json()["error"]

        found = browser.post("/-/search", files=upload, data={"csrftoken": token, "k": "3"})
        assert found.status_code == 200, found.text
        assert f'href="/-/gallery/{ids["3.png"]}"' in found.text
        assert found.text.count("<figure>") == 3
        by_header = browser.post("/-/search.json", files=upload, headers={"x-csrftoken": token})
        assert by_header.status_code == 200 and by_header.json()["results"][0]["id"] == ids["3.png"]
    answers(base, photos, ids)  # a program without cookies needs no token
