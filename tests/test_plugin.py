"""The Datasette plugin, through datasette.client: thumbnails, full-size images, similar
pages, facets, canned queries, SQL functions, escaping and file safety."""

from __future__ import annotations

import json
import re
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import urllib.request
from collections import Counter
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import pytest_asyncio
from datasette.app import Datasette

from collection import images
from collection.index import build
from collection.serve import PLUGINS_DIR, find_metadata, load_metadata, plugin_modules, register_plugins
from collection.store import Store

from conftest import make_image, wait_until

ROOT = Path(__file__).resolve().parent.parent
HOSTILE = "<img src=x onerror=alert(1)>.jpg"
HOSTILE_LABEL = "<script>alert(2)</script>"
DIMENSIONS = 8

# name, labels (best first), camera, taken_at
IMAGES = [
    ("cat1.jpg", ["tabby", "tiger cat", "Egyptian cat"], "Canon EOS 5D", "2021-05-01T10:00:00"),
    ("cat2.jpg", ["tabby", "Egyptian cat", "lynx"], "Canon EOS 5D", "2021-07-09T08:30:00"),
    ("dog.png", ["golden retriever", "tabby", "Labrador retriever"], None, "2019-01-02T12:00:00"),
    ("car.jpg", ["sports car", "convertible", "racer"], "Pixel 7", None),
    (HOSTILE, [HOSTILE_LABEL, "tabby", "lynx"], "Pixel 7", "2021-12-31T23:59:59"),
    ("bird.jpg", ["goldfinch", "brambling", "house finch"], None, None),
    ("gone.jpg", ["tabby", "tiger cat", "lynx"], None, None),  # deleted after adding
]


# ImageNet class indices of the labels above, for each image's full distribution (its categories).
CLASS_INDEX = {
    "tabby": 281, "tiger cat": 282, "Egyptian cat": 285, "lynx": 287, "golden retriever": 207,
    "Labrador retriever": 208, "sports car": 817, "convertible": 511, "racer": 751,
    "goldfinch": 11, "brambling": 10, "house finch": 12,
}
DOG, FELINE, CAR = "n02084071", "n02120997", "n02958343"


def distribution(labels: list[str]) -> np.ndarray:
    """0.5, 0.25, 0.15 on the labels (best first); the rest on class 0 (tench)."""
    probs = np.zeros(1000, np.float32)
    for label, p in zip(labels, (0.5, 0.25, 0.15)):
        if label in CLASS_INDEX:
            probs[CLASS_INDEX[label]] = p
    probs[0] = 1.0 - probs.sum()
    return probs


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype("<f4")


def known_vectors() -> list[np.ndarray]:
    """Seeded vectors; the deleted one is the closest of all to the first image."""
    rng = np.random.default_rng(7)
    vectors = [unit(rng.normal(size=DIMENSIONS)) for _ in IMAGES]
    vectors[-1] = unit(vectors[0] + 0.01 * rng.normal(size=DIMENSIONS))
    return vectors


def build_collection(folder: Path, db_path: Path) -> dict[str, int]:
    """A tiny collection with known vectors, real files and thumbnails; returns name -> id."""
    store = Store(db_path)
    store.claim_model("test-model", DIMENSIONS, "fp32")
    ids = {}
    with store.db.atomic():
        for seed, ((name, labels, camera, taken_at), vector) in enumerate(
            zip(IMAGES, known_vectors())
        ):
            path = make_image(folder / name, seed=seed, fmt="PNG" if name.endswith(".png") else "JPEG")
            ids[name] = add_row(store, path, vector, labels, camera=camera, taken_at=taken_at)
    store.mark_deleted([ids["gone.jpg"]])
    store.close()
    return ids


def add_row(store: Store, path: Path, vector, labels, **metadata) -> int:
    decoded = images.decode(path)
    stat = os.stat(path)
    return store.save_image(
        str(path),
        stat.st_mtime,
        {**decoded.metadata(), "size": stat.st_size, **metadata},
        vector,
        [(f"n{i:08d}", label, round(0.6 / (i + 1), 3)) for i, label in enumerate(labels)],
        "test-model",
        (images.thumbnail(decoded.image), decoded.width, decoded.height),
        probabilities=distribution(labels),
    )


def make_datasette(db_path: Path, **metadata_changes) -> Datasette:
    metadata = load_metadata(ROOT / "metadata.yml", db_path.stem)
    metadata.update(metadata_changes)
    register_plugins()  # what the entry points do for an installed project
    return Datasette([str(db_path)], metadata=metadata)


@pytest.fixture
def collection(tmp_path):
    folder = tmp_path / "photos"
    db_path = tmp_path / "collection.db"
    ids = build_collection(folder, db_path)
    return db_path, folder, ids


@pytest_asyncio.fixture
async def ds(collection):
    datasette = make_datasette(collection[0])
    await datasette.invoke_startup()
    return datasette


def expected_neighbours(ids: dict[str, int], query: str) -> list[tuple[int, float]]:
    """Brute-force cosine order over the live images, the query itself left out."""
    vectors = dict(zip((name for name, *_ in IMAGES), known_vectors()))
    live = [name for name in ids if name not in (query, "gone.jpg")]
    scores = [(ids[name], float(vectors[query] @ vectors[name])) for name in live]
    return sorted(scores, key=lambda pair: -pair[1])


