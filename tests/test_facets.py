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


def metadata_of(n: int) -> dict:
    """Formats, cameras and years, some of them missing, as EXIF leaves them."""
    return {
        "format": "JPEG" if n % 3 else "PNG",
        "camera": f"Camera {n % 4}" if n % 5 else None,
        "taken_at": f"{2001 + n % 6}-05-01T10:00:00" if n % 7 else None,
    }


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
                f"/photos/{n}.jpg", n, metadata_of(n), rng.normal(size=4),
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


# --- facet_counts (store.m015): the column facets and a label's facets, kept by triggers ---

COLUMNS = ("format", "camera", "taken_year")


def facet_counts_expected(db_path: Path) -> dict[tuple, tuple[int, int]]:
    """facet_counts recomputed in Python from the rows: (label, facet, value) -> (images, live)."""
    with sqlite3.connect(db_path) as conn:
        names: dict[int, set[str]] = {}
        for image_id, label in conn.execute("select image_id, label from labels"):
            names.setdefault(image_id, set()).add(label)
        images = conn.execute(f"select id, deleted_at is null, {', '.join(COLUMNS)} from images").fetchall()
    counts: Counter = Counter()
    for image_id, live, *values in images:
        mine = names.get(image_id, set())
        for facet, value in zip(COLUMNS, values):
            if value is not None:
                for label in mine | {""}:
                    counts[(label, facet, value, "images")] += 1
                    counts[(label, facet, value, "live")] += live
        for label in mine:
            for other in mine:
                counts[(label, "labels", other, "images")] += 1
                counts[(label, "labels", other, "live")] += live
    keys = {key[:3] for key in counts}
    return {key: (counts[(*key, "images")], counts[(*key, "live")]) for key in keys if counts[(*key, "images")]}


def facet_counts_kept(db_path: Path) -> dict[tuple, tuple[int, int]]:
    with sqlite3.connect(db_path) as conn:
        rows = conn.execute("select label, facet, value, images, live from facet_counts").fetchall()
    assert all(images >= live >= 0 for *_, images, live in rows), "a count went negative"
    return {(label, facet, value): (images, live) for label, facet, value, images, live in rows if images}


