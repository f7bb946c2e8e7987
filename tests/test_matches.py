"""The matches table: per-batch upkeep that touches only what a batch changes, and a
first fill that runs in the background, resumably, never inside an add."""

from __future__ import annotations

import threading

from collection import matches
from collection.index import build, open_index
from collection.matches import fill, fill_in_background, stop_filling, update_matches, wait_for_fill
from collection.upkeep import Upkeep
from conftest import wait_until
from test_index import add, assert_matches_current, clustered, stored_matches


def test_a_batch_rewrites_only_its_images_and_the_lists_they_enter(store, db_path):
    ids = add(store, clustered(50, 400, d=16, clusters=20))
    update_matches(store, ids)
    build(db_path, n_trees=5)
    before = stored_matches(store)
    batch = add(store, clustered(51, 10, d=16, clusters=20))
    written = update_matches(store, batch)
    after = stored_matches(store)
    changed = {i for i in before if before[i] != after[i]}
    assert written == len(batch) + len(changed)
    assert all(set(m for m, _ in after[i]) & set(batch) for i in changed)  # only lists a new image entered
    assert len(changed) < 100  # not every list
    assert_matches_current(store)


def test_an_unfilled_table_is_filled_in_the_background(store, db_path, monkeypatch):
    monkeypatch.setattr(matches, "FILL_AT_ONCE", 100)
    monkeypatch.setattr(matches, "FILL_CHUNK", 50)
    ids = add(store, clustered(52, 600, d=16))  # a collection from before the matches table
    batch = add(store, clustered(53, 5, d=16))
    gate = threading.Event()
    similar = open_index(db_path).similar
    monkeypatch.setattr(open_index(db_path), "similar", lambda *a, **k: (gate.wait(30), similar(*a, **k))[1])
    assert update_matches(store, batch) == 0  # returns at once: the fill runs elsewhere
    assert store.db["matches"].count == 0
    gate.set()
    wait_for_fill(db_path, 60)
    assert store.get_meta("matches_seq") is not None and store.get_meta("matches_fill") is None
    assert_matches_current(store)
    later = add(store, clustered(54, 5, d=16))
    assert update_matches(store, later) >= 5  # incremental from now on
    assert_matches_current(store)
    assert set(stored_matches(store)) == set(ids + batch + later)


def test_a_stopped_fill_resumes_where_it_stopped(store, db_path, monkeypatch):
    monkeypatch.setattr(matches, "FILL_CHUNK", 40)
    add(store, clustered(55, 200, d=16))
    stop = threading.Event()
    similar = open_index(db_path).similar
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 90:
            stop.set()  # as `collection add` exits: stop after this chunk
        return similar(*args, **kwargs)

    monkeypatch.setattr(open_index(db_path), "similar", counted)
    assert fill(store, stop=stop) == 120  # three chunks, then stopped
    assert store.get_meta("matches_seq") is None and store.get_meta("matches_fill") is not None
    add(store, clustered(56, 10, d=16))  # changes while unfilled are caught up at the end
    calls.clear()
    assert fill(store) >= 90
    assert min(calls[:90]) > 120  # resumed after the chunks already written
    assert_matches_current(store)


def test_upkeep_join_stops_a_background_fill_after_its_chunk(store, db_path, monkeypatch):
    monkeypatch.setattr(matches, "FILL_CHUNK", 10)
    add(store, clustered(57, 300, d=16))
    upkeep = Upkeep(store, refresh_map=False)
    gate, calls = threading.Event(), []
    similar = open_index(db_path).similar

    def held(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 15:
            gate.wait(30)  # mid-way through the second chunk
        return similar(*args, **kwargs)

    monkeypatch.setattr(open_index(db_path), "similar", held)
    assert fill_in_background(db_path)
    wait_until(lambda: len(calls) >= 15, message="the fill to reach its second chunk")
    stop_filling(db_path, timeout=0)  # asked to stop while held mid-chunk
    gate.set()
    upkeep.join()  # waits for the chunk in hand, not the whole fill
    assert store.get_meta("matches_seq") is None and store.get_meta("matches_fill") is not None
    assert len(stored_matches(store)) == 20  # two whole chunks; the rest resumes next time


def test_an_entered_list_keeps_the_rows_above_its_new_entries(store, db_path, monkeypatch):
    """Older lists are read a chunk at a time and rewritten only from the first rank
    that changed: the rows above it are the same rows (same rowid), and the table ends
    as a fresh computation would leave it."""
    monkeypatch.setattr(matches, "READ_LISTS", 7)  # several chunks even for a small batch
    vectors = clustered(58, 320, d=16, clusters=15)
    ids = add(store, vectors[:300])
    update_matches(store, ids)
    build(db_path, n_trees=5)

    def rows():
        return {
            (image_id, rank): (rowid, match_id)
            for rowid, image_id, rank, match_id in store.db.execute("select rowid, image_id, rank, match_id from matches")
        }

    before = rows()
    batch = add(store, vectors[300:])  # from the same clusters: they enter older lists
    update_matches(store, batch)
    after = rows()
    assert_matches_current(store)
    entered = {image_id for (image_id, rank), (_, match_id) in after.items() if image_id in ids and match_id in batch}
    assert len(entered) > 7  # more lists than one chunk took new images in
    kept = rewritten = 0
    for image_id in entered:
        first_new = min(rank for (i, rank), (_, match_id) in after.items() if i == image_id and match_id in batch)
        for (i, rank), (rowid, match_id) in after.items():
            if i != image_id:
                continue
            if rank < first_new:
                assert (rowid, match_id) == before[(i, rank)]  # untouched
                kept += 1
            else:
                rewritten += 1
    assert kept > 0 and rewritten > 0
