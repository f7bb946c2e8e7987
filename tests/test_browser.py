"""End to end in a real browser: `collection serve` (or `collection start`) on a free port,
driven by Playwright in headless Chromium. Checks that every thumbnail really decoded, that hostile names
run no script, and saves screenshots under screenshots/ (git-ignored)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from collection import images
from collection.index import build
from collection.store import Store
from conftest import browser_page, free_port, make_image, needs_chromium, responds, sample_photos, wait_until

pytestmark = [pytest.mark.browser, needs_chromium]

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "screenshots"
HOSTILE = "<img src=x onerror=alert(1)>.jpg"

# Hand-written top labels for the sample photos: plausible, so the pages read like real ones.
LABELS = {
    "chelsea": ["tabby", "tiger cat", "Egyptian cat", "lynx", "Persian cat"],
    "coffee": ["espresso", "cup", "coffee mug", "eggnog", "chocolate sauce"],
    "rocket": ["space shuttle", "missile", "projectile", "pole", "flagpole"],
    "astronaut": ["space suit", "military uniform", "crash helmet", "bulletproof vest", "lab coat"],
    "china": ["palace", "pagoda", "monastery", "bell cote", "dome"],
    "flower": ["daisy", "bee", "ant", "cardoon", "pot"],
}

pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")


def embed(image: Image.Image) -> np.ndarray:
    """A stand-in vector without a model: the colour layout at 8x8, centred and normalised,
    so variants of one photo really are each other's nearest neighbours."""
    small = np.asarray(image.convert("RGB").resize((8, 8), Image.Resampling.BILINEAR), np.float32)
    v = small.ravel() - small.mean()
    return (v / np.linalg.norm(v)).astype("<f4")


