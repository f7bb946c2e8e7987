"""The ``matches`` table: each live image's nearest neighbours, kept current per batch.

After a batch only the changed images and the lists they enter or leave are rewritten,
found through the ``vector_changes`` log and the index on ``matches.match_id``. A table
that was never filled (a new database, or one from before this table) is filled by a
background thread in short transactions, resumable across restarts, never inside an
``add``; incremental updates take over once it is done.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Iterable

from .background import Jobs
from .index import last_change, prune_changes
from .search import MATCHES_K, MIN_SCORE, NEIGHBOURHOOD, open_index
from .store import Store

# A new image enters an older image's top-k only if that image is among the new one's
# nearest REVERSE_REACH: exact for any image that is not an outlier far from the rest.
REVERSE_REACH = NEIGHBOURHOOD
# A table this small (in live images) is filled at once: it costs about one batch.
FILL_AT_ONCE = 2000
FILL_CHUNK = 500  # images per transaction of a background fill
READ_LISTS = 1000  # older lists read at once while new images enter them: 10,000 rows at most

log = logging.getLogger(__name__)
_locks: dict[str, threading.Lock] = {}  # one writer of a database's matches per process
_fillers = Jobs("filling the matches table")
_registry_lock = threading.Lock()


def _lock_for(db_path: str | Path) -> threading.Lock:
    with _registry_lock:
        return _locks.setdefault(os.path.realpath(db_path), threading.Lock())


def update_matches(
    store: Store,
    new_ids: Iterable[int] = (),
    deleted_ids: Iterable[int] = (),
    k: int = MATCHES_K,
    min_score: float = MIN_SCORE,
    upto: int | None = None,
) -> int:
    """Bring the ``matches`` table up to date after committed writes (the change log up
    to ``upto``, or to its newest entry); returns how many images' lists were rewritten.

    New and changed images get their own top-k; older images whose top-k a new one
    enters take it in; lists that named a deleted or changed image are refilled. The
    ids given are joined by every id the change log names since the last update, so a
    change made elsewhere (a move that dropped a row, another process) is caught too.
    Call it after the writes are committed: the searcher reads through its own
    connection. While the table has never been filled, a small collection is filled at
    once and a larger one in the background (returning 0).
    """
    if store.get_meta("matches_seq") is None:
        live = store.db.execute(
            "select count(*) from (select 1 from images where deleted_at is null limit ?)", [FILL_AT_ONCE + 1]
        ).fetchone()[0]
        if live > FILL_AT_ONCE:
            fill_in_background(store.path, k, min_score)
            return 0
        return fill(store, k, min_score)
    with _lock_for(store.path):
        return _update(store, {int(i) for i in (*new_ids, *deleted_ids)}, k, min_score, upto)


def _update(store: Store, changed: set[int], k: int, min_score: float, upto: int | None = None) -> int:
    db = store.db
    done = int(store.get_meta("matches_seq"))
    upto = last_change(db.conn) if upto is None else upto
    changed.update(
        r[0] for r in db.execute("select image_id from vector_changes not indexed where seq > ? and seq <= ?", [done, upto])
    )
    if not changed:
        return 0
    ids = json.dumps(sorted(changed))
    listing = {
        r[0]
        for r in db.execute("select image_id from matches where match_id in (select value from json_each(?))", [ids])
    }
    searcher = open_index(store.path)
    lists: dict[int, list[tuple[int, float]]] = {}
    reach: dict[int, list[tuple[int, float]]] = {}
    found_for = searcher.similar_many(sorted(changed), max(k, REVERSE_REACH), min_score)
    found_for.update(searcher.similar_many(sorted(listing - changed), k, min_score))
    for image_id in sorted(changed | listing):
        found = found_for.get(image_id)
        if found is None:  # deleted: its own list goes
            continue
        lists[image_id] = found[:k]
        if image_id in changed:
            reach[image_id] = found
    with db.atomic():
        redo = json.dumps(sorted(changed | listing))
        db.execute("delete from matches where image_id in (select value from json_each(?))", [redo])
        for image_id, found in lists.items():
            _write_list(db, image_id, found)
        # Each older list the new images may enter, with what enters it in turn: read
        # and written once, however many of the batch's images enter it.
        entering: dict[int, list[tuple[int, float]]] = {}
        for new_id, found in reach.items():
            for other, score in found:
                if other not in lists:
                    entering.setdefault(other, []).append((new_id, score))
        merged = set()
        older = sorted(entering)
        for start in range(0, len(older), READ_LISTS):  # up to 100 lists per new image: in chunks
            chunk = older[start : start + READ_LISTS]
            stored = _read_lists(db, chunk)
            merged.update(other for other in chunk if _take_in(db, other, stored.get(other, []), entering[other], k))
        _finish(store, upto)
    return len(lists) + len(merged)


def fill(store: Store, k: int = MATCHES_K, min_score: float = MIN_SCORE, stop: threading.Event | None = None) -> int:
    """Compute every live image's list, FILL_CHUNK images per transaction, resuming where
    an earlier fill stopped (``matches_fill`` in collection_meta), then catch up with the
    changes made meanwhile. Returns how many lists were written; stops early (leaving the
    table marked unfilled) when ``stop`` is set."""
    with _lock_for(store.path):
        progress = json.loads(store.get_meta("matches_fill") or "null")
        if progress is None:
            progress = {"seq": last_change(store.db.conn), "after": 0}
            store.set_meta("matches_fill", json.dumps(progress))
        searcher = open_index(store.path)
        written = 0
        while stop is None or not stop.is_set():
            ids = [
                r[0]
                for r in store.db.execute(
                    "select v.image_id from vectors v join images i on i.id = v.image_id "
                    "where i.deleted_at is null and v.image_id > ? order by v.image_id limit ?",
                    [progress["after"], FILL_CHUNK],
                )
            ]
            if not ids:
                break
            lists = {}
            for image_id in ids:
                try:
                    lists[image_id] = searcher.similar(image_id, k, min_score)
                except KeyError:  # deleted since: the log brings it to the catch-up
                    pass
            progress["after"] = ids[-1]
            with store.db.atomic():
                store.db.execute(
                    "delete from matches where image_id in (select value from json_each(?))", [json.dumps(ids)]
                )
                for image_id, found in lists.items():
                    _write_list(store.db, image_id, found)
                store.set_meta("matches_fill", json.dumps(progress))
            written += len(lists)
        else:
            return written
        with store.db.atomic():
            # Lists of images deleted before the fill reached them, from an older table.
            store.db.execute(
                "delete from matches where image_id not in (select id from images where deleted_at is null)"
            )
            store.db.execute("delete from collection_meta where key = 'matches_fill'")
            _finish(store, progress["seq"])
        return written + _update(store, set(), k, min_score)


def fill_in_background(db_path: str | Path, k: int = MATCHES_K, min_score: float = MIN_SCORE) -> bool:
    """Start ``fill`` in a thread with its own connection unless one runs; True when started."""
    return _fillers.start(db_path, lambda store, stop: fill(store, k, min_score, stop))


def stop_filling(db_path: str | Path, timeout: float | None = None) -> None:
    """Stop a background fill after its current chunk (it resumes next time) and wait."""
    _fillers.stop(db_path, timeout)


def wait_for_fill(db_path: str | Path, timeout: float | None = None) -> None:
    _fillers.wait(db_path, timeout)


def _write_list(db, image_id: int, found: list[tuple[int, float]], first_rank: int = 1) -> None:
    """Insert ``found`` as the image's list from ``first_rank`` down."""
    db.conn.executemany(
        "insert into matches (image_id, match_id, rank, score) values (?, ?, ?, ?)",
        [(image_id, match_id, rank, score) for rank, (match_id, score) in enumerate(found, start=first_rank)],
    )


