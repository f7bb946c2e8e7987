"""Search by example in a real browser, with real EfficientNet-Lite0 weights: `collection
start` (the watcher daemon embeds what the page sends; Datasette runs in its own
process), driven by Playwright in headless Chromium. An upload of a flipped, shrunk,
re-encoded copy finds its original first; a rectangle dragged over one object of a
two-object photo finds that object's images before the other's. Screenshots go to
screenshots/ (git-ignored)."""

from __future__ import annotations

import subprocess

import httpx
import pytest
from PIL import Image, ImageEnhance, ImageOps

from collection.embedder import ping
from collection.ingest import Ingester
from collection.models import get_model
from collection.store import Store
from conftest import browser_page, needs_chromium, sample_photos, wait_until
from test_search_page import start_server

pytestmark = [pytest.mark.browser, needs_chromium]
pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

from test_browser import screenshot  # noqa: E402  (after the skip: it needs playwright too)

KINDS = ("chelsea", "coffee")  # a cat and a cup: two kinds the model tells apart at once


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """Three versions each of the cat and the cup, other photos, and the cat beside the cup."""
    folder = tmp_path_factory.mktemp("photos")
    photos = {name: Image.fromarray(array).convert("RGB") for name, array in sample_photos().items()}
    for name in KINDS:
        photo = photos[name]
        w, h = photo.size
        photo.save(folder / f"{name}.png")
        ImageEnhance.Brightness(photo).enhance(0.7).save(folder / f"{name}-dark.jpg", quality=90)
        photo.crop((w // 10, h // 10, w - w // 10, h - h // 10)).save(folder / f"{name}-crop.jpg", quality=90)
    for name in ("rocket", "astronaut", "china", "flower"):
        photos[name].save(folder / f"{name}.jpg", quality=90)
    both = Image.new("RGB", (900, 300), "white")
    both.paste(photos["chelsea"].resize((450, 300)), (0, 0))
    both.paste(photos["coffee"].resize((450, 300)), (450, 0))
    both.save(folder / "cat-and-cup.jpg", quality=90)
    db_path = tmp_path_factory.mktemp("db") / "collection.db"
    store = Store(db_path)
    paths = sorted(str(p) for p in folder.iterdir())
    assert Ingester(store, get_model("efficientnet_lite0").load()).add(paths).added == len(paths)
    ids = {row["path"].rsplit("/", 1)[-1]: row["id"] for row in store.db.query("select id, path from images")}
    store.close()
    return folder, db_path, ids


@pytest.fixture(scope="module")
def started(collection, tmp_path_factory):
    """`collection start` on the collection, once its daemon answers image searches."""
    folder, db_path, ids = collection
    process, base = start_server(["start", str(folder), "--db", str(db_path)], tmp_path_factory.mktemp("log") / "start.log")
    try:
        wait_until(lambda: (ping(db_path) or {}).get("model"), 240, 0.25, "the daemon's model")
        yield base, ids, process
    finally:
        process.terminate()
        process.wait(timeout=60)


@pytest.fixture
def page():
    with browser_page(has_touch=True) as page:
        yield page


def result_names(page) -> list[str]:
    return page.locator(".collection-search-results figcaption a:not(.collection-similar)").all_inner_texts()


def ranked_first(names: list[str], kind: str, other: str) -> bool:
    """Every image of ``kind`` comes before every image of ``other``."""
    ours = [i for i, n in enumerate(names) if n.startswith(kind)]
    theirs = [i for i, n in enumerate(names) if n.startswith(other)]
    return len(ours) == 3 and (not theirs or max(ours) < min(theirs))


def test_an_uploaded_copy_finds_its_original(started, collection, page, tmp_path):
    base, ids, process = started
    copy = ImageOps.mirror(Image.fromarray(sample_photos()["china"]))
    copy = copy.resize((copy.width // 2, copy.height // 2))
    upload = tmp_path / "holiday-snap.jpg"
    copy.save(upload, quality=60)

    page.goto(f"{base}/")
    page.locator(".collection-home a", has_text="Search by example").click()
    page.wait_for_url(f"{base}/-/search")
    screenshot(page, "search-page-empty")

    page.set_input_files("input[type=file]", str(upload))  # the page's script posts it at once
    page.wait_for_selector(".collection-search-results figure")
    names = result_names(page)
    assert names[0] == "china.jpg", names
    assert page.locator(".collection-query-preview img").evaluate("img => img.naturalWidth") == copy.width
    labels = page.locator(".collection-query .collection-labels a").all_inner_texts()
    assert {"palace", "pagoda", "monastery"} & set(labels), labels
    assert "by the daemon" in page.locator(".collection-query").inner_text()
    screenshot(page, "search-page-results")

    # Pasted (a screenshot on the clipboard) and dropped: the same search, a cat and then a cup.
    for event, name in (("paste", "coffee"), ("drop", "chelsea")):
        page.evaluate(
            """async ([event, url]) => {
                const blob = await (await fetch(url)).blob();
                const files = new DataTransfer();
                files.items.add(new File([blob], "from-clipboard.jpg", { type: "image/jpeg" }));
                const init = event === "paste" ? { clipboardData: files } : { dataTransfer: files };
                const Kind = event === "paste" ? ClipboardEvent : DragEvent;
                document.body.dispatchEvent(new Kind(event, { ...init, bubbles: true, cancelable: true }));
            }""",
            [event, f"/-/thumbnail/{ids[name + '-crop.jpg']}.jpg"],
        )
        page.wait_for_function(
            "name => (document.querySelector('.collection-search-results figcaption a') || {}).textContent"
            "?.startsWith(name)", arg=name,
        )
        assert all(n.startswith(name) for n in result_names(page)[:3]), result_names(page)

    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(upload.read_bytes()[:2000])
    page.set_input_files("input[type=file]", str(truncated))
    page.wait_for_selector(".collection-search-error")
    assert "Not searched (422)" in page.locator(".collection-search-error").inner_text()
    screenshot(page, "search-page-error")
    assert page.dialogs == []

    with open(f"/proc/{server_pid(process)}/maps") as f:  # Datasette, under `collection start`
        assert "tensorflow" not in f.read()


def server_pid(start: subprocess.Popen) -> int:
    """The `collection serve` process that `collection start` runs beside its watcher."""
    children = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(start.pid)], capture_output=True, text=True)
    return next(int(line.split()[0]) for line in children.stdout.splitlines() if " serve " in line)


def test_a_region_finds_what_is_in_it(started, page):
    base, ids, _ = started
    both = ids["cat-and-cup.jpg"]
    for box, kind, other in (("0,0,0.5,1", "chelsea", "coffee"), ("0.5,0,1,1", "coffee", "chelsea")):
        answer = httpx.get(f"{base}/-/search.json", params={"image_id": both, "box": box, "k": 8}, timeout=120).json()
        names = [r["path"].rsplit("/", 1)[-1] for r in answer["results"]]
        assert ranked_first(names, kind, other), (box, names)

    page.goto(f"{base}/-/gallery/{both}")
    picture = page.locator(".collection-preview img")
    page.wait_for_function("() => document.querySelector('.collection-preview img').complete")
    assert page.locator(".collection-region-bar a").is_hidden()
    r = picture.bounding_box()
    page.mouse.move(r["x"] + r["width"] * 0.52, r["y"] + r["height"] * 0.03)  # the cup's half, right to left
    page.mouse.down()
    page.mouse.move(r["x"] + r["width"] * 0.75, r["y"] + r["height"] * 0.5, steps=4)
    page.mouse.move(r["x"] + r["width"] * 0.98, r["y"] + r["height"] * 0.97, steps=4)
    page.mouse.up()
    drawn = page.locator(".collection-region-box").bounding_box()
    assert abs(drawn["x"] - (r["x"] + r["width"] * 0.52)) < 3 and abs(drawn["width"] - r["width"] * 0.46) < 3
    assert page.url.endswith(f"/-/gallery/{both}")  # the drag did not follow the picture's link
    screenshot(page, "image-page-region")

    page.keyboard.press("Escape")
    assert page.locator(".collection-region-box").is_hidden() and page.locator(".collection-region-bar a").is_hidden()

    # A finger draws the same rectangle (touch events, as a phone sends them), without scrolling the page.
    touch = page.context.new_cdp_session(page)
    path = [(0.1, 0.1), (0.2, 0.4), (0.3, 0.6), (0.4, 0.8)]
    for i, (fx, fy) in enumerate(path):
        kind = "touchStart" if i == 0 else "touchMove"
        touch.send("Input.dispatchTouchEvent",
                   {"type": kind, "touchPoints": [{"x": r["x"] + r["width"] * fx, "y": r["y"] + r["height"] * fy}]})
    touch.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    href = page.locator(".collection-region-bar a").get_attribute("href")
    box = [float(v) for v in href.split("box=")[1].replace("%2C", ",").split(",")]
    assert box == pytest.approx([0.1, 0.1, 0.4, 0.8], abs=0.01), href
    assert page.evaluate("window.scrollY") == 0
    page.keyboard.press("Escape")
    page.mouse.move(r["x"] + r["width"] * 0.02, r["y"] + r["height"] * 0.03)  # now the cat's half
    page.mouse.down()
    page.mouse.move(r["x"] + r["width"] * 0.48, r["y"] + r["height"] * 0.97, steps=6)
    page.mouse.up()
    page.locator(".collection-region-bar a", has_text="Search this region").click()
    page.wait_for_url(f"{base}/-/search?image_id={both}&box=*")
    page.wait_for_selector(".collection-search-results figure")
    names = result_names(page)
    assert ranked_first(names, "chelsea", "coffee"), names
    assert "cat-and-cup.jpg" not in names
    assert page.locator(".collection-region-shown span").count() == 1  # the region drawn on the thumbnail
    screenshot(page, "search-page-region-results")


def test_without_javascript_the_form_posts_and_the_server_renders(started, tmp_path):
    base, ids, _ = started
    upload = tmp_path / "cup.png"
    Image.fromarray(sample_photos()["coffee"]).resize((200, 133)).save(upload)
    with browser_page(java_script_enabled=False) as page:
        page.goto(f"{base}/-/search")
        page.set_input_files("input[type=file]", str(upload))
        page.locator("input[type=submit]").click()  # a plain form post, its CSRF token included
        page.wait_for_selector(".collection-search-results figure")
        assert result_names(page)[0].startswith("coffee"), result_names(page)
        assert "cup.png" in page.locator(".collection-query").inner_text()