async def raw_get(ds: Datasette, raw_path: bytes) -> tuple[int, bytes]:
    """A GET with the path exactly as given: no client normalises away ``..`` or ``%2F``."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": unquote(raw_path.decode("ascii")),
        "raw_path": raw_path,
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"localhost")],
        "client": ("127.0.0.1", 9999),
        "server": ("localhost", 80),
    }
    await ds.app()(scope, receive, send)
    status, body = sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])
    if status == 302:  # Datasette redirects %2F to its ~2F encoding: follow it
        location = {k.lower(): v for k, v in sent[0]["headers"]}[b"location"]
        assert location.startswith(raw_path[: raw_path.index(b"/", 3) + 1]), location
        return await raw_get(ds, location)
    return status, body


# --- loading ---------------------------------------------------------------------------


def test_plugin_loads_without_tensorflow(collection):
    code = (
        "import sys; from collection.serve import open_datasette; "
        f"ds = open_datasette({str(collection[0])!r}); "
        "from datasette.plugins import get_plugins; "
        "found = get_plugins(); "
        "hooks = {h for p in found for h in p['hooks']}; "
        "assert {'register_routes', 'render_cell', 'prepare_connection'} <= hooks, found; "
        "assert any(p['templates_path'] and p['templates_path'].endswith('templates') "
        "and p['static_path'] for p in found), found; "
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules; "
        "assert 'collection.models' not in sys.modules; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_every_plugin_module_has_an_entry_point():
    """An installed project loads its plugins only through pyproject's entry points."""
    import tomllib

    entry_points = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["datasette"]
    assert sorted(entry_points.values()) == sorted(plugin_modules())
    assert (PLUGINS_DIR / "templates").is_dir() and (PLUGINS_DIR / "static" / "collection.css").is_file()


def test_metadata_and_plugins_found_from_package():
    assert find_metadata() == ROOT / "metadata.yml"
    assert (PLUGINS_DIR / "collection_plugin.py").is_file()


def test_metadata_applies_to_any_database_name():
    metadata = load_metadata(ROOT / "metadata.yml", "photos")
    assert set(metadata["databases"]) == {"photos"}
    assert metadata["databases"]["photos"]["tables"]["images"]["sort_desc"] == "id"


def test_no_writable_canned_queries():
    queries = load_metadata(ROOT / "metadata.yml", "collection")["databases"]["collection"]["queries"]
    assert queries and not any(q.get("write") for q in queries.values())


# --- similar pages ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_similar_json_returns_neighbours_in_order(ds, collection):
    _, _, ids = collection
    response = await ds.client.get(f"/-/similar/{ids['cat1.jpg']}.json?k=10&min_score=-1")
    assert response.status_code == 200
    data = response.json()
    expected = expected_neighbours(ids, "cat1.jpg")
    assert [row["id"] for row in data["similar"]] == [i for i, _ in expected]
    assert [row["score"] for row in data["similar"]] == pytest.approx([s for _, s in expected], abs=1e-4)
    assert ids["gone.jpg"] not in [row["id"] for row in data["similar"]]  # deleted, though nearest
    assert data["image"]["id"] == ids["cat1.jpg"]
    assert [label["label"] for label in data["labels"]] == IMAGES[0][1]
    assert set(data["index"]) >= {"model", "indexed", "unindexed", "built_at", "n_trees"}


@pytest.mark.asyncio
async def test_similar_k_and_min_score(ds, collection):
    _, _, ids = collection
    expected = expected_neighbours(ids, "cat2.jpg")
    response = await ds.client.get(f"/-/similar/{ids['cat2.jpg']}.json?k=2&min_score=-1")
    assert [row["id"] for row in response.json()["similar"]] == [i for i, _ in expected[:2]]
    threshold = (expected[1][1] + expected[2][1]) / 2  # between the 2nd and 3rd scores
    response = await ds.client.get(f"/-/similar/{ids['cat2.jpg']}.json?min_score={threshold}")
    assert [row["id"] for row in response.json()["similar"]] == [i for i, _ in expected[:2]]


@pytest.mark.asyncio
async def test_similar_page_html(ds, collection):
    _, _, ids = collection
    response = await ds.client.get(f"/-/similar/{ids['cat1.jpg']}?min_score=-1")
    assert response.status_code == 200
    html = response.text
    expected = expected_neighbours(ids, "cat1.jpg")
    positions = [html.index(f'href="/-/similar/{i}"') for i, _ in expected]
    assert positions == sorted(positions)  # the grid is best first
    for image_id, score in expected:
        assert f'src="/-/thumbnail/{image_id}.jpg"' in html
        assert f"{score:.3f}" in html
    assert "tiger cat" in html and "0.300" in html  # its labels with scores
    assert "searched exactly" in html
    assert f'href="/-/similar/{ids["cat1.jpg"]}.json?k=10&amp;min_score=-1.0"' in html


@pytest.mark.asyncio
async def test_similar_page_says_how_current_the_index_is(ds, collection):
    db_path, folder, ids = collection
    url = f"/-/similar/{ids['cat1.jpg']}"
    html = (await ds.client.get(url)).text
    assert "No index built yet for model test-model: all 6 images are searched exactly." in html

    build(db_path)
    data = (await ds.client.get(f"{url}.json?min_score=-1")).json()
    assert data["index"]["indexed"] == 6 and data["index"]["unindexed"] == 0
    assert data["index"]["model"] == "test-model" and data["index"]["n_trees"] > 0
    assert [row["id"] for row in data["similar"]] == [i for i, _ in expected_neighbours(ids, "cat1.jpg")]
    html = (await ds.client.get(url)).text
    assert f"Index of 6 images, built {data['index']['built_at']}" in html
    assert "Every image is in the index." in html

    store = Store(db_path)  # as the watcher would: a new image, not yet in the Annoy file
    twin = unit(known_vectors()[0] + 0.001)
    new_id = add_row(store, make_image(folder / "new.jpg", seed=50), twin, ["tabby"])
    store.close()
    data = (await ds.client.get(f"{url}.json")).json()
    assert data["similar"][0]["id"] == new_id and data["index"]["unindexed"] == 1
    assert "1 image was added or changed since: searched exactly." in (await ds.client.get(url)).text


