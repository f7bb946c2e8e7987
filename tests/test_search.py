"""Segments and the searcher at scale's shape: per-batch reads, geometric merges,
deletions and compaction, builds that block nothing, leftovers cleaned, the k cap."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from collection import index, search, serve
from collection.cli import cli
from collection.index import Indexer, build, index_path, open_index
from collection.search import MAX_K, Searcher
from conftest import wait_until
from test_index import add, assert_exact, clustered, exact, ids_of


def test_vectors_read_per_batch_do_not_grow_with_the_collection(store, db_path):
    searcher = open_index(db_path)
    first = add(store, clustered(30, 300))
    searcher.similar(first[0])
    assert searcher.vectors_read == 300  # no index yet: the first query reads every vector, once
    per_batch = []
    for size in (300, 3000):
        if size > 300:
            add(store, clustered(31, size - 300))
            build(db_path, n_trees=5)
            searcher.similar(first[0])
        for seed in (32, 33):
            before = searcher.vectors_read
            batch = add(store, clustered(seed + size, 20))
            searcher.similar(batch[0])  # the first query after the batch takes it in
            per_batch.append(searcher.vectors_read - before)
    assert per_batch == [20, 20, 20, 20]  # the batch, at 300 images as at 3,000
    assert searcher.status()["unindexed"] == 40


def _build_as_the_indexer_would(db_path, segment_min: int) -> dict | None:
    indexer = Indexer(db_path, n_trees=5, segment_min=segment_min)
    return build(db_path, n_trees=5, segment_min=segment_min) if indexer.due() else None


def test_segments_merge_geometrically_and_search_merges_them_with_the_tail(store, db_path):
    vectors = clustered(34, 1650, clusters=30)
    ids, built = [], 0
    for start in range(0, 1600, 50):
        ids += add(store, vectors[start : start + 50])
        result = _build_as_the_indexer_would(db_path, segment_min=100)
        if result:
            built += result["built"]["items"]
            sizes = [s["items"] for s in json.loads(store.get_meta("index_segments"))]
            # Each segment holds more than all newer ones together: sizes at least double going back.
            assert all(sizes[j] > sum(sizes[j + 1 :]) for j in range(len(sizes))), sizes
    ids += add(store, vectors[1600:])  # a tail the segments do not cover
    assert len(sizes) <= np.log2(1600 / 100) + 1
    assert built <= 1600 * (np.log2(1600 / 100) + 1)  # each image built O(log N) times
    searcher = Searcher(db_path, search_k=100)  # a small search_k: Annoy really approximates
    status = searcher.status()
    assert (status["indexed"], status["unindexed"], status["segments"]) == (1600, 50, len(sizes))
    hits = 0
    for image_id in ids[::40]:
        got = searcher.similar(image_id, 10)
        hits += len(set(ids_of(got)) & set(ids_of(exact(store, image_id, 10))))
        truth = dict(exact(store, image_id, 50))
        assert all(score == pytest.approx(truth[i], abs=1e-5) for i, score in got if i in truth)
    assert hits / (10 * len(ids[::40])) >= 0.95
    searcher.close()


def test_deletions_are_honoured_and_counted_toward_compaction(store, db_path):
    ids = add(store, clustered(35, 400))
    build(db_path, n_trees=5)
    reembedded = ids[0]
    row = store.by_id(reembedded)
    with store.db.atomic():
        store.save_image(row["path"], 1.0, {"sha256": row["sha256"]}, clustered(36, 1)[0], [], "test-model")
    searcher = open_index(db_path)
    doomed = set(ids_of(searcher.similar(ids[1], 30))) | set(ids[100:220])
    doomed -= {ids[1], reembedded}
    store.mark_deleted(sorted(doomed))
    status = searcher.status()
    assert status["dead"] == len(doomed) + 1 and status["indexed"] == 399 - len(doomed)
    assert status["unindexed"] == 1  # the re-embedded image, in the tail
    for query in (ids[1], ids[2], reembedded):
        assert not doomed & set(ids_of(searcher.similar(query, 20)))
    assert_exact(store, searcher, [ids[1], ids[2], reembedded])
    indexer = Indexer(db_path, n_trees=5, segment_min=1000, dead_share=0.2)
    assert indexer.due()  # no tail worth a segment, but a third of the base is dead
    assert indexer.check()
    indexer.join(60)
    [base] = json.loads(store.get_meta("index_segments"))
    assert (base["items"], base["dead"]) == (400 - len(doomed), 0)
    status = searcher.status()
    assert (status["indexed"], status["dead"], status["unindexed"]) == (400 - len(doomed), 0, 0)
    assert_exact(store, searcher, [ids[1], ids[2], reembedded])


def test_queries_and_batches_never_wait_for_a_build(store, db_path, monkeypatch):
    ids = add(store, clustered(37, 300))
    build(db_path, n_trees=5)
    add(store, clustered(38, 200))
    searcher = open_index(db_path)
    inside, release = threading.Event(), threading.Event()
    write_segment = index._write_segment

    def held_mid_build(*args, **kwargs):
        built = write_segment(*args, **kwargs)
        inside.set()
        release.wait(60)  # the build holds its snapshot and the builder lock here
        return built

    monkeypatch.setattr(index, "_write_segment", held_mid_build)
    indexer = Indexer(db_path, n_trees=5, segment_min=100)
    assert indexer.check()
    assert inside.wait(30)
    try:
        newer = add(store, clustered(39, 30))  # a batch commits
        assert searcher.similar(newer[0])[0][0] in newer  # and is searchable at once
        assert_exact(store, searcher, [ids[0], newer[1]])
        assert not indexer.check()  # one build at a time; the caller does not wait
        assert build(db_path, wait=False)["busy"]  # nor does another process's builder
        assert searcher.status()["segments"] == 1
    finally:
        release.set()
    indexer.join(60)
    status = searcher.status()
    assert (status["segments"], status["unindexed"]) == (2, 30)
    assert_exact(store, searcher, [ids[0], newer[1]])


def test_an_interrupted_build_leaves_nothing_behind(store, db_path, tmp_path):
    add(store, clustered(40, 2000, d=64))
    build(db_path, n_trees=2)
    add(store, clustered(41, 2000, d=64))
    folder = index_path(db_path)
    recorded = sorted(p.name for p in folder.iterdir())
    script = (
        "import sys; from collection.index import build; "
        f"build({str(db_path)!r}, n_trees=2000, full=True, n_jobs=1)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(index.__file__).parent.parent)}
    child = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        wait_until(lambda: any(p.name.endswith(".tmp") for p in folder.iterdir()), timeout=60,
                   message="the build's temporary files")
        wait_until(lambda: any(p.stat().st_size > 1_000_000 for p in folder.glob("*.tmp")), timeout=60)
    finally:
        child.kill()
        child.wait()
    assert any(p.name.endswith(".tmp") for p in folder.iterdir())  # killed mid-build
    legacy = [db_path.parent / f"{db_path.name}.annoy", db_path.parent / f".{db_path.name}.annoy.x1.tmp"]
    for path in legacy:  # what older versions left
        path.write_bytes(b"old")
    Indexer(db_path)  # as `collection add` and the watcher start
    assert sorted(p.name for p in folder.iterdir()) == recorded
    assert not any(p.exists() for p in legacy)


def test_k_is_capped_everywhere(store, db_path):
    ids = add(store, clustered(42, 150))
    searcher = open_index(db_path)
    assert len(searcher.similar(ids[0], MAX_K, -1.0)) == MAX_K
    for bad in (0, -1, 2.5, "3", True):
        with pytest.raises(ValueError, match="whole number of at least 1"):
            searcher.similar(ids[0], bad)
        with pytest.raises(ValueError):
            searcher.similar_to_vector(store.vector(ids[0]), bad)
    conn = sqlite3.connect(db_path)
    search.register_functions(conn, db_path)
    count = lambda k: conn.execute("select json_array_length(similar_images(?, ?, -1))", [ids[0], k]).fetchone()[0]  # noqa: E731
    assert count(100000) == MAX_K  # capped
    assert [count(k) for k in (0, -5, "abc", 2.5)] == [0, 0, 0, 0]  # nothing surprising
    assert count(3) == 3
    conn.close()
    assert serve.MAX_K is MAX_K and index.MAX_K is MAX_K
    with pytest.raises(serve.Refused):
        serve.parse_k(str(MAX_K + 1))
    result = CliRunner().invoke(cli, ["similar", str(ids[0]), "-k", str(MAX_K + 1), "--db", str(db_path)])
    assert result.exit_code == 2 and f"1<=x<={MAX_K}" in result.output


@pytest.fixture
def few_variables(monkeypatch):
    """Every connection the code opens allows 999 variables, SQLite's old default."""
    connect = sqlite3.connect

    def limited(*args, **kwargs):
        conn = connect(*args, **kwargs)
        conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 999)
        return conn

    monkeypatch.setattr(sqlite3, "connect", limited)