def test_facet_counts_follow_every_change(collection):
    db_path, labels, deleted = collection
    kept = facet_counts_kept(db_path)
    assert kept == facet_counts_expected(db_path)
    assert kept[("", "format", "PNG")] == (COUNT // 3, kept[("", "format", "PNG")][1])
    assert {facet for _, facet, _ in kept} == {*COLUMNS, "labels"}
    live = [i for i in labels if i not in deleted]
    store = Store(db_path)
    back, gone, rewritten, dropped, recamera, both = sorted(deleted)[0], *live[:5]
    with store.db.atomic():
        store.db["images"].update(back, {"deleted_at": None})
        store.mark_deleted([gone])
        # the same path again: new labels, format, camera and year in one update
        path = store.db.execute("select path from images where id = ?", [rewritten]).fetchone()[0]
        store.save_image(path, 1, {"format": "WEBP", "camera": "Camera 9", "taken_at": "1999-01-01"},
                         np.ones(4), [("n0", "zebra", 0.9), ("n1", "crane", 0.1), ("n2", "crane", 0.05)],
                         "test-model")
        store.delete_rows([dropped])
        store.db.execute("update images set camera = 'Camera 7' where id = ?", [recamera])
        # deleted and changed in one statement
        store.db.execute("update images set deleted_at = '2026-01-01', taken_at = null, format = 'GIF' where id = ?", [both])
    store.close()
    assert facet_counts_kept(db_path) == facet_counts_expected(db_path)


@pytest.mark.asyncio
async def test_counted_facets_equal_datasettes_own(ds, collection):
    """Each counted facet (from facet_counts) shows what Datasette's column facet counts
    over the same rows (asked for with ?_facet=, so both run), on the whole table and
    under one label; other filters fall back to Datasette's SQL."""
    def by_name(data):  # Datasette keys a second facet of one name "<name>_2"
        return {
            key: [(row["value"], row["count"]) for row in result["results"]]
            for key, result in data["facet_results"].items()
        }

    for query in ("", "&_label=malamute", "&_label=桜 %26 <b>", "&_label=lynx&format=PNG"):
        facets = "".join(f"&_facet={column}" for column in COLUMNS)
        data = (await ds.client.get(f"/collection/images.json?_facet_size=max{query}{facets}&_trace=1")).json()
        results = by_name(data)
        for column in COLUMNS:
            assert results[column] == results[f"{column}_2"], (query, column)
            assert results[column], (query, column)
        kept = any("from facet_counts" in t["sql"] for t in data["_trace"]["traces"])
        assert kept == ("format=" not in query), query


@pytest.mark.asyncio
async def test_label_facet_under_one_label_is_read_not_counted(ds, collection):
    _, labels, _ = collection
    data = (await ds.client.get("/collection/images.json?_label=tabby&_facet_size=max&_trace=1")).json()
    counts = {row["value"]: row["count"] for row in data["facet_results"]["labels"]["results"]}
    assert counts == image_counts(labels, [i for i, names in labels.items() if "tabby" in names])
    sql = [t["sql"] for t in data["_trace"]["traces"]]
    assert not any("group by" in q for q in sql), sql  # nothing grouped at request time


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

    two = "_label=lynx&_label=tabby"
    data = (await ds.client.get(f"/collection/images.json?{two}")).json()
    assert data["facet_results"]["labels"]["results"]
    monkeypatch.setattr(facets_plugin, "FILTERED_COUNT_MAX", 10)
    data = (await ds.client.get(f"/collection/images.json?{two}&_trace=1")).json()
    assert "labels" not in data["facet_results"]  # timed out, as Datasette shows it
    assert not any("group by l.label" in t["sql"] for t in data["_trace"]["traces"])
    data = (await ds.client.get(f"/collection/images.json?{two}&format=PNG")).json()
    assert data["facet_results"]["labels"]["results"]  # other filters narrow it: counted
    data = (await ds.client.get("/collection/images.json?_label=lynx")).json()
    assert data["facet_results"]["labels"]["results"]  # one label: read from facet_counts


def test_statistics_of_few_valued_columns_are_exact(tmp_path):
    """ANALYZE under analysis_limit guesses 1,001 rows a value for a column of one value;
    store.optimize counts those indexes exactly, and the map's atlas query then drives
    from the map's tile range, not from "every live image" (store.FEW_VALUED)."""
    from collection import store as store_module

    db_path = tmp_path / "collection.db"
    store = Store(db_path)
    n = store_module.ANALYZE_FROM + 2000
    with store.db.atomic():
        store.db.conn.executemany(
            "insert into images (id, path, format, camera) values (?, ?, 'JPEG', ?)",
            ((i, f"/p/{i}.jpg", f"Camera {i % 3}") for i in range(1, n + 1)),
        )
        store.db.conn.executemany(
            "insert into projection (image_id, method, x, y, placed, tile, sha256) values (?, 'pca', 0.5, 0.5, 0, ?, '')",
            ((i, i) for i in range(1, n + 1)),
        )
    conn = store.db.conn
    conn.execute("analyze")  # sampled, as pragma optimize does it under the limit

    def stats() -> dict[str, str]:
        return dict(conn.execute("select idx, stat from sqlite_stat1 where tbl = 'images'"))

    assert stats()["idx_images_deleted_at"].endswith(f" {store_module.ANALYSIS_LIMIT + 1}")  # the guess
    store_module.optimize(conn)
    assert stats()["idx_images_deleted_at"] == f"{n} {n}"
    assert stats()["images_format"] == f"{n} {n}"
    assert stats()["images_camera"] == f"{n} {-(-n // 3)}"
    store.close()
    with sqlite3.connect(db_path) as fresh:  # a new connection plans with what is stored
        # projection.atlas_keys' query (_atlas_rows)
        first = fresh.execute(
            "explain query plan select count(*) from projection p join images on images.id = p.image_id "
            "join thumbnails t on t.image_id = p.image_id "
            "where images.deleted_at is null and p.tile >= 0 and p.tile < 256"
        ).fetchall()[0][3]
    assert first.startswith("SEARCH p USING") and "tile" in first, first
