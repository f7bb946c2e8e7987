"""The label facet and filter (datasette_plugins/facets_plugin.py), label_counts' triggers
(store.m009), and the plans of the queries the images pages run: each on an index."""

from __future__ import annotations

import json
import re
import sqlite3
from collections import Counter
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest
import pytest_asyncio
from datasette.app import Datasette

from collection.serve import SETTINGS, load_metadata, register_plugins
from collection.store import Store

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["tabby", "lynx", "malamute", "crane", "golden retriever", "goldfinch", "racer", "桜 & <b>"]
COUNT = 600


def labels_of(rng: np.random.Generator) -> list[str]:
    """Five labels; now and then "crane" twice, as ImageNet's bird and machine share it."""
    names = list(rng.choice(NAMES, 5, replace=False))
    if rng.random() < 0.1 and "crane" in names:
        names[names.index("crane") - 1 if names.index("crane") else 1] = "crane"
    return names


@pytest.fixture
def collection(tmp_path) -> tuple[Path, dict[int, list[str]], set[int]]:
    """COUNT images with seeded labels, a tenth of them deleted: (db, id -> labels, deleted)."""
    rng = np.random.default_rng(3)
    db_path = tmp_path / "collection.db"
    store = Store(db_path)
    store.claim_model("test-model", 4, "fp32")
    labels = {}
    with store.db.atomic():
        for n in range(COUNT):
            names = labels_of(rng)
            image_id = store.save_image(
                f"/photos/{n}.jpg", n, {"format": "JPEG" if n % 3 else "PNG"}, rng.normal(size=4),
                [(f"n{i}", name, 0.5 / (i + 1)) for i, name in enumerate(names)], "test-model",
            )
            labels[image_id] = names
    deleted = set(rng.choice(list(labels), COUNT // 10, replace=False).tolist())
    store.mark_deleted(deleted)
    store.close()
    return db_path, labels, deleted


@pytest_asyncio.fixture
async def ds(collection):
    db_path = collection[0]
    register_plugins()  # once, as the installed entry points do (no second copy from a plugins_dir)
    datasette = Datasette(
        [str(db_path)],
        metadata=load_metadata(ROOT / "metadata.yml", db_path.stem),
        settings={**SETTINGS, "trace_debug": True},
    )
    await datasette.invoke_startup()
    return datasette


def image_counts(labels: dict[int, list[str]], ids) -> dict[str, int]:
    return dict(Counter(name for image_id in ids for name in set(labels[image_id])))


async def label_facet(ds, query: str = "") -> dict[str, int]:
    data = (await ds.client.get(f"/collection/images.json?_facet_size=max{query}")).json()
    assert "labels" not in data.get("facets_timed_out", [])
    return {row["value"]: row["count"] for row in data["facet_results"]["labels"]["results"]}


@pytest.mark.asyncio
async def test_label_facet_counts_every_image_once(ds, collection):
    _, labels, _ = collection
    assert await label_facet(ds) == image_counts(labels, labels)


@pytest.mark.asyncio
async def test_label_filter_and_the_facet_under_it(ds, collection):
    _, labels, _ = collection
    for chosen in (["malamute"], ["crane", "桜 & <b>"]):
        query = "&" + urlencode([("_label", name) for name in chosen])
        rows = (await ds.client.get(f"/collection/images.json?_shape=array&_size=max{query}")).json()
        expected = {i for i, names in labels.items() if set(chosen) <= set(names)}
        assert {row["id"] for row in rows} == expected
        assert await label_facet(ds, query) == image_counts(labels, expected)
    # A label no image has: nothing, not everything.
    rows = (await ds.client.get("/collection/images.json?_shape=array&_label=zebra")).json()
    assert rows == []


@pytest.mark.asyncio
async def test_facet_links_toggle_the_label_filter(ds):
    data = (await ds.client.get("/collection/images.json?_label=lynx")).json()
    results = {row["value"]: row for row in data["facet_results"]["labels"]["results"]}
    assert results["lynx"]["selected"] and "_label=lynx" not in results["lynx"]["toggle_url"]
    assert "_label=lynx" in results["tabby"]["toggle_url"]
    assert "_label=tabby" in results["tabby"]["toggle_url"]
    page = await ds.client.get("/collection/images?_label=lynx")
    assert page.status_code == 200 and "&lt;b&gt;" in page.text and "<b>" not in page.text


def test_label_counts_follow_deletes_and_rewrites(collection):
    db_path, labels, deleted = collection
    live = [i for i in labels if i not in deleted]

    def counts(column: str) -> dict[str, int]:
        with sqlite3.connect(db_path) as conn:
            return dict(conn.execute(f"select label, {column} from label_counts where {column} > 0"))

    assert counts("images") == image_counts(labels, labels)
    assert counts("live") == image_counts(labels, live)
    store = Store(db_path)
    back, gone, rewritten, dropped = sorted(deleted)[0], live[0], live[1], live[2]
    with store.db.atomic():
        store.db["images"].update(back, {"deleted_at": None})
        store.mark_deleted([gone])
        store.save_image(f"/photos/{rewritten - 1}.jpg", 1, {}, np.ones(4), [("n0", "zebra", 0.9)], "test-model")
        store.delete_rows([dropped])
    store.close()
    labels[rewritten] = ["zebra"]
    del labels[dropped]
    live = [i for i in labels if i not in deleted | {gone}] + [back]
    assert counts("images") == image_counts(labels, labels)
    assert counts("live") == image_counts(labels, live)


# --- every query of the hot pages on an index -------------------------------------------

HOT_PAGES = [
    "/collection/images.json",
    "/collection/images.json?_label=malamute",
    "/collection/images.json?_label=malamute&_label=tabby",
    "/collection/images.json?format=PNG",
    "/collection/labels.json?label=lynx",
    "/collection/labels.json",
    "/collection/matches.json",
    "/collection/label_counts.json",
]


def full_scans(conn: sqlite3.Connection, sql: str, params) -> list[str]:
    """The plan's lines that read a whole table without an index (small lookup tables, the
    rows of a subquery already narrowed and a rowid walk cut off by the limit are fine)."""
    plan = conn.execute(f"explain query plan {sql}", params).fetchall()
    # Newest first is the rowid backwards: a walk that stops at the page's limit, no sort.
    walks_rowid = re.search(r"order by id desc limit \d+\s*$", sql) and not any(
        "TEMP B-TREE" in row[3] for row in plan
    )
    return [
        row[3]
        for row in plan
        if re.match(r"SCAN (images|labels|matches|vectors|thumbnails|projection)\b", row[3])
        and "INDEX" not in row[3]
        and not (walks_rowid and row[3] == "SCAN images")
    ]


@pytest.mark.asyncio
@pytest.mark.parametrize("page", HOT_PAGES)
async def test_hot_pages_query_through_indexes(ds, collection, page):
    db_path = collection[0]
    data = (await ds.client.get(f"{page}{'&' if '?' in page else '?'}_trace=1")).json()
    queries = [t for t in data["_trace"]["traces"] if t.get("database") == "collection"]
    checked = 0
    with sqlite3.connect(db_path) as conn:
        for trace in queries:
            sql, params = trace["sql"], trace.get("params") or {}
            if re.match(r"\s*(pragma|select \* from \(.*\) limit 0)", sql, re.I | re.S) or "sqlite_master" in sql:
                continue  # Datasette's own introspection
            if isinstance(params, str):
                params = json.loads(params)
            assert not full_scans(conn, sql, params), (sql, full_scans(conn, sql, params))
            checked += 1
    assert checked >= 2  # the rows and their count at least


@pytest.mark.asyncio
async def test_label_filter_pages_newest_first_without_repeats(ds, collection):
    """Every image with the label, once, newest first, page after page (a batch added in
    one second shares added_at, which once made pages repeat rows)."""
    _, labels, _ = collection
    for name in ("lynx", "桜 & <b>"):
        rows, url = [], f"/collection/images.json?_shape=objects&_size=50&{urlencode({'_label': name})}"
        while url:
            response = await ds.client.get(url)
            assert response.status_code == 200, response.text
            data = response.json()
            rows += data["rows"]
            url = data["next_url"] and data["next_url"].replace("http://localhost", "")
        ids = [row["id"] for row in rows]
        assert ids == sorted(set(ids), reverse=True)
        assert set(ids) == {i for i, names in labels.items() if name in names}


@pytest.mark.asyncio
async def test_facet_under_a_large_label_filter_is_reported_not_run(ds, monkeypatch):
    from datasette_plugins import facets_plugin

    data = (await ds.client.get("/collection/images.json?_label=lynx")).json()
    assert data["facet_results"]["labels"]["results"]
    monkeypatch.setattr(facets_plugin, "FILTERED_COUNT_MAX", 10)
    data = (await ds.client.get("/collection/images.json?_label=lynx&_trace=1")).json()
    assert "labels" not in data["facet_results"]  # timed out, as Datasette shows it
    assert not any("group by l.label" in t["sql"] for t in data["_trace"]["traces"])
    data = (await ds.client.get("/collection/images.json?_label=lynx&format=PNG")).json()
    assert data["facet_results"]["labels"]["results"]  # other filters narrow it: counted