def test_id_lists_fit_a_999_variable_limit(tmp_path, few_variables):
    from collection.matches import update_matches
    from collection.store import Store
    store = Store(tmp_path / "c.db")
    assert store.db.conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) == 999
    ids = add(store, clustered(43, 1500, d=8))
    update_matches(store, ids)
    build(store.path, n_trees=3)
    more = add(store, clustered(44, 1200, d=8))
    searcher = open_index(store.path)
    searcher.similar(more[0], MAX_K)
    update_matches(store, more)
    gone = ids[:1100] + more[:100]
    store.mark_deleted(gone)
    update_matches(store, deleted_ids=gone)
    assert searcher.status()["dead"] == 1100
    build(store.path, n_trees=3, full=True)
    lists: dict[int, list[int]] = {}
    for image_id, match_id in store.db.execute("select image_id, match_id from matches order by image_id, rank"):
        lists.setdefault(image_id, []).append(match_id)
    assert not set(lists) & set(gone)
    for image_id in [*ids[1100::40], *more[100::40]]:
        assert lists[image_id] == ids_of(exact(store, image_id, 10)), image_id
    result = CliRunner().invoke(cli, ["similar", str(more[-1]), "-k", str(MAX_K), "--db", str(store.path)])
    assert result.exit_code == 0, result.output
    store.close()


