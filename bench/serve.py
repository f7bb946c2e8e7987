"""Latency of the gallery, image and similar-image pages on a synthetic collection.

    .venv/bin/python bench/serve.py --images 10000 --requests 200
    .venv/bin/python bench/serve.py --gallery-only 1000000 --requests 200
    .venv/bin/python bench/serve.py --search PHOTOS_FOLDER --requests 50

--search times search by upload (POST /-/search.json) with real EfficientNet-Lite0
weights instead: a collection (cached) of the folder's photos and three variants of
each, searched with flipped, 2/3-size, re-encoded (JPEG q85) copies of the photos.
Cold: no daemon, so the first call starts a worker (its seconds are the model load),
then the warm worker; warm: a running `collection watch` daemon answers.

Makes (once, cached) a collection of synthetic rows: clustered random unit vectors,
five labels each and a few hundred distinct thumbnails, no model. Builds its Annoy
index, then adds --unindexed more rows that the index does not cover (what the
watcher leaves between rebuilds), starts `collection serve` on a free port and times
sequential keep-alive requests for random image ids. Prints one table.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from collection.index import build
from collection.store import Store, encode, now
from machine import cpu_flags  # bench/machine.py, beside this script

CACHE = Path(tempfile.gettempdir()) / "collection-bench"
WARM_UP = 10  # requests per endpoint left out of the figures
CASES = [
    ("similar page", "/-/similar/{}"),
    ("similar JSON", "/-/similar/{}.json"),
    ("similar JSON k=50", "/-/similar/{}.json?k=50"),
    ("similar JSON min_score=.5", "/-/similar/{}.json?min_score=0.5"),
    ("thumbnail", "/-/thumbnail/{}.jpg"),
    ("gallery first page", "/-/gallery"),
    ("gallery page before an id", "/-/gallery?before={}"),
    ("gallery label=tabby", "/-/gallery?label=tabby"),
    ("gallery label, before an id", "/-/gallery?label=tabby&before={}"),
    ("image page", "/-/gallery/{}"),
    ("status JSON", "/-/status.json"),
]
LABELS = ["tabby", "tiger cat", "golden retriever", "espresso", "space shuttle", "daisy",
          "palace", "sports car", "goldfinch", "lynx", "cup", "pagoda", "bee", "racer"]


def thumbnails(count: int, rng: np.random.Generator) -> list[bytes]:
    out = []
    for _ in range(count):
        pixels = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).resize((256, 192), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=80)
        out.append(buffer.getvalue())
    return out


def add_rows(store: Store, start: int, count: int, dimensions: int, seed: int) -> None:
    """Rows, labels, vectors and thumbnails written straight in, one transaction."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).normal(size=(50, dimensions))
    vectors = centres[rng.integers(0, len(centres), count)] + rng.normal(size=(count, dimensions))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    jpegs = thumbnails(200, rng)
    model = store.model
    stamp = now()
    pick = random.Random(seed)
    with store.db.atomic():
        conn = store.db.conn
        for offset, vector in enumerate(vectors):
            image_id = start + offset
            labels = pick.sample(LABELS, 5)
            conn.execute(
                "insert into images (id, path, sha256, size, mtime, width, height, format, "
                "added_at, updated_at, model, labels, top_label, top_score) "
                "values (?, ?, ?, 1000, 0, 640, 480, 'JPEG', ?, ?, ?, ?, ?, 0.5)",
                [image_id, f"/photos/{image_id:06d}.jpg", f"{image_id:064x}", stamp, stamp,
                 model, json.dumps(labels), labels[0]],
            )
            conn.executemany(
                "insert into labels (image_id, rank, wnid, label, score) values (?, ?, ?, ?, ?)",
                [(image_id, rank, f"n{rank:08d}", label, 0.5 / rank)
                 for rank, label in enumerate(labels, start=1)],
            )
            conn.execute("insert into vectors (image_id, model, vector) values (?, ?, ?)",
                         [image_id, model, encode(vector)])
            conn.execute("insert into thumbnails (image_id, jpeg, width, height) values (?, ?, 640, 480)",
                         [image_id, jpegs[offset % len(jpegs)]])