@pytest.mark.asyncio
@pytest.mark.parametrize("suffix", ["", ".json"])
async def test_unknown_image_is_404_not_500(ds, suffix):
    response = await ds.client.get(f"/-/similar/999999{suffix}")
    assert response.status_code == 404
    if suffix:
        assert response.json()["ok"] is False
    else:
        assert response.headers["content-type"].startswith("text/html")
        assert "No image 999999" in response.text


@pytest.mark.asyncio
@pytest.mark.parametrize("path", ["/a/b/c/d/e", "/-/nothing-here", "/no-such-database"])
async def test_any_unknown_url_is_a_404_page(ds, path):
    # rich (installed by keras) used to turn Datasette 0.65's own 404s into 500s
    await ds.invoke_startup()
    response = await ds.client.get(path)
    assert response.status_code == 404
    assert "Traceback" not in response.text


@pytest.mark.asyncio
async def test_deleted_image_similar_link_leads_to_its_page(ds, collection):
    gone = collection[2]["gone.jpg"]
    response = await ds.client.get(f"/-/similar/{gone}")
    assert response.status_code == 302  # an old link still leads somewhere that explains
    assert response.headers["location"] == f"/-/gallery/{gone}"
    page = await ds.client.get(f"/-/gallery/{gone}")
    assert page.status_code == 200
    assert "File deleted" in page.text and "Similar images" not in page.text
    response = await ds.client.get(f"/-/similar/{gone}.json")
    assert response.status_code == 404
    assert "deleted" in response.json()["error"] and response.json()["image_url"] == f"/-/gallery/{gone}"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "query, message",
    [
        ("k=abc", "k must be a whole number"),
        ("k=0", "k must be a whole number"),
        ("k=1000", "k must be a whole number"),
        ("k=2.5", "k must be a whole number"),
        ("min_score=high", "min_score must be a number"),
        ("min_score=2", "min_score must be a number"),
        ("min_score=nan", "min_score must be a number"),
    ],
)
async def test_bad_parameters_are_400(ds, collection, query, message):
    image_id = collection[2]["cat1.jpg"]
    page = await ds.client.get(f"/-/similar/{image_id}?{query}")
    assert page.status_code == 400
    assert message in page.text
    data = await ds.client.get(f"/-/similar/{image_id}.json?{query}")
    assert data.status_code == 400
    assert message in data.json()["error"]


# --- thumbnails and cells --------------------------------------------------------------


@pytest.mark.asyncio
async def test_thumbnail_route(ds, collection):
    _, _, ids = collection
    response = await ds.client.get(f"/-/thumbnail/{ids['dog.png']}.jpg")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert response.content[:3] == b"\xff\xd8\xff"
    assert (await ds.client.get("/-/thumbnail/999999.jpg")).status_code == 404
    assert (await ds.client.get(f"/-/thumbnail/{ids['gone.jpg']}.jpg")).status_code == 404


@pytest.mark.asyncio
async def test_images_table_has_thumbnails_and_similar_links(ds, collection):
    _, _, ids = collection
    html = (await ds.client.get("/collection/images")).text
    for name, image_id in ids.items():
        if name == "gone.jpg":  # its file is gone: said so, and no link that leads nowhere
            assert f'src="/-/thumbnail/{image_id}.jpg"' not in html
            assert f'href="/-/similar/{image_id}"' not in html
            continue
        assert f'<img class="collection-thumb" src="/-/thumbnail/{image_id}.jpg"' in html
        assert f'<a class="collection-similar" href="/-/similar/{image_id}">' in html
        assert f'href="/-/gallery/{image_id}"' in html  # the thumbnail and the id lead to its page
    assert html.count("file deleted") == 1
    row = (await ds.client.get(f"/collection/images/{ids['cat1.jpg']}")).text
    assert f'src="/-/thumbnail/{ids["cat1.jpg"]}.jpg"' in row
    assert f'href="/-/similar/{ids["cat1.jpg"]}"' in row


@pytest.mark.asyncio
@pytest.mark.parametrize("table", ["labels", "thumbnails", "matches"])
async def test_image_ids_elsewhere_show_thumbnails(ds, collection, table):
    db_path, _, ids = collection
    image_id, match_id = ids["car.jpg"], ids["bird.jpg"]
    conn = sqlite3.connect(db_path)
    with conn:
        conn.execute("insert into matches values (?, ?, 1, 0.5)", [image_id, match_id])
    conn.close()
    html = (await ds.client.get(f"/collection/{table}?image_id={image_id}")).text
    assert f'src="/-/thumbnail/{image_id}.jpg"' in html
    if table != "thumbnails":
        assert f'href="/-/similar/{image_id}"' in html
    if table == "matches":
        assert f'src="/-/thumbnail/{match_id}.jpg"' in html
        assert f'href="/-/similar/{match_id}"' in html
    row = (await ds.client.get(f"/collection/thumbnails/{image_id}")).text
    assert f'src="/-/thumbnail/{image_id}.jpg"' in row


@pytest.mark.asyncio
async def test_query_results_show_thumbnails_for_image_ids(ds, collection):
    image_id = collection[2]["car.jpg"]
    html = (await ds.client.get("/collection/recently_added")).text
    assert f'src="/-/thumbnail/{image_id}.jpg"' in html


