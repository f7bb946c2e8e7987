"""End to end in a real browser: a `datasette` server on a free port, driven by Playwright
in headless Chromium. Checks that every thumbnail really decoded, that hostile names
run no script, and saves screenshots under screenshots/ (git-ignored)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from collection import images
from collection.index import build
from collection.store import Store
from conftest import CHROMIUM, CHROMIUM_ARGS, free_port, make_image, needs_chromium, responds, sample_photos, wait_until

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


@pytest.fixture
def server(tmp_path):
    """`datasette collection.db --metadata metadata.yml --plugins-dir datasette_plugins`."""
    folder = tmp_path / "photos"
    folder.mkdir()
    db_path = tmp_path / "collection.db"
    ids = build_photo_collection(folder, db_path)
    port = free_port()
    log = open(tmp_path / "datasette.log", "w")
    process = subprocess.Popen(
        [
            sys.executable, "-m", "datasette", "serve", str(db_path),
            "--metadata", str(ROOT / "metadata.yml"),
            "--plugins-dir", str(ROOT / "datasette_plugins"),
            "--host", "127.0.0.1", "--port", str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(
            lambda: process.poll() is not None or responds(f"{base}/-/versions.json"),
            timeout=60,
            message="datasette to start",
        )
        assert process.poll() is None, (tmp_path / "datasette.log").read_text()
        yield base, ids
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.dialogs = []
            page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
            yield page
        finally:
            browser.close()


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
