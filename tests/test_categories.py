"""Labels at every level: the shipped WordNet hierarchy, roll-up scores against the full
softmax, what the store keeps current, the upgrade of an older collection, the indexes
hot queries use, and the Datasette pages, filter and facet."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import sqlite_utils
from click.testing import CliRunner
from PIL import Image

from collection import categories, images
from collection.categories import ROOT, hierarchy
from collection.cli import cli
from collection.data import make_hierarchy
from collection.ingest import Ingester
from collection.serve import find_metadata, open_datasette
from collection.store import Store, migrations

from conftest import sample_photos

MALAMUTE, DOG, CANINE, CARNIVORE, MAMMAL = "n02110063", "n02084071", "n02083346", "n02075296", "n01861778"
ANIMAL, DOMESTIC_ANIMAL, CAR = "n00015388", "n01317541", "n02958343"
SHIPPED = Path(make_hierarchy.__file__).with_name(categories.DATA_FILE)
F16 = 2e-3  # float16 keeps about 3 significant digits; a sum of them a little less


def independent_scores(probs: np.ndarray) -> dict[str, float]:
    """Each category's score by walking the shipped file's parent links from every class:
    a second computation that shares nothing with the roll-up matrix."""
    parents, classes = {}, {}
    for line in SHIPPED.read_text().splitlines()[1:]:
        wnid, index, _, _, up, _ = line.split("\t")
        parents[wnid] = up.split()
        if index:
            classes[int(index)] = wnid
    scores: dict[str, float] = {}
    for index, wnid in classes.items():
        above, todo = set(), [wnid]
        while todo:
            w = todo.pop()
            if w not in above:
                above.add(w)
                todo += parents[w]
        for w in above:  # once per category, however many paths lead there
            scores[w] = scores.get(w, 0.0) + float(np.float16(probs[index]))
    return scores


def stored(conn, image_id: int) -> dict[str, float]:
    return dict(conn.execute("select wnid, score from image_categories where image_id = ?", [image_id]))


def assert_counts_current(store: Store) -> None:
    fresh = dict(store.db.execute(
        "select ic.wnid, count(*) from image_categories ic join images i on i.id = ic.image_id "
        "where i.deleted_at is null group by ic.wnid"
    ).fetchall())
    kept = dict(store.db.execute("select wnid, images from categories where images != 0").fetchall())
    assert kept == fresh


# --- the hierarchy ---------------------------------------------------------------------


@pytest.mark.skipif(not (make_hierarchy.WORDNET / "data.noun").is_file(),
                    reason="WordNet 3.0 is not installed (apt-get install wordnet-base)")
def test_shipped_hierarchy_is_what_the_script_makes_from_wordnet():
    assert make_hierarchy.make() == SHIPPED.read_text(encoding="utf-8")


def test_malamute_chain_passes_through_dog_canine_carnivore_mammal():
    h = hierarchy()
    first = h.paths(MALAMUTE)[0]
    assert first[0] == ROOT and first[-1] == MALAMUTE
    assert [w for w in first if w in (MAMMAL, CARNIVORE, CANINE, DOG)] == [MAMMAL, CARNIVORE, CANINE, DOG]
    assert [h.categories[w].name for w in first[-4:]] == ["dog", "working dog", "sled dog", "malamute"]
    assert h.categories[DOG].lemmas == ("dog", "domestic dog", "Canis familiaris")
    assert h.depth[MALAMUTE] == len(first) - 1
    # WordNet's second hypernym of dog: every path is kept
    assert h.categories[DOG].parents == (CANINE, DOMESTIC_ANIMAL)
    assert any(DOMESTIC_ANIMAL in path for path in h.paths(MALAMUTE))
    assert len(h.descendant_classes(DOG)) == 118  # the dog breeds: every class below dog
    assert MALAMUTE in h.descendant_classes(DOG) and h.descendant_classes(MALAMUTE) == [MALAMUTE]


def test_every_class_reaches_entity_and_no_class_is_below_another():
    h = hierarchy()
    assert len(set(h.classes)) == 1000
    for wnid in h.classes:
        assert all(path[0] == ROOT for path in h.paths(wnid))
        assert h.descendant_classes(wnid) == [wnid]


def test_search_finds_a_category_by_any_of_its_words():
    h = hierarchy()
    best = lambda q: h.search(q)[0][0].wnid  # noqa: E731
    assert best("domestic dog") == DOG
    assert best("Canis familiaris") == DOG
    assert best("canine") == CANINE
    assert best("automobile") == CAR
    assert CAR in [c.wnid for c, _ in h.search("car")[:3]]
    assert h.resolve("dog") == [DOG] and h.resolve(DOG) == [DOG]
    assert h.resolve("n99999999") == [] and h.search("   ") == []


# --- roll-up scores ----------------------------------------------------------------------


def test_rollup_sums_match_the_full_softmax():
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.full(1000, 0.05), size=4).astype(np.float32)
    probs[0] = 0
    probs[0, [249, 248, 250]] = [0.15, 0.15, 0.7]  # malamute, Eskimo dog, Siberian husky
    h = hierarchy()
    for row, scores in zip(probs, h.scores(probs)):
        expected = independent_scores(row)
        got = {w: float(scores[h.column[w]]) for w in h.wnids}
        assert set(expected) <= set(got)
        for wnid, value in got.items():
            assert value == pytest.approx(expected.get(wnid, 0.0), abs=1e-5)
        assert got[ROOT] == pytest.approx(1.0, abs=F16)
    dog = h.above(probs[:1], 0.2)[0]
    names = {w for w, _ in dog}
    assert {DOG, CANINE, ANIMAL, DOMESTIC_ANIMAL} <= names and "n02110185" in names  # husky 0.7
    assert MALAMUTE not in names  # 0.15 alone is under the threshold; dog (1.0) is not
    assert dict(dog)[DOG] == pytest.approx(1.0, abs=F16)


def test_ingest_stores_distribution_and_categories_from_the_model(tmp_path, small_model):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, array in sample_photos().items():
        Image.fromarray(array).save(folder / f"{name}.png")
    store = Store(tmp_path / "c.db")
    store.set_meta(categories.THRESHOLD_KEY, 0.01)  # random weights give flat softmaxes: keep more
    summary = Ingester(store, small_model).add(sorted(str(p) for p in folder.iterdir()))
    assert summary.added == 6
    for image_id in summary.ids:
        path = store.by_id(image_id)["path"]
        decoded = images.decode(path, min_side=small_model.min_side)
        _, probs = small_model.embed_batch([small_model.prepare(decoded.image)])
        blob = store.db.execute("select probs from distributions where image_id = ?", [image_id]).fetchone()[0]
        assert len(blob) == 2000
        assert np.allclose(categories.decode(blob), probs[0], atol=1e-3)
        expected = {w: s for w, s in independent_scores(categories.decode(blob)).items() if s >= 0.01}
        got = stored(store.db.conn, image_id)
        assert set(got) == set(expected)
        assert all(got[w] == pytest.approx(expected[w], abs=1e-5) for w in got)
    assert_counts_current(store)
    store.close()


# --- what the store keeps current ------------------------------------------------------------


def distribution(*hot: tuple[int, float]) -> np.ndarray:
    probs = np.full(1000, 0.0, np.float32)
    for index, p in hot:
        probs[index] = p
    probs[0] += 1.0 - probs.sum()
    return probs


def test_copy_update_delete_keep_rows_and_counts_current(store):
    husky, tabby, sports_car = 250, 281, 817
    with store.db.atomic():
        dog = store.save_image("/x/dog.jpg", 1.0, {"sha256": "d"}, np.ones(4), [], "m",
                               probabilities=distribution((husky, 0.9)))
        cat = store.save_image("/x/cat.jpg", 1.0, {"sha256": "c"}, np.ones(4), [], "m",
                               probabilities=distribution((tabby, 0.8)))
    assert_counts_current(store)
    with store.db.atomic():
        copy = store.copy(dog, "/x/dog-copy.jpg", 2.0)
    assert stored(store.db.conn, copy) == stored(store.db.conn, dog)
    assert store.db.execute("select probs from distributions where image_id = ?", [copy]).fetchone() == \
        store.db.execute("select probs from distributions where image_id = ?", [dog]).fetchone()
    count = lambda wnid: store.db.execute("select images from categories where wnid = ?", [wnid]).fetchone()[0]  # noqa: E731
    assert count(DOG) == 2 and count(ROOT) == 3
    store.mark_deleted([dog])
    assert count(DOG) == 1
    assert_counts_current(store)
    with store.db.atomic():  # the file comes back with other content: same id, new categories
        store.save_image("/x/dog.jpg", 3.0, {"sha256": "e"}, np.ones(4), [], "m",
                         probabilities=distribution((sports_car, 0.95)))
    assert count(DOG) == 1 and count(CAR) == 1
    assert_counts_current(store)
    with store.db.atomic():  # embedded without a distribution: the old categories no longer apply
        store.save_image("/x/cat.jpg", 4.0, {"sha256": "f"}, np.ones(4), [], "m")
    assert stored(store.db.conn, cat) == {}
    store.delete_rows([copy])
    assert count(DOG) == 0 and stored(store.db.conn, copy) == {}
    assert store.db.execute("select count(*) from distributions where image_id = ?", [copy]).fetchone()[0] == 0
    assert_counts_current(store)


# --- an older collection upgrades ----------------------------------------------------------


def test_collection_made_before_the_migration_upgrades_and_answers(tmp_path, small_model):
    db_path = tmp_path / "old.db"
    db = sqlite_utils.Database(db_path)
    migrations.apply(db, stop_before="m010_categories")
    ids = {}
    for name, array in list(sample_photos().items())[:4]:
        path = tmp_path / f"{name}.png"
        Image.fromarray(array).save(path)
        data = path.read_bytes()
        ids[name] = db.execute(
            "insert into images (path, sha256, size, mtime, model) values (?, ?, ?, ?, ?)",
            [str(path), images.sha256_bytes(data), len(data), os.stat(path).st_mtime, small_model.model_id],
        ).lastrowid
        db.execute("insert into vectors (image_id, model, vector) values (?, ?, ?)",
                   [ids[name], small_model.model_id, np.ones(small_model.dimensions, "<f4").tobytes()])
    for key, value in (("model", small_model.model_id), ("dimensions", small_model.dimensions), ("precision", "fp32")):
        db.execute("insert into collection_meta (key, value) values (?, ?)", [key, str(value)])
    Image.new("RGB", (50, 50), "red").save(tmp_path / "astronaut.png")  # changed since it was added
    db.conn.commit()
    db.close()

    store = Store(db_path)  # the migration
    assert store.db["categories"].count == len(hierarchy().categories)
    assert categories.count_without_distribution(store.db.conn) == 4
    store.close()

    result = CliRunner().invoke(cli, ["categories", "recompute", "--db", str(db_path), "--no-embed"])
    assert result.exit_code == 0, result.output
    assert "4 images have no stored class probabilities" in result.output
    result = CliRunner().invoke(cli, ["categories", "recompute", "--db", str(db_path)])
    assert result.exit_code == 0, result.output
    assert "Embedded 3 images again; 1 skipped" in result.output

    store = Store(db_path)
    everything = [r[0] for r in store.db.execute(
        "select image_id from image_categories where wnid = ? order by image_id", [ROOT])]
    assert everything == sorted(ids[n] for n in ids if n != "astronaut")
    chelsea = store.by_id(ids["chelsea"])
    decoded = images.decode(chelsea["path"], min_side=small_model.min_side)
    _, probs = small_model.embed_batch([small_model.prepare(decoded.image)])
    expected = {w for w, s in independent_scores(probs[0]).items() if s >= categories.DEFAULT_THRESHOLD + F16}
    assert expected <= set(stored(store.db.conn, ids["chelsea"]))
    assert_counts_current(store)

    # the same threshold again: recomputed, and nothing differs, so nothing is written
    changes = store.db.conn.total_changes
    assert categories.recompute(store.db, categories.DEFAULT_THRESHOLD) == 3
    assert store.db.conn.total_changes == changes
    # a new threshold recomputes from the stored distributions, without the model
    before = store.db.execute("select count(*) from image_categories").fetchone()[0]
    store.close()
    result = CliRunner().invoke(cli, ["categories", "recompute", "--db", str(db_path), "--threshold", "0.01"])
    assert result.exit_code == 0, result.output
    assert "Recomputed the categories of 3 images at threshold 0.01" in result.output
    store = Store(db_path)
    assert store.db.execute("select count(*) from image_categories").fetchone()[0] > before
    assert store.category_threshold == 0.01
    assert_counts_current(store)
    store.close()


# --- hot queries are on indexes ------------------------------------------------------------------


def plan(store: Store, sql: str, params=()) -> str:
    return "\n".join(row[3] for row in store.db.execute(f"explain query plan {sql}", params))


def test_hot_queries_use_indexes(store):
    filter_plan = plan(store, f"select id from images where {categories.filter_sql('id', ['a'])}", {"a": DOG})
    assert "USING COVERING INDEX image_categories_wnid_score (wnid=?)" in filter_plan
    assert "SCAN image_categories" not in filter_plan
    top = plan(store, categories.TOP_IMAGES, [DOG, 10, 0])
    assert "USING COVERING INDEX image_categories_wnid_score (wnid=?)" in top
    assert "TEMP B-TREE" not in top  # read in score order straight from the index
    facet = plan(store, categories.facet_sql("select * from images where format = 'JPEG'", "id"),
                 {categories.FACET_PARAM: json.dumps([DOG, CANINE])})
    assert "USING COVERING INDEX image_categories_wnid_score (wnid=?)" in facet
    whole = plan(store, categories.ALL_IMAGES_FACET_SQL, {categories.FACET_PARAM: json.dumps([DOG])})
    assert "SEARCH i USING COVERING INDEX idx_images_deleted_at" in whole
    assert "SEARCH ic USING PRIMARY KEY (image_id=? AND wnid=?)" in whole
    per_image = plan(store, "delete from image_categories where image_id = ?", [1])
    assert "USING PRIMARY KEY (image_id=?)" in per_image
    count = plan(store, "update categories set images = images + 1 where wnid = ?", [DOG])
    assert "USING INDEX sqlite_autoindex_categories_1 (wnid=?)" in count or "PRIMARY KEY" in count


# --- Datasette ------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def datasette_with_categories(tmp_path):
    """Files and thumbnails for three images: a husky, a tabby and a sports car."""
    store = Store(tmp_path / "collection.db")
    store.claim_model("test", 4, "fp32")
    ids = {}
    with store.db.atomic():
        for name, hot in (("husky", 250), ("tabby", 281), ("car", 817), ("gone", 249)):
            path = tmp_path / f"{name}.jpg"
            Image.new("RGB", (40, 30), "gray").save(path)
            ids[name] = store.save_image(str(path), 1.0, {"sha256": name}, np.ones(4), [], "test",
                                         thumbnail=(images.thumbnail(Image.open(path)), 40, 30),
                                         probabilities=distribution((hot, 0.9)))
    store.mark_deleted([ids["gone"]])
    store.close()
    ds = open_datasette(tmp_path / "collection.db", find_metadata())
    await ds.invoke_startup()
    yield ds, ids


@pytest.mark.asyncio
async def test_labels_pages_search_and_json(datasette_with_categories):
    ds, ids = datasette_with_categories
    page = await ds.client.get("/-/labels")
    assert page.status_code == 200
    assert f'href="/-/labels/{DOG}"' in page.text and f'/-/thumbnail/{ids["husky"]}.jpg' in page.text
    tree = (await ds.client.get("/-/labels.json")).json()["tree"]
    assert tree["wnid"] == ROOT and tree["images"] == 3  # the deleted image does not count
    one = (await ds.client.get(f"/-/labels/{DOG}.json")).json()
    assert one["images"] == 1 and [t["id"] for t in one["top"]] == [ids["husky"]]
    assert [p[-2]["wnid"] for p in one["paths"]] == [CANINE, DOMESTIC_ANIMAL]
    assert (await ds.client.get(f"/-/labels/{ANIMAL}/ids.json")).json()["ids"] in (
        [ids["husky"], ids["tabby"]], [ids["tabby"], ids["husky"]])
    for word, wnid in (("domestic dog", DOG), ("automobile", CAR), ("Canis familiaris", DOG)):
        found = (await ds.client.get("/-/labels/search.json", params={"q": word})).json()["results"]
        assert found[0]["wnid"] == wnid and found[0]["images"] == 1
    html = await ds.client.get("/-/labels", params={"q": "car"})
    assert f'href="/-/labels/{CAR}"' in html.text
    assert f'src="/-/thumbnail/{ids["car"]}.jpg"' in html.text.split("Images of car")[1]  # its images, shown
    hostile = await ds.client.get("/-/labels", params={"q": "<script>alert(1)</script>"})
    assert hostile.status_code == 200 and "<script>alert(1)" not in hostile.text
    assert (await ds.client.get("/-/labels/n99999999")).status_code == 404
    assert (await ds.client.get(f"/-/labels/{DOG}")).status_code == 200


@pytest.mark.asyncio
async def test_category_filter_and_facet_roll_up(datasette_with_categories):
    ds, ids = datasette_with_categories
    rows = (await ds.client.get("/collection/images.json?_category=dog&_shape=array&_col=id")).json()
    assert sorted(r["id"] for r in rows) == [ids["husky"], ids["gone"]]  # a deleted image is still a row
    rows = (await ds.client.get("/collection/images.json?_category=dog&deleted_at__isnull=1&_shape=array")).json()
    assert [r["id"] for r in rows] == [ids["husky"]]
    rows = (await ds.client.get(f"/collection/images.json?_category={ANIMAL}&_shape=array&_col=id")).json()
    assert sorted(r["id"] for r in rows) == sorted([ids["husky"], ids["tabby"], ids["gone"]])
    nothing = (await ds.client.get("/collection/images.json?_category=unicornish&_shape=array")).json()
    assert nothing == []
    data = (await ds.client.get(f"/collection/images.json?_category={ANIMAL}&_facet_category=id")).json()
    facet = data["facet_results"]["category"]
    counts = {r["value"]: r["count"] for r in facet["results"]}
    assert counts[ANIMAL] == 3 and facet["results"][0]["selected"]
    assert sum(counts[w] for w in counts if w != ANIMAL and w != DOMESTIC_ANIMAL) >= 3
    # the whole table's facet reads the kept counts; a filter that keeps every row takes the
    # general path: both count the deleted image too, since its row is in the table
    whole = (await ds.client.get("/collection/images.json?_facet_category=id")).json()["facet_results"]["category"]
    general = (await ds.client.get("/collection/images.json?_facet_category=id&id__gt=0")).json()
    general = general["facet_results"]["category"]
    assert whole["focus"] == general["focus"] and whole["results"] == [
        {**r, "toggle_url": r["toggle_url"].replace("id__gt=0&", "")} for r in general["results"]]
    assert {r["label"]: r["count"] for r in whole["results"]} == {"living thing": 3, "artifact": 1}
    labels = (await ds.client.get(f"/collection/thumbnails.json?_category={CAR}&_shape=array&_col=image_id")).json()
    assert [r["image_id"] for r in labels] == [ids["car"]]
    sql = await ds.client.get("/collection.json", params={
        "sql": f"select image_id from image_categories where wnid = '{DOG}'", "_shape": "array"})
    assert sorted(r["image_id"] for r in sql.json()) == [ids["husky"], ids["gone"]]
    canned = await ds.client.get("/collection/images_in_category.json", params={"category": "dog", "_shape": "array"})
    assert [r["image_id"] for r in canned.json()] == [ids["husky"]]  # live images only