@pytest.mark.asyncio
async def test_vectors_are_not_rendered_as_blobs(ds):
    html = (await ds.client.get("/collection/vectors")).text
    assert "8-dimension float32 vector" in html
    assert "Binary" not in html


# --- facets, metadata, canned queries, SQL functions ----------------------------------


@pytest.mark.asyncio
async def test_default_facets_count_right(ds):
    data = (await ds.client.get("/collection/images.json?_extra=facet_results&_facet_size=max")).json()
    facets = data["facet_results"]
    if "results" in facets:  # the 1.0 JSON shape
        facets = facets["results"]

    def counts(name):
        return {row["value"]: row["count"] for row in facets[name]["results"]}

    assert counts("labels") == dict(Counter(label for _, labels, *_ in IMAGES for label in labels))
    assert counts("camera") == dict(Counter(camera for *_, camera, _ in IMAGES if camera))
    assert counts("taken_year") == dict(
        Counter(int(taken[:4]) for *_, taken in IMAGES if taken)
    )
    assert counts("format") == {"JPEG": 6, "PNG": 1}


@pytest.mark.asyncio
async def test_images_sorted_newest_first(ds):
    data = (await ds.client.get("/collection/images.json?_shape=array")).json()
    added = [row["added_at"] for row in data]
    assert added == sorted(added, reverse=True)


@pytest.mark.asyncio
async def test_sql_functions(ds, collection):
    _, _, ids = collection
    a, b = ids["cat1.jpg"], ids["dog.png"]
    sql = f"select value ->> 'id' as id from json_each(similar_images({a}, 3))"
    rows = (await ds.client.get("/collection.json", params={"sql": sql, "_shape": "array"})).json()
    assert [row["id"] for row in rows] == [i for i, _ in expected_neighbours(ids, "cat1.jpg")[:3]]
    sql = f"select image_similarity({a}, {b}) as score"
    rows = (await ds.client.get("/collection.json", params={"sql": sql, "_shape": "array"})).json()
    vectors = known_vectors()
    assert rows[0]["score"] == pytest.approx(float(vectors[0] @ vectors[2]), abs=1e-4)


@pytest.mark.asyncio
async def test_canned_queries_run(ds, collection):
    db_path, _, ids = collection
    conn = sqlite3.connect(db_path)
    with conn:  # the two images' neighbour lists, as collection.index writes them
        for name in ("cat1.jpg", "cat2.jpg"):
            conn.executemany(
                "insert into matches (image_id, match_id, rank, score) values (?, ?, ?, ?)",
                [(ids[name], match_id, rank, score)
                 for rank, (match_id, score) in enumerate(expected_neighbours(ids, name), 1)],
            )
    conn.close()
    cat1 = ids["cat1.jpg"]
    best_id, best_score = expected_neighbours(ids, "cat1.jpg")[0]

    async def rows(query, **params):
        response = await ds.client.get(f"/collection/{query}.json", params={**params, "_shape": "array"})
        assert response.status_code == 200, response.text
        return response.json()

    near = await rows("near_duplicates", min_score=str(best_score - 0.001))
    assert [(r["image_id"], r["match_id"]) for r in near] == [(cat1, best_id)]
    assert len(await rows("near_duplicates", min_score="-1")) == 2 * (len(ids) - 2) - 1
    tabby = await rows("images_with_label", label="tabby")
    assert {r["image_id"] for r in tabby} == {ids[n] for n, labels, *_ in IMAGES[:-1] if "tabby" in labels}
    neighbour_labels = await rows("neighbour_labels", image_id=str(cat1))
    assert sum(r["neighbours"] for r in neighbour_labels) == 3 * (len(ids) - 2)
    recent = await rows("recently_added")
    assert len(recent) == len(ids) - 1
    assert await rows("recent_failures") == []


@pytest.mark.asyncio
async def test_hostile_names_and_labels_are_escaped(ds, collection):
    _, _, ids = collection
    hostile = ids[HOSTILE]
    pages = [
        "/collection/images",
        f"/collection/images/{hostile}",
        "/collection/labels",
        f"/-/similar/{hostile}?min_score=-1",
        f"/-/similar/{ids['cat1.jpg']}?min_score=-1",
    ]
    for page in pages:
        html = (await ds.client.get(page)).text
        assert "<img src=x onerror" not in html, page
        assert "<script>alert(2)" not in html, page
    table = (await ds.client.get("/collection/images")).text
    assert "&lt;img src=x onerror=alert(1)&gt;.jpg" in table
    similar = (await ds.client.get(f"/-/similar/{hostile}")).text
    assert "&lt;img src=x onerror=alert(1)&gt;.jpg" in similar
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in similar


# --- full-size images and the filesystem -----------------------------------------------


@pytest.mark.asyncio
async def test_full_size_image_is_the_rows_file(ds, collection):
    _, folder, ids = collection
    response = await ds.client.get(f"/-/image/{ids['dog.png']}")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.content == (folder / "dog.png").read_bytes()


@pytest.mark.asyncio
async def test_full_size_refused_for_deleted_row_or_missing_file(ds, collection):
    _, folder, ids = collection
    assert (await ds.client.get(f"/-/image/{ids['gone.jpg']}")).status_code == 404
    (folder / "bird.jpg").unlink()
    response = await ds.client.get(f"/-/image/{ids['bird.jpg']}")
    assert response.status_code == 404
    assert "no longer there" in response.text
    assert (await ds.client.get("/-/image/999999")).status_code == 404


