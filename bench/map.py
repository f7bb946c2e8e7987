"""The collection map at scale: how long the projection takes for 1k, 10k and 50k images,
and how the map page loads at 50k.

    nice .venv/bin/python bench/map.py
    nice .venv/bin/python bench/map.py --sizes 1000,10000 --page 10000 --tsne-max 10000

Synthetic clustered 1280-d unit vectors (clusters of 50 near-duplicates), no model.
Projection: `layout` with PCA alone, with PCA-50 + t-SNE and (past TSNE_MAX images) with
t-SNE of a sample and the rest placed near their neighbours, and how well each keeps
clusters together (the share of each image's 10 nearest neighbours on the map that are
from its own cluster). Page: a cached database of --page images with thumbnails;
`project` and `place_new` on it, then a real `datasette` server: /-/map.json size and
time, an atlas cold and cached, and in headless Chromium (when /usr/bin/chromium exists)
the time until the canvas has drawn, how long one frame takes, and the DOM size.
Prints a table per part.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import free_port  # noqa: E402  (the similar-page benchmark's)

from collection import projection  # noqa: E402
from collection.store import Store, encode, now  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(tempfile.gettempdir()) / "collection-bench"
CLUSTER = 50  # images per cluster
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def clustered(count: int, dimensions: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors scattered around one random centre per CLUSTER images, and their clusters."""
    rng = np.random.default_rng(seed)
    clusters = rng.integers(0, max(1, count // CLUSTER), count)
    centres = rng.normal(size=(clusters.max() + 1, dimensions)).astype(np.float32)
    vectors = centres[clusters] + 0.6 * rng.normal(size=(count, dimensions)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), clusters


def kept_together(points: np.ndarray, clusters: np.ndarray, k: int = 10) -> float:
    from sklearn.neighbors import NearestNeighbors

    _, nearest = NearestNeighbors(n_neighbors=k + 1).fit(points).kneighbors(points)
    return float((clusters[nearest[:, 1:]] == clusters[:, None]).mean())


def bench_projection(sizes: list[int], dimensions: int, tsne_max: int, threads: int | None) -> None:
    print(
        f"\nprojection of {dimensions}-d vectors (clusters of {CLUSTER}); {os.cpu_count()} CPUs, "
        f"{threads or 'all'} thread(s), load average {os.getloadavg()[0]:.1f} at the start"
    )
    projection.layout(np.eye(12, 16, dtype=np.float32), "pca")  # sklearn imported, untimed
    names = {"pca": "PCA", "tsne": "PCA-50 + t-SNE", "auto": "PCA-50 + t-SNE of a sample"}
    # CPU seconds too: on a shared machine a niced run's wall time says more about the others
    print(f"{'images':>8} {'method':<27} {'wall s':>8} {'CPU s':>8} {'10-NN in own cluster':>21}")
    for count in sizes:
        vectors, clusters = clustered(count, dimensions)
        # auto differs from tsne only past TSNE_MAX, where it samples
        for method in ["pca", "tsne"] + (["auto"] if count > projection.TSNE_MAX else []):
            if method == "tsne" and count > tsne_max:
                print(f"{count:>8,} {names[method]:<27} {'skipped (--tsne-max)':>38}", flush=True)
                continue
            started, cpu = time.perf_counter(), time.process_time()
            points, _ = projection.layout(vectors, method, threads=threads)
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
            together = kept_together(points, clusters)
            print(
                f"{count:>8,} {names[method]:<27} {seconds:>8.1f} {cpu:>8.1f} {together:>20.0%}",
                flush=True,
            )


# --- the page ------------------------------------------------------------------------------


def thumbnail(cluster: int, variant: int) -> bytes:
    """A small picture per cluster; variants shift it a little."""
    rng = np.random.default_rng(cluster)
    fg, bg = (tuple(int(c) for c in rng.integers(30, 256, 3)) for _ in range(2))
    image = Image.new("RGB", (96, 72), bg)
    draw = ImageDraw.Draw(image)
    step = 8 + cluster % 7 * 2
    for x in range(-72, 96, step * 2):
        draw.polygon(
            [
                (x + variant, 0),
                (x + variant + step, 0),
                (x + variant + step - 72, 72),
                (x + variant - 72, 72),
            ],
            fill=fg,
        )
    out = io.BytesIO()
    image.save(out, "JPEG", quality=80)
    return out.getvalue()


def collection(count: int, dimensions: int) -> Path:
    """A cached database of ``count`` synthetic images with vectors, labels and thumbnails."""
    db_path = CACHE / f"map-{count}-{dimensions}" / "collection.db"
    if db_path.exists():
        return db_path
    db_path.parent.mkdir(parents=True, exist_ok=True)
    vectors, clusters = clustered(count, dimensions)
    store = Store(db_path)
    store.claim_model("synthetic", dimensions, "fp32")
    stamp = now()
    jpegs: dict[tuple[int, int], bytes] = {}
    with store.db.atomic():
        conn = store.db.conn
        for image_id, (vector, cluster) in enumerate(zip(vectors, clusters), start=1):
            labels = [f"label {(int(cluster) + k * 7) % 1000}" for k in range(5)]
            conn.execute(
                "insert into images (id, path, sha256, size, mtime, width, height, format, "
                "added_at, updated_at, model, labels, top_label, top_score) "
                "values (?, ?, ?, 1000, 0, 640, 480, 'JPEG', ?, ?, 'synthetic', ?, ?, 0.5)",
                [
                    image_id,
                    f"/photos/{image_id:06d}.jpg",
                    f"{image_id:064x}",
                    stamp,
                    stamp,
                    json.dumps(labels),
                    labels[0],
                ],
            )
            conn.execute(
                "insert into vectors (image_id, model, vector) values (?, 'synthetic', ?)",
                [image_id, encode(vector)],
            )
            key = (int(cluster), image_id % 4)
            if key not in jpegs:
                jpegs[key] = thumbnail(*key)
            conn.execute(
                "insert into thumbnails (image_id, jpeg, width, height) values (?, ?, 96, 72)",
                [image_id, jpegs[key]],
            )
    store.close()
    return db_path


def get(port: int, path: str) -> tuple[float, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    started = time.perf_counter()
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    seconds = time.perf_counter() - started
    conn.close()
    if response.status != 200:
        raise SystemExit(f"{path}: HTTP {response.status}")
    return seconds, body


def bench_page(count: int, dimensions: int, threads: int | None) -> None:
    started = time.perf_counter()
    db_path = collection(count, dimensions)
    print(
        f"\nmap page at {count:,} images ({db_path}, "
        f"{os.path.getsize(db_path) / 1e6:.0f} MB, ready in {time.perf_counter() - started:.0f} s)"
    )
    rows: list[tuple[str, str]] = []
    store = Store(db_path)
    earlier = [
        row[0] for row in store.db.execute("select id from images where path like '/photos/new-%'")
    ]
    with store.db.atomic():
        store.delete_rows(earlier)  # the new images of an earlier run
    cpu = time.process_time()
    result = projection.project(store, threads=threads)
    cpu = time.process_time() - cpu
    rows.append(
        (
            f"project() with auto ({result.method}), read + layout + write",
            f"{result.seconds:.1f} s wall, {cpu:.1f} s CPU",
        )
    )
    vectors, _ = clustered(32, dimensions, seed=9)
    new = []
    with store.db.atomic():
        for i, vector in enumerate(vectors):
            new.append(
                store.db["images"]
                .insert({"path": f"/photos/new-{i}.jpg", "sha256": f"new{i}"})
                .last_pk
            )
            store.db["vectors"].insert(
                {"image_id": new[-1], "model": "synthetic", "vector": encode(vector)}
            )
    started = time.perf_counter()
    placed = projection.place_new(store, new)
    rows.append(
        (f"place_new() of a batch of {placed} new images", f"{time.perf_counter() - started:.2f} s")
    )
    store.close()

    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "collection",
            "serve",
            "--db",
            str(db_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                get(port, "/-/versions.json")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("datasette did not start") from None
                time.sleep(0.2)
        times = []
        for _ in range(5):
            seconds, body = get(port, "/-/map.json")
            times.append(seconds)
        data = json.loads(body)
        rows.append(
            ("/-/map.json size", f"{len(body) / 1e6:.2f} MB ({len(data['images']['id']):,} images)")
        )
        rows.append(
            (
                "/-/map.json time, first / median of 5",
                f"{times[0] * 1000:.0f} / {statistics.median(times) * 1000:.0f} ms",
            )
        )
        cold, atlas = get(port, "/-/map/atlas/0.jpg")
        warm, _ = get(port, "/-/map/atlas/0.jpg")
        rows.append(
            (
                f"atlas 0 ({projection.TILES_PER_ATLAS} tiles), built / cached",
                f"{cold * 1000:.0f} / {warm * 1000:.0f} ms, {len(atlas) / 1e3:.0f} kB",
            )
        )
        rows.append(("atlases for the whole map", f"{len(data['atlas']['keys'])}"))
        if os.path.exists(CHROMIUM):
            rows.extend(bench_browser(port))
        else:
            rows.append(("browser", f"skipped: no {CHROMIUM}"))
    finally:
        server.terminate()
        server.wait(10)
    width = max(len(name) for name, _ in rows)
    print(f"{'measure':<{width}}  value")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def bench_browser(port: int) -> list[tuple[str, str]]:
    from playwright.sync_api import sync_playwright

    rows = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(300_000)
        page.goto(f"http://127.0.0.1:{port}/-/map")
        page.wait_for_selector("#map-canvas[data-drawn]", state="attached")
        timing = page.evaluate(
            "({data: window.mapDataAt, drawn: window.mapFirstDrawAt, frame: window.collectionMap.lastDrawMs(), "
            "nodes: document.getElementsByTagName('*').length, canvases: document.querySelectorAll('canvas').length})"
        )
        rows.append(
            ("browser: map.json fetched and parsed (from navigation)", f"{timing['data']:.0f} ms")
        )
        rows.append(("browser: canvas first drawn (from navigation)", f"{timing['drawn']:.0f} ms"))
        rows.append(("browser: one frame, whole map as dots", f"{timing['frame']:.1f} ms"))
        rows.append(
            ("browser: DOM elements / canvases", f"{timing['nodes']} / {timing['canvases']}")
        )
        started = time.perf_counter()
        clicks = 0
        while clicks < 20:  # each 1.6x, at the centre, until the map draws thumbnails
            page.click("#zoom-in")
            clicks += 1
            page.wait_for_function("window.collectionMap.complete()")
            if page.evaluate("window.collectionMap.mode()") == "thumbnails":
                break
        seconds = time.perf_counter() - started
        loaded = page.evaluate(
            "performance.getEntriesByType('resource')"
            ".filter(e => e.name.includes('/-/map/atlas/')).length"
        )
        frame = page.evaluate("window.collectionMap.lastDrawMs()")
        rows.append(
            (
                f"browser: zoom in ({1.6**clicks:.0f}x) until thumbnails show, all loaded",
                f"{seconds:.1f} s ({loaded} atlases fetched)",
            )
        )
        rows.append(("browser: one frame, zoomed in with thumbnails", f"{frame:.1f} ms"))
        page.screenshot(path=str(ROOT / "screenshots" / "map-bench-zoomed.png"))
        browser.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,50000", help="collection sizes to project")
    parser.add_argument("--dimensions", type=int, default=1280)
    parser.add_argument(
        "--tsne-max", type=int, default=50_000, help="skip t-SNE above this many images"
    )
    parser.add_argument(
        "--page", type=int, default=50_000, help="images for the page part (0: skip)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=projection.THREADS,
        help="OpenMP/BLAS threads for the layout, 0 for every core (default: projection.THREADS)",
    )
    args = parser.parse_args()
    args.threads = args.threads or None
    (ROOT / "screenshots").mkdir(exist_ok=True)
    if args.page:
        bench_page(args.page, args.dimensions, args.threads)
    bench_projection(
        [int(s) for s in args.sizes.split(",")], args.dimensions, args.tsne_max, args.threads
    )


if __name__ == "__main__":
    main()