def _read_lists(db, image_ids: list[int]) -> dict[int, list[tuple[int, float]]]:
    """The stored lists of these images, (match_id, score) by rank, in one statement."""
    lists: dict[int, list[tuple[int, float]]] = {}
    for image_id, match_id, score in db.execute(
        "select image_id, match_id, score from matches where image_id in (select value from json_each(?)) "
        "order by image_id, rank",
        [json.dumps(image_ids)],
    ):
        lists.setdefault(image_id, []).append((match_id, score))
    return lists


def _take_in(db, image_id: int, stored: list[tuple[int, float]], candidates: list[tuple[int, float]], k: int) -> bool:
    """Put each (new_id, score) into ``image_id``'s ``stored`` list in turn if it ranks
    within the top k there; if any did, rewrite the list from the first rank that changed
    (the ranks above it keep their rows)."""
    current = stored
    for new_id, score in candidates:
        others = [(match_id, s) for match_id, s in current if match_id != new_id]
        if len(others) >= k and (-score, new_id) > (-others[-1][1], others[-1][0]):
            continue
        current = sorted([*others, (new_id, score)], key=lambda pair: (-pair[1], pair[0]))[:k]
    if current is stored:
        return False
    same = next((i for i, (a, b) in enumerate(zip(stored, current)) if a != b), min(len(stored), len(current)))
    db.execute("delete from matches where image_id = ? and rank > ?", [image_id, same])
    _write_list(db, image_id, current[same:], first_rank=same + 1)
    return True


def _finish(store: Store, upto: int) -> None:
    done = store.get_meta("matches_seq")
    store.set_meta("matches_seq", max(upto, int(done or 0)))
    prune_changes(store.db.conn)