@pytest.mark.asyncio
async def test_full_size_refused_when_file_changed_since_added(ds, collection):
    _, folder, ids = collection
    (folder / "car.jpg").write_bytes(b"not the file that was added")
    response = await ds.client.get(f"/-/image/{ids['car.jpg']}")
    assert response.status_code == 404
    assert "changed since it was added" in response.text


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "raw_path",
    [
        b"/-/image/../../../../etc/passwd",
        b"/-/image/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        b"/-/image/%2Fetc%2Fpasswd",
        b"/-/image//etc/passwd",
        b"/-/image/1/../../../../etc/passwd",
        b"/-/image/1%2F..%2F..%2Fetc%2Fpasswd",
        b"/-/thumbnail/..%2F..%2Fetc%2Fpasswd.jpg",
        b"/-/thumbnail/%2Fetc%2Fpasswd.jpg",
        b"/-/similar/..%2F1",
        b"/-/image/photos%2Fcat1.jpg",
        b"/-/image/-1",
        b"/-/similar/abc",
        b"/-/thumbnail/1.png",
        b"/-/image/99999999999999999999999",
    ],
)
async def test_request_paths_never_reach_the_filesystem(ds, raw_path):
    status, body = await raw_get(ds, raw_path)
    assert status == 404
    assert b"root:" not in body


@pytest.mark.asyncio
async def test_symlinked_row_serves_only_its_own_file(tmp_path):
    """A row whose path is a symlink to a photo in its own folder (or below) serves the file
    it pointed to when added, checked by its real path and sha256. Re-pointed at anything
    else (a secret, a device, a photo outside the folder, a FIFO) it is refused (issue #12):
    the request never names a file, and the row's recorded file is the only one that can
    come back."""
    folder, outside = tmp_path / "photos", tmp_path / "outside"
    photo = make_image(folder / "sub" / "photo.jpg", seed=3, size=(80, 60))
    make_image(outside / "photo.jpg", seed=3, size=(80, 60))
    secret = outside / "secret.txt"
    secret.write_text("root:x:0:0:secret\n")
    link = folder / "link.jpg"
    link.symlink_to(photo)
    db_path = tmp_path / "collection.db"
    store = Store(db_path)
    store.claim_model("test-model", DIMENSIONS, "fp32")
    image_id = add_row(store, link, known_vectors()[0], ["tabby"])
    store.close()
    ds = make_datasette(db_path)

    response = await ds.client.get(f"/-/image/{image_id}")
    assert response.status_code == 200
    assert response.content == photo.read_bytes()

    for target in (secret, outside / "photo.jpg", Path("/dev/zero"), Path("/etc/passwd")):
        link.unlink()
        link.symlink_to(target)
        response = await ds.client.get(f"/-/image/{image_id}")
        assert response.status_code == 404, target
        assert b"root:" not in response.content

    link.unlink()
    os.mkfifo(link)  # opening a FIFO for reading would block without O_NONBLOCK
    response = await ds.client.get(f"/-/image/{image_id}")
    assert response.status_code == 404
    assert "not a regular file" in response.text


# --- safety and concurrency -------------------------------------------------------------


@pytest.mark.asyncio
async def test_routes_obey_datasette_permissions(collection):
    db_path, _, ids = collection
    ds = make_datasette(db_path, allow={"id": "root"})
    await ds.invoke_startup()
    image_id = ids["cat1.jpg"]
    for path in (f"/-/thumbnail/{image_id}.jpg", f"/-/image/{image_id}", f"/-/similar/{image_id}"):
        assert (await ds.client.get(path)).status_code == 403, path
    cookies = {"ds_actor": ds.sign({"a": {"id": "root"}}, "actor")}
    assert (await ds.client.get(f"/-/similar/{image_id}", cookies=cookies)).status_code == 200


@pytest.mark.asyncio
async def test_sql_cannot_write(ds):
    response = await ds.client.get(
        "/collection.json", params={"sql": "delete from images", "_shape": "array"}
    )
    assert response.status_code == 400
    assert (await ds.client.get("/collection/images.json?_shape=array")).json()


@pytest.mark.asyncio
async def test_reads_while_a_writer_holds_the_database(ds, collection):
    """WAL mode: a writer mid-transaction (the watcher) never shows a reader 'database is locked'."""
    db_path, folder, ids = collection
    writer = sqlite3.connect(db_path, check_same_thread=False)
    writer.execute("begin immediate")
    writer.execute("update images set updated_at = 'now' where id = ?", [ids["cat1.jpg"]])
    stop = threading.Event()

    def churn():
        conn = sqlite3.connect(db_path, timeout=30)
        while not stop.is_set():
            with conn:
                conn.execute("update collection_meta set value = value where key = 'model'")
        conn.close()

    try:
        image_id = ids["cat2.jpg"]
        for path in (
            "/collection/images",
            f"/-/similar/{image_id}",
            f"/-/similar/{image_id}.json",
            f"/-/thumbnail/{image_id}.jpg",
            f"/-/image/{image_id}",
        ):
            response = await ds.client.get(path)
            assert response.status_code == 200, (path, response.text)
    finally:
        writer.commit()
        writer.close()
    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(20):
            response = await ds.client.get(f"/-/similar/{ids['cat2.jpg']}.json")
            assert response.status_code == 200, response.text
    finally:
        stop.set()
        thread.join()