def collection(images: int, unindexed: int, dimensions: int) -> Path:
    folder = CACHE / f"serve-{images}-{unindexed}-{dimensions}"
    db_path = folder / "collection.db"
    if db_path.exists():
        return db_path
    folder.mkdir(parents=True, exist_ok=True)
    store = Store(db_path)
    store.claim_model("synthetic", dimensions, "fp32")
    add_rows(store, 1, images - unindexed, dimensions, seed=1)
    build(db_path)
    add_rows(store, images - unindexed + 1, unindexed, dimensions, seed=2)
    store.close()
    return db_path


def gallery_rows(images: int) -> Path:
    """(Once, cached) a database of ``images`` rows with five labels each and one image in
    20 deleted, but no vectors or thumbnails: enough for the gallery's queries."""
    db_path = CACHE / f"gallery-{images}" / "collection.db"
    if db_path.exists():
        return db_path
    db_path.parent.mkdir(parents=True, exist_ok=True)
    store = Store(db_path)
    stamp = now()
    pick = random.Random(0)
    with store.db.atomic():
        for start in range(1, images + 1, 10_000):
            ids = range(start, min(start + 10_000, images + 1))
            labels = {i: pick.sample(LABELS, 5) for i in ids}
            store.db.conn.executemany(
                "insert into images (id, path, size, mtime, format, camera, added_at, labels, top_label, "
                "deleted_at) values (?, ?, 1000, 0, ?, ?, ?, ?, ?, ?)",
                [(i, f"/photos/{i:07d}.jpg", "PNG" if i % 10 == 0 else "JPEG", f"camera {i % 7}", stamp,
                  json.dumps(labels[i]), labels[i][0], stamp if i % 20 == 0 else None) for i in ids],
            )
            store.db.conn.executemany(
                "insert into labels (image_id, rank, wnid, label, score) values (?, ?, ?, ?, ?)",
                [(i, r, f"n{r:08d}", label, 0.5 / r) for i in ids for r, label in enumerate(labels[i], 1)],
            )
    store.close()
    return db_path