def test_a_query_in_progress_does_not_block_another(store, db_path, monkeypatch):
    ids = add(store, clustered(45, 300))
    build(db_path, n_trees=5)
    searcher = open_index(db_path)
    inside, release = threading.Event(), threading.Event()
    search_segments = Searcher._search_segments

    def held(self, state, vector, want):
        if threading.current_thread().name == "slow":
            inside.set()
            release.wait(30)  # a long query, mid-search
        return search_segments(self, state, vector, want)

    monkeypatch.setattr(Searcher, "_search_segments", held)
    slow = threading.Thread(target=searcher.similar, args=(ids[0],), name="slow")
    slow.start()
    try:
        assert inside.wait(30)
        newer = add(store, clustered(46, 5))  # a commit, so the next query refreshes too
        assert_exact(store, searcher, [ids[1], newer[0]])  # answered while the other is held
    finally:
        release.set()
        slow.join(30)


def test_the_hot_queries_use_indexes(store):
    add(store, clustered(47, 20))
    plans = {
        "live vectors by ids": (search._LIVE_VECTORS, ["[1, 2]", "test-model"]),
        "the log since": (search._CHANGED_SINCE, [0]),
        "lists naming ids": ("select image_id from matches where match_id in (select value from json_each(?))", ["[1]"]),
    }
    for name, (sql, parameters) in plans.items():
        plan = " / ".join(row[3] for row in store.db.execute(f"explain query plan {sql}", parameters))
        assert not re.search(r"SCAN (v|i|matches|vector_changes)\b", plan), (name, plan)
        assert "SEARCH" in plan, (name, plan)