def test_serve_command_starts_datasette_on_localhost(tmp_path):
    """`collection serve` finds the plugin and metadata.yml itself, applies the metadata to
    a database of any name, and binds 127.0.0.1 unless told otherwise."""
    db_path = tmp_path / "photos.db"
    ids = build_collection(tmp_path / "photos", db_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "collection", "serve", "--db", str(db_path), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,  # not the project: the files are found from the package
        )
    base = f"http://127.0.0.1:{port}"

    def get(path):
        try:
            with urllib.request.urlopen(base + path, timeout=5) as response:
                return json.load(response)
        except OSError:
            return None

    try:
        wait_until(lambda: process.poll() is not None or get("/-/versions.json"), timeout=60)
        assert process.poll() is None, log.read_text()
        similar = get(f"/-/similar/{ids['cat1.jpg']}.json")
        assert similar["similar"][0]["id"] == expected_neighbours(ids, "cat1.jpg")[0][0]
        table = get("/photos/images.json?_extra=facet_results")
        assert "labels" in str(table["facet_results"])  # metadata.yml's facets, re-keyed
        assert f"Uvicorn running on http://127.0.0.1:{port}" in log.read_text()
    finally:
        process.terminate()
        process.wait(timeout=10)


# --- home page, gallery, image pages, status -------------------------------------------


@pytest.mark.asyncio
async def test_home_page_leads_with_the_collections_pages_then_its_tables(ds):
    html = (await ds.client.get("/")).text.split('<ul class="collection-home">')[1]  # after the menu
    links = [html.index(f'href="{path}"') for path in ("/-/gallery", "/-/map", "/-/status")]
    assert links == sorted(links)
    tables = html.index('href="/collection/live_images"')
    assert links[-1] < tables < html.index('href="/collection/images"')
    assert "_sqlite_migrations" not in html and "..." not in html
    database = (await ds.client.get("/collection")).text
    assert "_sqlite_migrations" not in database.split("hidden tables")[0]


@pytest.mark.asyncio
async def test_gallery_shows_live_images_newest_first_and_pages(ds, collection):
    _, _, ids = collection
    html = (await ds.client.get("/-/gallery")).text
    shown = [int(n) for n in re.findall(r'href="/-/gallery/(\d+)" title=', html)]
    live = sorted((i for name, i in ids.items() if name != "gone.jpg"), reverse=True)
    assert shown == live
    assert 'class="collection-chip" href="/-/gallery?label=tabby"' in html
    html = (await ds.client.get("/-/gallery?before=" + str(live[1]))).text
    assert [int(n) for n in re.findall(r'href="/-/gallery/(\d+)" title=', html)] == live[2:]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "query, expected",
    [
        ("label=tabby", ["cat1.jpg", "cat2.jpg", "dog.png", HOSTILE]),  # gone.jpg is a tabby too
        ("label=lynx", ["cat2.jpg", HOSTILE]),
        ("format=PNG", ["dog.png"]),
        ("camera=Pixel+7", ["car.jpg", HOSTILE]),
        ("year=2021", ["cat1.jpg", "cat2.jpg", HOSTILE]),
        ("label=tabby&year=2021&camera=Canon+EOS+5D", ["cat1.jpg", "cat2.jpg"]),
        ("place=1", []),
        ("label=nothing-has-this", []),
    ],
)
async def test_gallery_filters(ds, collection, query, expected):
    _, _, ids = collection
    html = (await ds.client.get(f"/-/gallery?{query}")).text
    shown = [int(n) for n in re.findall(r'href="/-/gallery/(\d+)" title=', html)]
    assert shown == sorted((ids[name] for name in expected), reverse=True)
    if not expected:
        assert "No images match these filters" in html


@pytest.mark.asyncio
async def test_gallery_label_filter_pages_by_keyset(ds, collection):
    from collection import gallery

    _, _, ids = collection
    db = ds.get_database("collection")
    tabbies = sorted((ids[n] for n in ("cat1.jpg", "cat2.jpg", "dog.png", HOSTILE)), reverse=True)
    filters = gallery.Filters(label="tabby")
    first = await db.execute_fn(lambda conn: gallery.page(conn, filters, None, size=3))
    assert [r["id"] for r in first["images"]] == tabbies[:3] and first["before"] == tabbies[2]
    rest = await db.execute_fn(lambda conn: gallery.page(conn, filters, first["before"], size=3))
    assert [r["id"] for r in rest["images"]] == tabbies[3:] and rest["before"] is None


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "category, expected",
    [  # every breed under dog; a word WordNet knows for a category finds it; rolled-up scores
        ("dog", ["dog.png"]),
        (DOG, ["dog.png"]),
        ("canine", ["dog.png"]),
        ("domestic dog", ["dog.png"]),
        ("automobile", ["car.jpg"]),
        ("feline", ["cat1.jpg", "cat2.jpg", "dog.png", HOSTILE]),  # dog.png is 0.25 tabby; gone.jpg is deleted
        ("no-such-word-anywhere", []),
    ],
)
async def test_gallery_category_filter(ds, collection, category, expected):
    db_path, _, ids = collection
    html = (await ds.client.get("/-/gallery", params={"category": category})).text
    shown = [int(n) for n in re.findall(r'href="/-/gallery/(\d+)" title=', html)]
    assert sorted(shown) == sorted(ids[name] for name in expected)
    conn = sqlite3.connect(db_path)
    scores = [conn.execute("select score from image_categories where image_id = ? and wnid = ?",
                           [i, FELINE if category == "feline" else (CAR if category == "automobile" else DOG)]
                           ).fetchone()[0] for i in shown]
    assert scores == sorted(scores, reverse=True)  # best first
    if expected:
        assert 'name="category" value="' + category + '"' in html
        assert "category: " in html.split('class="collection-active"')[1]
    else:
        assert "No images match these filters" in html and "WordNet has no category" in html


