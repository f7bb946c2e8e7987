"""The map page in headless Chromium against a real `datasette` server: it draws, a
hovered image shows its card, the label filter highlights, a click opens the similar
page. Saves screenshots under screenshots/ to look at."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from collection import projection
from collection.store import Store

from conftest import CHROMIUM, CHROMIUM_ARGS, free_port, needs_chromium, responds, wait_until
from test_projection import LABELS, make_collection

ROOT = Path(__file__).resolve().parent.parent
CLUSTERS, PER_CLUSTER = 30, 10  # 30 base pictures, each with 10 near-duplicate variants

pytestmark = [pytest.mark.browser, needs_chromium]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A mapped collection of near-duplicate clusters, served by `datasette` on a free port."""
    folder = tmp_path_factory.mktemp("map")
    db_path = folder / "collection.db"
    members = make_collection(db_path, clusters=CLUSTERS, per_cluster=PER_CLUSTER)
    store = Store(db_path)
    projection.project(store)
    store.close()
    port = free_port()
    # `collection serve` registers the plugins, as the entry points do once installed
    command = [sys.executable, "-m", "collection", "serve", "--db", str(db_path), "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    # its output to a file: a pipe that nobody reads can fill up and stall the server
    with open(folder / "datasette.log", "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(
                lambda: responds(f"{base}/-/map.json") or process.poll() is not None,
                timeout=60,
                message="datasette to start",
            )
            assert process.poll() is None, (folder / "datasette.log").read_text()
            yield base, members
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def open_map(browser, base: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(60_000)
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"{base}/-/map")
    page.wait_for_selector("#map-canvas[data-drawn]", state="attached")
    # every atlas in: the screenshot shows thumbnails, not their placeholders
    page.wait_for_function("window.collectionMap.complete()")
    return page, errors


def test_map_draws_hovers_filters_and_clicks_through(server, browser):
    base, members = server
    page, errors = open_map(browser, base)
    assert page.locator("#map-canvas").get_attribute("data-count") == str(len(members))
    assert page.locator("canvas").count() == 1

    target = sorted(members)[len(members) // 2]
    x, y = page.evaluate(f"window.collectionMap.screenPosition({target})")
    box = page.locator("#map-canvas").bounding_box()
    page.mouse.move(box["x"] + x, box["y"] + y)
    card = page.locator("#hover-card")
    card.wait_for(state="visible")
    shown = int(card.get_attribute("data-image-id"))
    # near-duplicates sit together: what is on top there is one of the target's variants
    assert members[shown] == members[target]
    assert LABELS[members[target] % len(LABELS)] in card.inner_text()
    assert "Projected with t-SNE" in card.inner_text()
    # then its details: the file's name, its labels with scores, and a date
    page.wait_for_selector("#hover-card[data-filled='1']")
    title = card.locator(".map-card-title").inner_text()
    assert title.rsplit(".", 1)[-1] in ("jpg", "png") and not title.startswith("Image ")
    assert "%)" in card.inner_text() and ("Taken " in card.inner_text() or "Added " in card.inner_text())
    page.wait_for_function("document.querySelector('#hover-card img').complete")
    assert page.evaluate("document.querySelector('#hover-card img').naturalWidth") > 0
    screenshot = ROOT / "screenshots" / "map.png"
    screenshot.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"\nscreenshot: {screenshot}")

    label = LABELS[3]
    page.fill("#label-filter", label)
    carrying = sum(
        1 for c in members.values() if label in [LABELS[(c + k) % len(LABELS)] for k in range(5)]
    )
    assert (
        page.locator("#map-message").inner_text()
        == f"{carrying} images with a label matching “{label}”"
    )
    page.mouse.move(box["x"] + 2, box["y"] + 2)
    card.wait_for(state="hidden")
    highlighted = ROOT / "screenshots" / "map-highlight.png"
    page.screenshot(path=str(highlighted), full_page=True)
    print(f"screenshot: {highlighted}")

    page.mouse.move(box["x"] + x, box["y"] + y)
    card.wait_for(state="visible")
    with page.expect_navigation():
        page.mouse.click(box["x"] + x, box["y"] + y)
    assert page.url == f"{base}/-/similar/{shown}"
    assert errors == []


def test_map_pans_and_zooms(server, browser):
    base, members = server
    page, errors = open_map(browser, base)
    target = min(members)
    box = page.locator("#map-canvas").bounding_box()
    before = page.evaluate(f"window.collectionMap.screenPosition({target})")
    page.mouse.move(box["x"] + 300, box["y"] + 300)
    page.mouse.down()
    page.mouse.move(box["x"] + 360, box["y"] + 340, steps=5)
    page.mouse.up()
    after = page.evaluate(f"window.collectionMap.screenPosition({target})")
    assert after == pytest.approx([before[0] + 60, before[1] + 40], abs=1)
    assert page.url == f"{base}/-/map"  # a drag is not a click

    page.click("#zoom-in")
    zoomed = page.evaluate(f"window.collectionMap.screenPosition({target})")
    centre = (box["width"] / 2, box["height"] / 2)
    assert zoomed == pytest.approx(
        [centre[i] + (after[i] - centre[i]) * 1.6 for i in (0, 1)], abs=1
    )
    page.mouse.move(box["x"] + 100, box["y"] + 100)
    page.mouse.wheel(0, 300)  # out, around the pointer
    page.click("#zoom-fit")
    assert page.evaluate(f"window.collectionMap.screenPosition({target})") == pytest.approx(
        before, abs=1
    )
    assert errors == []