def test_without_segments_a_large_collection_is_searched_from_sqlite_not_held(store, db_path, monkeypatch):
    """A collection from before the index (vectors, no segments): past STREAM_FROM live
    vectors the searcher holds none of them until the first segment is built; queries
    read them from SQLite a chunk at a time and stay exact. Once a segment exists the
    tail holds only what changed after it."""
    monkeypatch.setattr(search, "STREAM_FROM", 100)
    monkeypatch.setattr(search, "STREAM_CHUNK", 64)
    ids = add(store, clustered(40, 300))
    searcher = Searcher(db_path)
    assert_exact(store, searcher, ids[:5], 10)
    assert searcher.vectors_read == 0 and len(searcher._tail) == 0
    assert searcher.vectors_streamed == 5 * 300
    more = add(store, clustered(41, 30))  # written while no segment exists: found at once
    assert ids_of(searcher.similar(more[0], 5)) == ids_of(exact(store, more[0], 5))
    assert searcher.status()["unindexed"] == 330
    build(db_path, n_trees=10)
    later = add(store, clustered(42, 20))
    searcher.similar(later[0])
    streamed = searcher.vectors_streamed
    assert searcher.vectors_read == 20 and len(searcher._tail) == 20  # the batch after the build
    assert_exact(store, searcher, later[:1], 5)
    assert searcher.vectors_streamed == streamed  # no more reads of the whole collection
    searcher.close()


def test_upkeep_of_a_large_collection_before_its_first_segment_asks_no_queries(store, db_path, monkeypatch):
    """Batches written before the first segment of an upgraded collection cost no
    streamed queries; once the build is done, matches catch up with them."""
    from collection.upkeep import Upkeep

    monkeypatch.setattr(search, "STREAM_FROM", 100)
    add(store, clustered(50, 300))
    upkeep = Upkeep(store, refresh_map=False)  # 300 is under its SEGMENT_MIN: no build yet
    upkeep.indexer.segment_min = 10**9  # nor later: the test builds
    searcher = open_index(db_path)
    batch = add(store, clustered(51, 20))
    upkeep.after_batch(batch)
    assert searcher.streamed and searcher.vectors_streamed == 0
    build(db_path, n_trees=10)
    assert not searcher.streamed
    upkeep.after_batch([])
    from collection.matches import wait_for_fill

    wait_for_fill(db_path, 60)
    listed = store.db.execute("select count(distinct image_id) from matches").fetchone()[0]
    assert listed == 320
    upkeep.join()


def test_held_answers_from_one_state_and_remembers_across_commits(store, db_path):
    """Inside ``held`` a thread's queries see the state of its first query (a commit
    meanwhile waits for the block's end), so an image searched there once is not
    searched again; outside it, the next query takes the commit in."""
    searcher = open_index(db_path)
    first = add(store, clustered(40, 60))
    with searcher.held():
        before = searcher.similar(first[0], k=5)
        searches = searcher.searches
        late = add(store, [store.vector(first[0])])  # the same vector: the nearest there is
        assert searcher.similar(first[0], k=5) == before
        assert searcher.searches == searches  # remembered: the state did not change
        assert late[0] not in dict(searcher.similar_many(first[:3], k=20)[first[0]])
    assert late[0] in dict(searcher.similar(first[0], k=5))


def test_similar_many_answers_as_similar_does(store, db_path):
    searcher = open_index(db_path)
    ids = add(store, clustered(41, 400))
    build(db_path, n_trees=5)
    ids += add(store, clustered(42, 30))  # a tail beside the segment
    store.db.execute("update images set deleted_at = '2026-01-01' where id = ?", [ids[5]])
    asked = ids[:40] + ids[-10:] + [10**9]  # the deleted one and one never stored are left out
    many = searcher.similar_many(asked, k=7, min_score=0.1)
    assert set(many) == set(asked) - {ids[5], 10**9}
    searcher._remembered.clear()
    for image_id, found in many.items():
        assert found == searcher.similar(image_id, k=7, min_score=0.1)