@pytest.mark.asyncio
async def test_map_highlights_a_category_through_the_urls_it_is_given(ds, collection):
    """What the map's highlight box does with a category word: search it, then list its ids."""
    from collection import projection

    db_path, _, ids = collection
    store = Store(db_path)
    projection.project(store, method="pca")
    store.close()
    html = (await ds.client.get("/-/map")).text
    config = json.loads(html.split('<script type="application/json" id="map-config">')[1].split("</script>")[0])
    found = (await ds.client.get(config["category_search"], params={"q": "feline", "limit": 1})).json()
    best = found["results"][0]
    assert best["wnid"] == FELINE and best["matched"] == "feline"
    listed = (await ds.client.get(config["category_ids"] + best["wnid"] + "/ids.json")).json()["ids"]
    assert sorted(listed) == sorted(ids[n] for n in ("cat1.jpg", "cat2.jpg", "dog.png", HOSTILE))


@pytest.mark.asyncio
async def test_gallery_category_pages_by_keyset(ds, collection):
    from collection import gallery

    _, _, ids = collection
    db = ds.get_database("collection")
    filters = gallery.Filters(category="feline")
    whole = await db.execute_fn(lambda conn: gallery.page(conn, filters, None))
    assert len(whole["images"]) == 4 and whole["before"] is None
    seen, before, below = [], None, None
    while True:  # one image a page, each page below the last's (score, id)
        one = await db.execute_fn(lambda conn: gallery.page(conn, filters, before, size=1, below=below))
        seen += [r["id"] for r in one["images"]]
        if one["before"] is None:
            break
        before, below = one["before"], one["below"]
    assert seen == [r["id"] for r in whole["images"]]
    html = (await ds.client.get("/-/gallery?category=feline&year=2021")).text
    assert [int(n) for n in re.findall(r'href="/-/gallery/(\d+)" title=', html)] == [
        r["id"] for r in whole["images"] if r["id"] != ids["dog.png"]]  # other filters still apply
    first = await db.execute_fn(lambda conn: gallery.page(conn, filters, None, size=2))
    html = (await ds.client.get("/-/gallery", params={"category": "feline", "before": first["before"],
                                                       "below": repr(first["below"])})).text
    assert [int(n) for n in re.findall(r'href="/-/gallery/(\d+)" title=', html)] == [
        r["id"] for r in whole["images"][2:]]


@pytest.mark.asyncio
@pytest.mark.parametrize("query", ["below=abc", "below=nan", "below=-1", "below=inf", "category=" + "x" * 300, "year=20x1", "year=99999", "before=abc", "before=-1", "label=" + "x" * 300])
async def test_gallery_refuses_bad_parameters(ds, query):
    response = await ds.client.get(f"/-/gallery?{query}")
    assert response.status_code == 400


@pytest.mark.asyncio
async def test_gallery_pages_are_read_from_indexes(collection):
    """Each gallery query walks an index in order: no full scan, no sort of all rows."""
    from collection import gallery

    conn = sqlite3.connect(collection[0])
    for filters in (
        gallery.Filters(), gallery.Filters(format="JPEG"), gallery.Filters(label="tabby"),
        gallery.Filters(category="dog"), gallery.Filters(category="feline", year=2021),
    ):
        captured = []
        conn.set_trace_callback(captured.append)
        gallery.page(conn, filters, before=5, below=0.5)
        conn.set_trace_callback(None)
        sql = captured[-1]
        plan = " | ".join(row[3] for row in conn.execute("explain query plan " + sql))
        assert "USE TEMP B-TREE FOR ORDER BY" not in plan, plan
        assert "SCAN i" not in plan or "INTEGER PRIMARY KEY" in plan or "rowid" in plan.lower(), plan
        if filters.category:  # a seek into the (wnid, score) index, from the keyset on
            assert "SEARCH ic USING COVERING INDEX image_categories_wnid_score (wnid=? AND" in plan, plan
            assert "SCAN" not in plan, plan
    captured = []
    conn.set_trace_callback(captured.append)
    gallery.names(conn, [1, 2, 3])  # the similar strip's rows: looked up by id, not scanned
    conn.set_trace_callback(None)
    plan = " | ".join(row[3] for row in conn.execute("explain query plan " + captured[-1]))
    assert "rowid=?" in plan or "INTEGER PRIMARY KEY" in plan, plan


@pytest.mark.asyncio
async def test_image_page_shows_preview_labels_exif_and_similar_strip(ds, collection):
    _, _, ids = collection
    image_id = ids["cat1.jpg"]
    html = (await ds.client.get(f"/-/gallery/{image_id}")).text
    assert f'<img src="/-/image/{image_id}"' in html  # the full image as the preview
    assert "cat1.jpg" in html and "Canon EOS 5D" in html and "2021-05-01T10:00:00" in html
    assert 'href="/-/gallery?label=tiger+cat"' in html and "0.600" in html
    categories = html.split('class="collection-labels collection-categories"')[1].split("</table>")[0]
    names = re.findall(r'href="/-/gallery\?category=(n\d{8})"', categories)
    assert "n02121808" in names and FELINE in names  # domestic cat, feline: most specific first
    assert names.index("n02121808") < names.index(FELINE) and "n00001740" not in names  # not entity
    assert "0.900" in categories or "0.899" in categories or "0.901" in categories  # tabby+tiger+Egyptian
    strip = html.split('class="collection-strip"')[1]
    neighbours = [int(n) for n in re.findall(r'href="/-/gallery/(\d+)"', strip)]
    assert neighbours == [i for i, score in expected_neighbours(ids, "cat1.jpg") if score >= 0]
    assert ids["gone.jpg"] not in neighbours
    assert f'href="/collection/images/{image_id}"' in html  # the raw row
    assert (await ds.client.get("/-/gallery/999999")).status_code == 404


