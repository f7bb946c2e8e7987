"""The similar-images index: Annoy segments plus exact search over the tail, matches, SQL functions."""

from __future__ import annotations

import itertools
import json
import os
import sqlite3

import numpy as np
import pytest
from annoy import AnnoyIndex
from click.testing import CliRunner

from collection.cli import cli
from collection.index import (
    Indexer,
    build,
    index_path,
    open_index,
    register_functions,
    update_matches,
)
from collection.store import Store, encode
from conftest import make_image, wait_until

MODEL = "test-model"
_paths = itertools.count()


def clustered(seed: int, n: int, d: int = 32, clusters: int = 12, spread: float = 0.35) -> np.ndarray:
    """Unit vectors in clusters around random centres, like a model's embeddings."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    x = centres[rng.integers(clusters, size=n)] + spread * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype("<f4")


def add(store: Store, vectors) -> list[int]:
    """Save vectors as images, one transaction; their new ids."""
    store.claim_model(MODEL, len(vectors[0]), "fp32")
    with store.db.atomic():
        return [
            store.save_image(f"/photos/{next(_paths)}.jpg", 0.0, {"sha256": f"{next(_paths)}"}, v, [], MODEL)
            for v in vectors
        ]


def reembed(store: Store, image_id: int, vector) -> None:
    row = store.by_id(image_id)
    with store.db.atomic():
        store.save_image(row["path"], 1.0, {"sha256": row["sha256"]}, vector, [], MODEL)


def exact(store: Store, image_id: int, k: int = 10, min_score: float = 0.0) -> list[tuple[int, float]]:
    """Brute force over the live vectors: the answer the index should give."""
    rows = store.db.execute(
        "select v.image_id, v.vector from vectors v join images i on i.id = v.image_id "
        "where i.deleted_at is null"
    ).fetchall()
    ids = [r[0] for r in rows]
    matrix = np.stack([np.frombuffer(r[1], "<f4") for r in rows]).astype(np.float64)
    scores = matrix @ matrix[ids.index(image_id)]
    ranked = sorted((-s, i) for i, s in zip(ids, scores) if i != image_id and s >= min_score)
    return [(i, -s) for s, i in ranked[:k]]


def segment_files(db_path) -> list:
    return sorted(index_path(db_path).glob("*.annoy"))


def ids_of(found) -> list[int]:
    return [i for i, _ in found]


def live_ids(store: Store) -> list[int]:
    return [
        r[0]
        for r in store.db.execute(
            "select id from images where deleted_at is null and id in (select image_id from vectors)"
        )
    ]


def assert_exact(store: Store, searcher, ids, k: int = 10, min_score: float = 0.0) -> None:
    for image_id in ids:
        got, want = searcher.similar(image_id, k, min_score), exact(store, image_id, k, min_score)
        assert ids_of(got) == ids_of(want), image_id
        assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-5)


def test_annoy_agrees_with_exact_search(store, db_path):
    ids = add(store, clustered(1, 800))
    result = build(db_path, n_trees=20)
    assert result["index_items"] == 800 and index_path(db_path).exists()
    searcher = open_index(db_path)
    assert searcher.status()["unindexed"] == 0  # every answer below comes from Annoy
    hits = total = 0
    for image_id in ids[::10]:
        got, want = searcher.similar(image_id, 10), exact(store, image_id, 10)
        hits += len(set(ids_of(got)) & set(ids_of(want)))
        total += len(want)
        truth = dict(want)
        for match_id, score in got:  # scores are the exact cosine whichever half found them
            if match_id in truth:
                assert score == pytest.approx(truth[match_id], abs=1e-5)
    assert hits / total >= 0.95


def test_cosine_is_one_minus_half_the_squared_angular_distance(store, db_path):
    vectors = clustered(2, 50)
    add(store, vectors)
    build(db_path, n_trees=5)
    annoy = AnnoyIndex(vectors.shape[1], "angular")
    [segment] = segment_files(db_path)
    annoy.load(str(segment))
    match_id, distance = (x[1] for x in annoy.get_nns_by_item(1, 2, include_distances=True))
    assert open_index(db_path).similarity(1, match_id) == pytest.approx(1 - distance**2 / 2, abs=1e-5)
    annoy.unload()


def test_image_added_after_build_is_found_at_once(store, db_path):
    vectors = clustered(3, 300)
    ids = add(store, vectors)
    build(db_path, n_trees=10)
    searcher = open_index(db_path)
    searcher.similar(ids[0])  # the reader has the file loaded before the new row lands
    twin = vectors[7] + 0.01 * np.random.default_rng(0).normal(size=vectors.shape[1])
    [new] = add(store, [twin / np.linalg.norm(twin)])
    assert searcher.similar(ids[7])[0][0] == new  # as a result
    assert searcher.similar(new)[0][0] == ids[7]  # and as a query
    assert searcher.status()["unindexed"] == 1
    assert_exact(store, searcher, [new, ids[7]])


def test_reembedded_image_is_searched_with_its_new_vector(store, db_path):
    vectors = clustered(4, 300)
    ids = add(store, vectors)
    build(db_path, n_trees=10)
    searcher = open_index(db_path)
    before = searcher.similar(ids[5])
    reembed(store, ids[5], vectors[200])  # now a duplicate of image 200
    assert searcher.similar(ids[200])[0] == (ids[5], pytest.approx(1.0, abs=1e-5))
    assert searcher.similar(ids[5])[0][0] == ids[200]
    for match_id, _ in before:  # its old neighbours no longer see it at its old place
        assert ids[5] not in ids_of(searcher.similar(match_id)[:3])
    assert_exact(store, searcher, [ids[5], ids[200]])


def test_deleted_images_never_appear(store, db_path):
    ids = add(store, clustered(5, 400))
    build(db_path, n_trees=10)
    newer = add(store, clustered(6, 40))
    searcher = open_index(db_path)
    queries = [ids[0], ids[1], newer[0]]
    doomed = {i for q in queries for i in ids_of(searcher.similar(q, 20))}
    doomed |= set(ids[100:300])  # half the index gone: Annoy must be asked for more
    doomed -= set(queries + newer)
    marked, dropped = sorted(doomed)[::2], sorted(doomed)[1::2]
    store.mark_deleted(marked)
    with store.db.atomic():
        store.delete_rows(dropped)
    for q in queries + newer[1:10]:
        found = searcher.similar(q, 10)
        assert len(found) == 10 and not doomed & set(ids_of(found))
    for gone in (marked[0], dropped[0]):
        with pytest.raises(KeyError):
            searcher.similar(gone)
        assert searcher.similarity(gone, ids[0]) is None
    assert not doomed & set(ids_of(searcher.similar_to_vector(store.vector(marked[0]), 10)))
    assert_exact(store, searcher, queries)


def test_rebuild_replaces_the_file_while_a_reader_holds_the_old_one(store, db_path):
    ids = add(store, clustered(7, 300))
    build(db_path, n_trees=10)
    [path] = segment_files(db_path)
    searcher = open_index(db_path)
    searcher.similar(ids[0])
    other = AnnoyIndex(32, "angular")  # a second reader, as another process would hold it
    other.load(str(path))
    before = other.get_nns_by_item(ids[0], 5)

    more = add(store, clustered(8, 100))
    build(db_path, n_trees=10, full=True)
    assert not path.exists() and len(segment_files(db_path)) == 1  # a new file, the old one unlinked
    assert other.get_nns_by_item(ids[0], 5) == before  # and still mapped, intact
    assert other.get_n_items() == max(ids) + 1
    other.unload()
    status = searcher.status()
    assert (status["indexed"], status["unindexed"], status["segments"]) == (400, 0, 1)  # the reader moved over
    assert not [p for p in os.listdir(index_path(db_path)) if p.endswith(".tmp")]
    assert_exact(store, searcher, [ids[0], more[0]], k=5)


def test_queries_go_on_during_a_background_rebuild(store, db_path):
    ids = add(store, clustered(18, 400))
    build(db_path, n_trees=5)
    add(store, clustered(19, 200))
    searcher = open_index(db_path)
    indexer = Indexer(db_path, n_trees=20, segment_min=100)
    assert indexer.check()

    def on_the_new_file():
        assert len(searcher.similar(ids[0])) == 10
        return searcher.status()["indexed"] == 600

    wait_until(on_the_new_file, timeout=60, message="the reader to move to the rebuilt file")
    indexer.join()
    assert_exact(store, searcher, ids[:3])


def test_the_same_seed_gives_the_same_index(tmp_path):
    vectors = clustered(9, 500)
    results = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        store = Store(tmp_path / name / "collection.db")
        ids = add(store, vectors)
        build(store.path, n_trees=10, seed=42, n_jobs=1)
        searcher = open_index(store.path)
        results.append([searcher.similar(i, 10) for i in ids[::25]])
        store.close()
    assert results[0] == results[1]
    files = [segment_files(tmp_path / name / "collection.db")[0].read_bytes() for name in ("a", "b")]
    assert files[0] == files[1]


def test_ids_with_gaps(store, db_path):
    vectors = clustered(10, 200)
    ids = add(store, vectors)
    with store.db.atomic():
        store.delete_rows(ids[20:80])
        store.db["images"].insert({"id": 5000, "path": "/photos/far.jpg"})
        store.db["vectors"].insert({"image_id": 5000, "model": MODEL, "vector": encode(vectors[3])})
    build(db_path, n_trees=10)
    searcher = open_index(db_path)
    assert searcher.status()["indexed"] == 141
    assert searcher.similar(5000)[0][0] == ids[3]
    assert_exact(store, searcher, [5000, ids[0], ids[100], ids[-1]])


def stored_matches(store: Store) -> dict[int, list[tuple[int, float]]]:
    lists: dict[int, list] = {}
    for image_id, match_id, score in store.db.execute(
        "select image_id, match_id, score from matches order by image_id, rank"
    ):
        lists.setdefault(image_id, []).append((match_id, score))
    return lists


def assert_matches_current(store: Store, min_score: float = 0.0) -> None:
    lists = stored_matches(store)
    for image_id in live_ids(store):
        want = exact(store, image_id, 10, min_score)
        got = lists.pop(image_id, [])
        assert ids_of(got) == ids_of(want), image_id
        assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-5)
    assert not lists  # deleted images have no list


@pytest.mark.parametrize("min_score", [0.0, 0.6])
def test_matches_equal_a_recomputation_after_adds_and_deletes(store, db_path, min_score):
    vectors = clustered(11, 120, d=16, clusters=6, spread=0.5)
    update = lambda new=(), deleted=(): update_matches(store, new, deleted, min_score=min_score)  # noqa: E731
    first = add(store, vectors[:30])
    update(first)
    assert_matches_current(store, min_score)
    second = add(store, vectors[30:50])
    update(second)
    build(db_path, n_trees=10)
    third = add(store, vectors[50:65])
    update(third)
    assert_matches_current(store, min_score)
    ids = first + second + third
    store.mark_deleted(ids[::9])
    update(deleted=ids[::9])
    assert_matches_current(store, min_score)
    for image_id, vector in zip(ids[1:40:8], vectors[100:105]):
        reembed(store, image_id, vector)
    update(ids[1:40:8])
    with store.db.atomic():  # as a move onto an occupied path does, telling no one
        store.delete_rows(ids[2:6])
    store.touch(ids[9], 2.0)  # back from the deleted
    update()
    assert_matches_current(store, min_score)
    assert not stored_matches(store).keys() & set(ids[2:6])
    assert all(m not in ids[2:6] for found in stored_matches(store).values() for m, _ in found)


def test_update_matches_prunes_the_change_log_once_indexed(store, db_path):
    ids = add(store, clustered(12, 50))
    update_matches(store, ids)
    build(db_path, n_trees=5)
    assert store.db.execute("select count(*) from vector_changes").fetchone()[0] == 0
    store.mark_deleted(ids[:3])
    assert store.db.execute("select count(*) from vector_changes").fetchone()[0] == 3
    update_matches(store, deleted_ids=ids[:3])
    assert store.db.execute("select count(*) from vector_changes").fetchone()[0] == 3  # not yet in the index
    build(db_path, n_trees=5, full=True)
    assert store.db.execute("select count(*) from vector_changes").fetchone()[0] == 0


def test_sql_functions_with_json_each(store, db_path):
    ids = add(store, clustered(13, 100))
    store.mark_deleted([ids[-1]])
    conn = sqlite3.connect(db_path)
    register_functions(conn, db_path)
    rows = conn.execute(
        "select json_extract(j.value, '$.id'), json_extract(j.value, '$.score'), images.path "
        "from json_each(similar_images(?, 5)) j join images on images.id = json_extract(j.value, '$.id') "
        "order by j.key",
        [ids[0]],
    ).fetchall()
    want = exact(store, ids[0], 5)
    assert [r[0] for r in rows] == ids_of(want)
    assert [r[1] for r in rows] == pytest.approx([s for _, s in want], abs=1e-5)
    assert all(r[2].startswith("/photos/") for r in rows)
    [(text,)] = conn.execute("select similar_images(?)", [ids[1]]).fetchall()
    assert len(json.loads(text)) == 10
    assert conn.execute("select similar_images(?, 50, 0.9)", [ids[1]]).fetchone()[0] == json.dumps(
        [{"id": i, "score": s} for i, s in open_index(db_path).similar(ids[1], 50, 0.9)]
    )
    # Called once per row of a query over the same connection: no recursive use of it.
    scores = conn.execute("select id, image_similarity(id, ?) from images order by id", [ids[0]]).fetchall()
    assert scores[0][1] == pytest.approx(1.0, abs=1e-6)
    assert scores[1][1] == pytest.approx(float(store.vector(ids[0]) @ store.vector(ids[1])), abs=1e-6)
    assert scores[-1][1] is None  # deleted
    assert conn.execute("select image_similarity(?, 99999)", [ids[0]]).fetchone()[0] is None
    assert conn.execute("select count(*) from json_each(similar_images(99999, 5))").fetchone()[0] == 0
    conn.close()


def test_similar_to_vector_checks_dimensions(store, db_path):
    add(store, clustered(14, 20))
    with pytest.raises(ValueError):
        open_index(db_path).similar_to_vector(np.ones(5), 3)


def test_indexer_builds_in_the_background_past_the_threshold(store, db_path):
    indexer = Indexer(db_path, n_trees=5, segment_min=10)
    add(store, clustered(15, 8))
    assert not indexer.check()  # under the minimum: exact search is enough
    add(store, clustered(16, 40))
    assert indexer.check()
    indexer.join(60)
    assert index_path(db_path).exists()
    assert open_index(db_path).status()["unindexed"] == 0
    add(store, clustered(17, 9))
    assert not indexer.check()  # 9 in the tail: under the minimum
    assert [b["built"]["items"] for b in indexer.builds] == [48]


def test_cli_add_index_and_similar(tmp_path, images_dir, db_path):
    for seed in range(8):
        make_image(images_dir / f"{seed}.png", seed=seed)
    outside = make_image(tmp_path / "outside.png", seed=3, size=(66, 50))
    runner = CliRunner()
    db = ["--db", str(db_path)]
    result = runner.invoke(cli, ["add", str(images_dir), "--model", "efficientnet_lite0:random", *db])
    assert result.exit_code == 0, result.output
    store = Store(db_path)
    assert store.db["matches"].count == 8 * 7  # every image lists all the others
    result = runner.invoke(cli, ["index", *db])
    assert result.exit_code == 0, result.output
    assert "Indexed 8 images (efficientnet_lite0:random, 50 trees)" in result.output
    result = runner.invoke(cli, ["similar", "1", "-k", "3", "--json", *db])
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    assert [r["id"] for r in found] == ids_of(exact(store, 1, 3))
    assert found[0]["path"].startswith(str(images_dir))
    result = runner.invoke(cli, ["similar", str(images_dir / "4.png"), "-k", "2", *db])
    assert result.exit_code == 0 and len(result.output.splitlines()) == 2
    result = runner.invoke(cli, ["similar", str(outside), "--json", *db])  # embedded on the fly
    assert result.exit_code == 0, result.output
    found = json.loads(result.output)
    assert len(found) == 8 and found[0]["path"] == str(images_dir / "3.png")
    assert store.db["images"].count == 8  # not added
    result = runner.invoke(cli, ["similar", "999", *db])
    assert result.exit_code == 1 and "no image '999'" in result.output
    store.close()


def test_segments_of_many_dimensions_index_a_pca_and_rerank_by_the_full_vectors(store, db_path, monkeypatch):
    """Vectors of at least twice REDUCED_DIMENSIONS dimensions: each segment's Annoy file
    holds them reduced by a PCA fitted on a sample of its own, saved beside it; the
    searcher reranks the candidates by the full vectors, so scores are exact cosines
    and recall stays high. A merge makes one new PCA; the old files go with the segment."""
    from collection import index as index_module

    monkeypatch.setattr(index_module, "REDUCED_DIMENSIONS", 8)
    monkeypatch.setattr(index_module, "PCA_SAMPLE", 100)
    ids = add(store, clustered(60, 400, d=48, clusters=20, spread=0.3))
    build(db_path, n_trees=20)
    more = add(store, clustered(61, 400, d=48, clusters=20, spread=0.3))
    build(db_path, n_trees=20)
    segments = json.loads(store.get_meta("index_segments"))
    assert segments and all(s["reduced"] == 8 for s in segments)
    folder = index_path(db_path)
    for segment in segments:
        assert np.load(folder / f"{segment['name']}.pca.npy").shape == (48, 8)
        annoy = AnnoyIndex(8, "angular")
        annoy.load(str(folder / f"{segment['name']}.annoy"))  # an 8-d index
        assert annoy.get_n_items() > 0
        annoy.unload()
    searcher = open_index(db_path)
    assert searcher.status()["unindexed"] == 0
    hits = total = 0
    for image_id in (ids + more)[::20]:
        got, want = searcher.similar(image_id, 10), exact(store, image_id, 10)
        for found_id, score in got:  # every score the exact cosine
            assert score == pytest.approx(dict(exact(store, image_id, 800)).get(found_id), abs=1e-5)
        hits += len(set(ids_of(got)) & set(ids_of(want)))
        total += len(want)
    assert hits / total >= 0.9
    build(db_path, n_trees=20, full=True)
    assert sorted(p.name for p in folder.glob("*.pca.npy")) == [
        f"{s['name']}.pca.npy" for s in json.loads(store.get_meta("index_segments"))
    ]