def build_photo_collection(folder: Path, db_path: Path) -> dict[str, int]:
    """Sample photos with flipped, cropped and darker variants, a few generated pictures
    and one file with a hostile name; real files, thumbnails and stand-in vectors."""
    variants = {}
    for name, array in sample_photos().items():
        photo = Image.fromarray(array).convert("RGB")
        w, h = photo.size
        variants[f"{name}.jpg"] = (photo, LABELS[name])
        variants[f"{name}-flipped.jpg"] = (ImageOps.mirror(photo), LABELS[name])
        variants[f"{name}-crop.jpg"] = (photo.crop((w // 8, h // 8, w - w // 8, h - h // 8)), LABELS[name])
        variants[f"{name}-dark.png"] = (photo.point(lambda p: p * 0.6), LABELS[name])
    for seed in range(3):
        path = make_image(folder / f"gradient-{seed}.png", seed=seed, size=(160, 120))
        variants[path.name] = (Image.open(path).convert("RGB"), ["window shade", "envelope", "web site"])
    path = make_image(folder / HOSTILE, seed=9, size=(120, 90))
    variants[HOSTILE] = (Image.open(path).convert("RGB"), ["<script>alert(2)</script>", "tabby"])

    store = Store(db_path)
    store.claim_model("colour-layout-8x8", 192, "fp32")
    ids = {}
    with store.db.atomic():
        for name, (image, labels) in variants.items():
            path = folder / name
            if not path.exists():
                image.save(path)
            decoded = images.decode(path)
            stat = os.stat(path)
            ids[name] = store.save_image(
                str(path),
                stat.st_mtime,
                decoded.metadata(),
                embed(decoded.image),
                [(f"n{i:08d}", label, round(0.7 / (i + 1), 3)) for i, label in enumerate(labels)],
                "colour-layout-8x8",
                (images.thumbnail(decoded.image), decoded.width, decoded.height),
            )
    store.close()
    build(db_path)  # the Annoy index, as `collection index` or the watcher makes it
    return ids


def serve(db_path: Path, log_path: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """`collection serve` (or `collection start`, with ``extra``) on a free port, once it answers."""
    port = free_port()
    command = extra or ("serve", "--db", str(db_path))
    with open(log_path, "w") as log:  # a file: a pipe nobody reads can fill and stall the server
        process = subprocess.Popen(
            [sys.executable, "-m", "collection", *command, "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: process.poll() is not None or responds(f"{base}/-/versions.json"),
            timeout=90,
            message="the server to start",
        )
        assert process.poll() is None, log_path.read_text()
    except BaseException:
        process.terminate()
        process.wait(timeout=10)
        raise
    return process, base


@pytest.fixture
def server(tmp_path):
    """`collection serve` on the photo collection: the plugins and metadata.yml as installed."""
    folder = tmp_path / "photos"
    folder.mkdir()
    db_path = tmp_path / "collection.db"
    ids = build_photo_collection(folder, db_path)
    process, base = serve(db_path, tmp_path / "datasette.log")
    try:
        yield base, ids
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def page():
    with browser_page() as page:
        yield page


def thumbnails_rendered(page) -> list[dict]:
    """Scroll every thumbnail into view (they load lazily), wait until each has loaded
    or failed, and report each one's natural width."""
    for img in page.locator("img[src*='/-/thumbnail/']").all():
        img.scroll_into_view_if_needed()
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll(\"img[src*='/-/thumbnail/']\"))"
        ".every(img => img.complete)"
    )
    return page.eval_on_selector_all(
        "img[src*='/-/thumbnail/']",
        "imgs => imgs.map(img => ({src: img.getAttribute('src'), width: img.naturalWidth}))",
    )


def screenshot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def test_images_table_and_similar_page_in_chromium(server, page):
    base, ids = server

    page.goto(f"{base}/collection/images")
    shown = thumbnails_rendered(page)
    assert len(shown) == len(ids)
    assert all(img["width"] > 0 for img in shown), [img for img in shown if not img["width"]]
    assert page.get_by_text(HOSTILE).count() >= 1  # the name shows as text...
    assert page.locator("img[src='x']").count() == 0  # ...and never becomes an element
    assert page.locator(".facet-info").count() >= 4  # labels, format, camera, taken_year
    screenshot(page, "images-table")

    chelsea = ids["chelsea.jpg"]
    page.goto(f"{base}/-/similar/{chelsea}")
    shown = thumbnails_rendered(page)
    assert len(shown) == 11  # the image itself and its 10 nearest
    assert all(img["width"] > 0 for img in shown)
    grid = page.locator(".collection-grid figure")
    assert grid.count() == 10
    first_three = {grid.nth(i).locator("figcaption a").inner_text() for i in range(3)}
    assert first_three == {"chelsea-flipped.jpg", "chelsea-crop.jpg", "chelsea-dark.png"}
    assert "tabby" in page.locator(".collection-hero").inner_text()
    assert page.locator(".collection-status").inner_text().startswith(f"Index of {len(ids)} images")
    screenshot(page, "similar-page")

    grid.nth(0).locator("img").click()  # a neighbour's thumbnail leads to its own page
    page.wait_for_url(f"{base}/-/similar/*")
    assert page.locator("h1").inner_text().startswith("Images similar to chelsea-")

    page.locator(".collection-hero a img").click()  # the full-size image
    page.wait_for_url(f"{base}/-/image/*")
    assert page.evaluate("document.images[0].naturalWidth") > 256

    page.goto(f"{base}/-/similar/{ids[HOSTILE]}")
    assert all(img["width"] > 0 for img in thumbnails_rendered(page))
    assert page.get_by_text("<script>alert(2)</script>").count() >= 1
    screenshot(page, "similar-page-hostile-name")

    page.goto(f"{base}/collection/labels?label=tabby")
    assert all(img["width"] > 0 for img in thumbnails_rendered(page))
    screenshot(page, "labels-table")

    page.goto(f"{base}/-/similar/999999")
    assert page.locator("h1").inner_text().startswith("Error 404") or "404" in page.title()
    assert page.dialogs == []  # no script from a file name or label ever ran


def card_names(page) -> list[str]:
    return page.locator(".collection-gallery figcaption > a").all_inner_texts()


def test_home_gallery_and_image_page_in_chromium(server, page):
    base, ids = server

    page.goto(f"{base}/")
    home = page.locator(".collection-home a").all_inner_texts()
    assert home[:2] == ["Gallery", "Map"] and "Watcher status" in home
    assert page.locator("a", has_text="live_images").count() == 1  # tables follow, none behind "..."
    assert page.get_by_text("_sqlite_migrations").count() == 0
    screenshot(page, "home")

    page.locator(".collection-home a", has_text="Gallery").click()
    page.wait_for_url(f"{base}/-/gallery")
    shown = thumbnails_rendered(page)
    assert len(shown) == len(ids) and all(img["width"] > 0 for img in shown)
    assert card_names(page)[0] == HOSTILE  # newest first: the hostile name was added last
    assert page.locator("img[src='x']").count() == 0
    screenshot(page, "gallery")

    page.locator("p.collection-chips a.collection-chip", has_text="tabby").first.click()
    page.wait_for_url(f"{base}/-/gallery?label=tabby")
    narrowed = card_names(page)
    assert sorted(narrowed) == sorted([HOSTILE] + [n for n in ids if n.startswith("chelsea")])
    assert all(img["width"] > 0 for img in thumbnails_rendered(page))
    screenshot(page, "gallery-label-tabby")

    page.locator(".collection-gallery figcaption > a", has_text="chelsea.jpg").click()
    page.wait_for_url(f"{base}/-/gallery/{ids['chelsea.jpg']}")
    page.wait_for_function("() => document.querySelector('.collection-preview img').complete")
    assert page.evaluate("document.querySelector('.collection-preview img').naturalWidth") > 256
    assert page.locator(".collection-labels a").all_inner_texts() == LABELS["chelsea"]
    strip = page.locator(".collection-strip li a")
    assert strip.count() >= 3
    assert {strip.nth(i).get_attribute("title").split(" (")[0] for i in range(3)} == {
        "chelsea-flipped.jpg", "chelsea-crop.jpg", "chelsea-dark.png"
    }
    assert all(img["width"] > 0 for img in thumbnails_rendered(page))
    screenshot(page, "image-page")

    page.goto(f"{base}/collection/images")
    assert page.locator("details.collection-columns").count() == 1  # descriptions folded
    assert page.locator("details.collection-columns[open]").count() == 0
    screenshot(page, "images-table-readable")
    assert page.dialogs == []


def status_numbers(page) -> dict:
    keys = ("watcher.state", "watcher.queued", "watcher.rate", "watcher.session.seen", "collection.images",
            "collection.deleted")
    return {key: page.locator(f"[data-key='{key}']").inner_text() for key in keys}


@pytest.mark.slow
def test_status_during_a_burst_then_a_deleted_image(tmp_path, page):
    """`collection start` with a real (randomly weighted) model: /-/status moves during a
    burst and settles on the true counts; a deleted file leaves the gallery and search,
    and its page says so."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    db_path = tmp_path / "collection.db"
    process, base = serve(
        db_path, tmp_path / "start.log",
        "start", str(inbox), "--db", str(db_path), "--model", "efficientnet_lite0:random",
    )
    try:
        page.goto(f"{base}/-/status")
        # The page reloads itself once the watcher has written its first status.
        page.wait_for_selector("[data-key='watcher.state']", timeout=120_000)
        wait_until(lambda: page.locator("[data-key='watcher.state']").inner_text() == "watching", 60,
                   interval=0.5, message="the watcher to be watching")
        burst = 60
        for n in range(burst):
            make_image(inbox / f"burst-{n:02d}.jpg", seed=100 + n, size=(320, 240), fmt="JPEG")
        samples, shot = [], None
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            samples.append(status_numbers(page))
            if samples[-1]["collection.images"] == str(burst) and samples[-1]["watcher.queued"] == "0":
                break
            if 0 < int(samples[-1]["collection.images"] or 0) < burst and not shot:
                shot = screenshot(page, "status-burst")  # mid-burst: some stored, more queued
            time.sleep(0.4)
        # The numbers moved while the burst went in (a fast runtime may store it in two
        # batches, so count the states of stored, seen and queued together).
        states = {(s["collection.images"], s["watcher.session.seen"], s["watcher.queued"]) for s in samples}
        assert len(states) >= 3, samples
        assert any(s["watcher.queued"] not in ("0", "") for s in samples), samples
        settled = samples[-1]
        assert settled["collection.images"] == str(burst) and settled["watcher.queued"] == "0", samples
        assert settled["watcher.session.seen"] == str(burst)
        assert float(settled["watcher.rate"]) > 0  # over the last minute, the burst still counts
        screenshot(page, "status-settled")

        # The watcher made the first map by itself (60 images, over AUTO_MAP_MIN).
        def map_drawn() -> bool:
            page.goto(f"{base}/-/map")
            return "no map yet" not in page.content()

        wait_until(map_drawn, 60, interval=1.0, message="the watcher's first map")
        page.wait_for_function("document.querySelector('canvas')?.dataset.count === '60'", timeout=30_000)
        screenshot(page, "map-from-start")
        page.goto(f"{base}/-/status")

        store = Store(db_path)
        gone_id, gone_path, gone_label = store.db.execute(
            "select id, path, top_label from images order by id limit 1"
        ).fetchone()
        store.close()
        Path(gone_path).unlink()
        wait_until(lambda: page.locator("[data-key='collection.deleted']").inner_text() == "1", 30,
                   interval=0.5, message="the deletion to show on /-/status")
        page.goto(f"{base}/-/gallery")
        names = card_names(page)
        page.locator("a[rel=next]").click()  # a page holds 48: the rest is one page older
        page.wait_for_url(f"{base}/-/gallery?before=*")
        names += card_names(page)
        assert len(names) == burst - 1 and Path(gone_path).name not in names
        assert page.locator("a[rel=next]").count() == 0
        page.goto(f"{base}/-/gallery?label={gone_label}")  # search by its label: not found
        assert page.locator(f"a[href='/-/gallery/{gone_id}']").count() == 0
        page.goto(f"{base}/-/similar/{gone_id}")  # its old similar-images link
        page.wait_for_url(f"{base}/-/gallery/{gone_id}")
        assert "File deleted" in page.locator(".collection-banner").inner_text()
        assert page.locator(".collection-preview").count() == 0
        screenshot(page, "deleted-image-page")
    finally:
        process.terminate()
        process.wait(timeout=30)