@pytest.mark.asyncio
async def test_hostile_name_is_escaped_on_gallery_and_image_page(ds, collection):
    for url in ("/-/gallery", f"/-/gallery/{collection[2][HOSTILE]}"):
        html = (await ds.client.get(url)).text
        assert HOSTILE not in html and HOSTILE_LABEL not in html
        assert "&lt;img src=x onerror=alert(1)&gt;.jpg" in html


@pytest.mark.asyncio
async def test_images_table_cells_are_readable(ds, collection):
    db_path, _, ids = collection
    html = (await ds.client.get("/collection/images")).text
    sha = sqlite3.connect(db_path).execute("select sha256 from images where id = ?", [ids["cat1.jpg"]]).fetchone()[0]
    assert f'<code title="{sha}">{sha[:12]}…</code>' in html
    assert " UTC</span>" in html  # mtime as a date, the Unix time in its title
    assert 'class="collection-chip" href="/-/gallery?label=tiger+cat"' in html  # labels by the thumbnail
    assert "column-descriptions" in html and "collection.js" in html  # folded by the script


@pytest.mark.asyncio
async def test_status_without_a_watcher_says_how_to_start_one(ds, collection):
    state = (await ds.client.get("/-/status.json")).json()
    assert state["watcher"] is None
    assert state["collection"]["images"] == 6 and state["collection"]["deleted"] == 1
    html = (await ds.client.get("/-/status")).text
    assert "No watcher has run on collection.db yet" in html
    assert " watch FOLDER --db collection.db" in html


@pytest.mark.asyncio
async def test_status_reads_what_the_recorder_wrote(ds, collection):
    from collection import live
    from collection.watcher import Stats

    db_path = collection[0]
    clock = [1000.0]
    recorder = live.Recorder(db_path, clock=lambda: clock[0])
    recorder.report(Stats(state="watching"), force=True)
    clock[0] = 1030.0  # idle half a minute, then a burst of 100 files arrives...
    recorder.report(Stats(state="watching", queued=100), force=True)
    for second in range(10):  # ...and goes in at ten a second
        clock[0] = 1030.0 + second + 1
        done = 10 * (second + 1)
        recorder.report(Stats(state="watching", seen=done, stored=done, queued=100 - done), force=True)
        assert live.read(db_path, now=clock[0])["rate"] == pytest.approx(10.0)  # its real pace
    now = live.read(db_path, now=clock[0])
    assert now["running"] and now["queued"] == 0 and now["session"]["stored"] == 100
    later = live.read(db_path, now=clock[0] + 20)  # idle for 20 s: the rate falls...
    assert later["running"] and later["rate"] == pytest.approx(100 / 30, abs=0.01)
    gone = live.read(db_path, now=clock[0] + 61)  # ...to 0 after a minute; no writes needed
    assert gone["rate"] == 0.0
    quiet = live.read(db_path, now=clock[0] + 100)  # no write for 100 s, but its process lives
    assert quiet["running"] and quiet["rate"] == 0.0
    record = json.loads(live.status_path(db_path).read_text())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live.status_path(db_path).write_text(json.dumps({**record, "pid": int(dead.stdout)}))
    assert not live.read(db_path, now=clock[0] + 100)["running"]  # killed (kill -9): not running
    assert live.read(db_path, now=clock[0] + 10)["running"]  # ...though a recent write still counts
    recorder.report(Stats(state="stopped", seen=100, stored=100), force=True)
    assert live.read(db_path, now=clock[0])["state"] == "not running"
    assert (await ds.client.get("/-/status.json")).json()["watcher"]["session"]["stored"] == 100


# --- the command line around serving ------------------------------------------------------


def test_serve_help_with_dash_h():
    from click.testing import CliRunner

    from collection.cli import cli

    for command in (["serve", "-h"], ["serve", "--help"], ["-h"]):
        result = CliRunner().invoke(cli, command)
        assert result.exit_code == 0, result.output
        assert result.output.startswith("Usage: ")
    assert "--access-log" in CliRunner().invoke(cli, ["serve", "-h"]).output


def test_hints_name_a_collection_command_that_runs(tmp_path, monkeypatch):
    from collection import serve

    monkeypatch.chdir(tmp_path)
    beside = Path(sys.executable).parent / "collection"
    monkeypatch.setattr(serve.shutil, "which", lambda name: None)  # not on PATH: as after `make run`
    command = serve.cli_command()
    if beside.exists():
        assert command == str(beside)
        result = subprocess.run([command, "--version"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and "collection" in result.stdout
    else:
        assert command.endswith(" -m collection")
    monkeypatch.setattr(serve.shutil, "which", lambda name: str(beside))  # the venv is activated
    assert serve.cli_command() == ("collection" if beside.exists() else command)


def test_gallery_menus_are_counted_in_the_background(collection):
    from collection import gallery

    db_path = str(collection[0])
    menus = wait_until(lambda: gallery.options(db_path), timeout=30, message="the menus to be counted")
    assert dict(menus["format"]) == {"JPEG": 5, "PNG": 1}  # live images only: gone.jpg left out
    assert dict(menus["camera"]) == {"Canon EOS 5D": 2, "Pixel 7": 2}
    assert dict(menus["year"]) == {2021: 3, 2019: 1} and menus["place"] == 0
    assert gallery.options(db_path) is menus  # reused until due again, not counted per request