def time_gallery_queries(images: int, rounds: int) -> None:
    """The gallery's page queries straight on SQLite (no HTTP) at ``images`` rows."""
    import sqlite3

    from collection import gallery

    started = time.perf_counter()
    db_path = gallery_rows(images)
    print(f"gallery queries: {images:,} images, {db_path} ({os.path.getsize(db_path) / 1e6:.0f} MB, "
          f"ready in {time.perf_counter() - started:.1f}s); {rounds} rounds each, random page starts")
    conn = sqlite3.connect(db_path)
    rng = random.Random(1)
    cases = [
        ("first page", lambda: (gallery.Filters(), None)),
        ("page before a random id", lambda: (gallery.Filters(), rng.randint(1, images))),
        ("label, first page", lambda: (gallery.Filters(label=rng.choice(LABELS)), None)),
        ("label, before a random id", lambda: (gallery.Filters(label=rng.choice(LABELS)), rng.randint(1, images))),
        ("format=PNG, first page", lambda: (gallery.Filters(format="PNG"), None)),
        ("label + camera", lambda: (gallery.Filters(label=rng.choice(LABELS), camera="camera 3"), None)),
    ]
    print(f"\n{'gallery query':<28} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
    for name, make in cases:
        ms = []
        for _ in range(rounds):
            filters, before = make()
            t = time.perf_counter()
            gallery.page(conn, filters, before)
            ms.append((time.perf_counter() - t) * 1000)
        ms.sort()
        p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
        print(f"{name:<28} {statistics.median(ms):>8.2f} {p95:>8.2f} {ms[-1]:>8.2f}")
    # The filter menus are counted in the background (gallery.options), never per request.
    t = time.perf_counter()
    gallery.options(str(db_path))
    while gallery.options(str(db_path)) is None:
        time.sleep(0.01)
    print(f"{'filter menus (background)':<28} {(time.perf_counter() - t) * 1000:>8.2f}")
    conn.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(db_path: Path, port: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "collection", "serve", "--db", str(db_path), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            time.sleep(0.2)
    process.terminate()
    raise SystemExit("the server did not start")


def timed(conn: http.client.HTTPConnection, path: str) -> float:
    started = time.perf_counter()
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    if response.status != 200:
        raise SystemExit(f"{path}: HTTP {response.status}")
    return (time.perf_counter() - started) * 1000


def search_collection(photos: Path) -> tuple[Path, Path]:
    """(Once, cached) the photos and a flipped, a cropped and a darker copy of each, added
    with `collection add` (real weights); the folder and the database."""
    from PIL import ImageEnhance, ImageOps

    sources = sorted(p for p in photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    folder = CACHE / f"search-{len(sources)}" / "photos"
    db_path = folder.parent / "collection.db"
    if db_path.exists():
        return folder, db_path
    folder.mkdir(parents=True, exist_ok=True)
    for source in sources:
        image = Image.open(source).convert("RGB")
        w, h = image.size
        image.save(folder / f"{source.stem}.jpg", quality=90)
        ImageOps.mirror(image).save(folder / f"{source.stem}-flipped.jpg", quality=90)
        image.crop((w // 8, h // 8, w - w // 8, h - h // 8)).save(folder / f"{source.stem}-crop.jpg", quality=90)
        ImageEnhance.Brightness(image).enhance(0.7).save(folder / f"{source.stem}-dark.jpg", quality=90)
    subprocess.run([sys.executable, "-m", "collection", "add", str(folder), "--db", str(db_path)],
                   check=True, stdout=subprocess.DEVNULL)
    return folder, db_path


def uploads(photos: Path, megapixels: float | None = None) -> list[tuple[str, bytes]]:
    """A flipped, 2/3-size JPEG (q85) of each photo, a copy a person would search with,
    by the photo's name; with ``megapixels``, scaled up to that many instead (a phone's)."""
    out = []
    for source in sorted(p for p in photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
        image = Image.open(source).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        scale = (megapixels * 1e6 / (image.width * image.height)) ** 0.5 if megapixels else 2 / 3
        image = image.resize((round(image.width * scale), round(image.height * scale)))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=85)
        out.append((source.stem, buffer.getvalue()))
    return out


def post_image(conn: http.client.HTTPConnection, data: bytes) -> tuple[float, dict]:
    """POST /-/search.json with the image as multipart; seconds and the answer."""
    boundary = "bench-boundary-7d1f"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="upload.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    started = time.perf_counter()
    conn.request("POST", "/-/search.json?k=10", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    response = conn.getresponse()
    answer = json.loads(response.read())
    seconds = time.perf_counter() - started
    if response.status != 200:
        raise SystemExit(f"search: HTTP {response.status}: {answer}")
    return seconds, answer


def time_search(photos: Path, requests: int) -> None:
    from collection.embedder import ping

    started = time.perf_counter()
    folder, db_path = search_collection(photos)
    images, large = uploads(photos), uploads(photos, megapixels=12)
    print(f"collection: {len(list(folder.iterdir()))} images (real EfficientNet-Lite0), {db_path} "
          f"(ready in {time.perf_counter() - started:.1f}s); uploads: {len(images)} copies, "
          f"median {statistics.median(len(i) for _, i in images) / 1e3:.0f} KB; 12 MP copies median "
          f"{statistics.median(len(i) for _, i in large) / 1e6:.1f} MB")
    if ping(db_path):
        raise SystemExit(f"something already answers image searches for {db_path}: stop it first")
    rows = []

    def measure(name: str, conn, count: int, copies=images) -> None:
        times, embeds, found = [], [], 0
        for n in range(count):
            stem, data = copies[n % len(copies)]
            seconds, answer = post_image(conn, data)
            times.append(seconds)
            embeds.append(answer["seconds"])
            found += Path(answer["results"][0]["path"]).stem.startswith(stem)
        rows.append((name, count, times, embeds, found))

    port = free_port()
    server = serve(db_path, port, {"COLLECTION_EMBED_IDLE": "600"})
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        seconds, answer = post_image(conn, images[0][1])
        assert answer["via"] == "worker", answer["via"]
        first = Path(answer["results"][0]["path"]).stem.startswith(images[0][0])
        rows.append(("cold: first call, starts a worker", 1, [seconds], [answer["seconds"]], first))
        for _, data in images[:3]:  # warm-up, left out
            post_image(conn, data)
        measure("cold: then the warm worker", conn, requests)
        conn.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
        worker = ping(db_path)
        if worker:
            os.kill(worker["pid"], 15)
    _wait_gone(db_path)

    daemon = subprocess.Popen([sys.executable, "-m", "collection", "watch", str(folder), "--db", str(db_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port = free_port()
    server = serve(db_path, port)
    try:
        deadline = time.monotonic() + 300
        while not (ping(db_path) or {}).get("model"):
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise SystemExit("the daemon did not answer")
            time.sleep(0.2)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        for _, data in images[:3]:
            post_image(conn, data)
        measure("warm: `collection watch` daemon", conn, requests)
        measure("warm: daemon, 12 MP JPEG copies", conn, max(requests // 4, len(large)), large)
        conn.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
        daemon.terminate()
        daemon.wait(timeout=60)

    print("\nsearch by upload, POST /-/search.json, k=10, sequential, keep-alive")
    print("(embed: decoding and the model, in the daemon or worker; top-1: the first result is the photo or a copy of it)")
    print(f"{'case':<36} {'calls':>5} {'p50 s':>7} {'p95 s':>7} {'max s':>7} {'embed p50 s':>12} {'top-1':>6}")
    for name, count, times, embeds, found in rows:
        ms = sorted(times)
        p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
        print(f"{name:<36} {count:>5} {statistics.median(ms):>7.3f} {p95:>7.3f} {ms[-1]:>7.3f} "
              f"{statistics.median(embeds):>12.3f} {found / count:>6.0%}")


def _wait_gone(db_path: Path) -> None:
    from collection.embedder import ping

    deadline = time.monotonic() + 30
    while ping(db_path) and time.monotonic() < deadline:
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--unindexed", type=int, default=500, help="rows added after the index build")
    parser.add_argument("--dimensions", type=int, default=1280)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--gallery-only", type=int, metavar="IMAGES",
                        help="time only the gallery's SQL, at this many images (e.g. 1000000)")
    parser.add_argument("--search", type=Path, metavar="PHOTOS",
                        help="time search by upload instead, with a collection made from this folder of photos")
    args = parser.parse_args()

    print(f"CPU flags: {cpu_flags()}")
    if args.gallery_only:
        time_gallery_queries(args.gallery_only, args.requests)
        return
    if args.search:
        time_search(args.search, args.requests)
        return
    started = time.perf_counter()
    db_path = collection(args.images, args.unindexed, args.dimensions)
    print(f"collection: {args.images} images, {args.dimensions}-d vectors, {db_path} "
          f"({os.path.getsize(db_path) / 1e6:.0f} MB, ready in {time.perf_counter() - started:.1f}s)")
    port = free_port()
    process = serve(db_path, port)
    rng = random.Random(0)
    try:
        status = json.loads(_get(port, "/-/similar/1.json"))["index"]
        print(f"index: {status['indexed']} indexed ({status['n_trees']} trees), "
              f"{status['unindexed']} searched exactly; {args.requests} requests each, "
              f"sequential, keep-alive, first {WARM_UP} left out")
        ids = [rng.randint(1, args.images) for _ in range(args.requests)]
        times: dict[str, list[float]] = {name: [] for name, _ in CASES}
        conn = http.client.HTTPConnection("127.0.0.1", port)
        for n, image_id in enumerate(ids):
            for name, pattern in CASES:  # interleaved, so a busy moment hits every case alike
                ms = timed(conn, pattern.format(image_id))
                if n >= WARM_UP:
                    times[name].append(ms)
        conn.close()
        print(f"\n{'endpoint':<28} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
        for name, pattern in CASES:
            ms = sorted(times[name])
            p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
            print(f"{name:<28} {statistics.median(ms):>8.1f} {p95:>8.1f} {ms[-1]:>8.1f}")
    finally:
        process.terminate()
        process.wait(timeout=10)


def _get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.request("GET", path)
    body = conn.getresponse().read()
    conn.close()
    return body


if __name__ == "__main__":
    main()
