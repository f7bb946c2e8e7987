"""Shared fixtures: tiny images made on the fly, sample photos from wheels, small models."""

from __future__ import annotations

import contextlib
import os
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from collection.models import Counting, get_model
from collection.store import Store


CHROMIUM = "/usr/bin/chromium"  # Debian's; `make test` installs it
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
# Browser tests skip without Chromium on a developer's machine, but never in CI.
needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM) and not os.environ.get("CI"),
    reason=f"{CHROMIUM} is absent: install Debian's chromium (apt-get install -y chromium)",
)


@contextlib.contextmanager
def browser_page(**context_options):
    """A page in headless Debian Chromium, 1280 x 900 unless ``context_options`` (as
    Playwright's ``new_context`` takes them: has_touch, java_script_enabled ...) say
    otherwise; ``page.dialogs`` collects the message of every alert, confirm or prompt a
    script opens (each dismissed), so a test can assert that no injected script ran."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(**{"viewport": {"width": 1280, "height": 900}, **context_options}).new_page()
            page.dialogs = []
            page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
            yield page
        finally:
            browser.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def responds(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05, message: str = ""):
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message or predicate}")
        time.sleep(interval)


def make_image(path: Path, seed: int = 0, size=(64, 48), fmt: str | None = None, **save) -> Path:
    """A distinct small picture: smooth colour gradients plus seeded noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3)
    slope = rng.uniform(-2, 2, (3, 2))
    channels = [base[c] + slope[c, 0] * x + slope[c, 1] * y for c in range(3)]
    arr = np.stack(channels, axis=-1) + rng.normal(0, 20, (h, w, 3))
    image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt, **save)
    return path


def sample_photos() -> dict[str, np.ndarray]:
    """Real photos that ship inside the scikit-image and scikit-learn wheels."""
    from skimage import data
    from sklearn.datasets import load_sample_image

    return {
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
        "rocket": data.rocket(),
        "astronaut": data.astronaut(),
        "china": load_sample_image("china.jpg"),
        "flower": load_sample_image("flower.jpg"),
    }


@pytest.fixture
def inbox(tmp_path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    return folder


@pytest.fixture
def images_dir(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    return folder


@pytest.fixture
def db_path(tmp_path) -> Path:
    return tmp_path / "collection.db"


@pytest.fixture
def store(db_path):
    s = Store(db_path)
    yield s
    s.close()


@pytest.fixture(scope="session")
def small_model():
    """The real EfficientNet-Lite0 architecture with seeded random weights: fast to build and run."""
    return get_model("efficientnet_lite0:random").load()


@pytest.fixture
def counting_model(small_model):
    return Counting(small_model)
