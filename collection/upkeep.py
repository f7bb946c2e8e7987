"""What follows each committed batch, so that nothing derived lags behind the rows:
similar-image search and its index (index.py), ``matches`` (matches.py) and the
collection map (projection.py). Each step costs what the batch holds; the index builds,
a first fill of ``matches`` and a first grouping of duplicates run in background threads
that nothing waits for."""

from __future__ import annotations

import threading

from . import duplicates, projection
from .index import Indexer
from .matches import stop_filling, update_matches
from .search import open_index
from .store import Store

# The newest entries of the two change logs that the upkeep reads, in one statement (so
# one snapshot): vector_changes (matches, the index) and duplicate_changes.
_LOG_ENDS = (
    "select (select seq from sqlite_sequence where name = 'vector_changes'), "
    "(select seq from sqlite_sequence where name = 'duplicate_changes')"
)


class Upkeep:
    """Call ``after_batch`` with the ids each batch wrote and ``after_delete`` with the
    ids marked deleted; ``join`` before exiting. Exiting waits for no index build: one in
    progress is abandoned with the process and its temporaries are removed at the next
    start (searches stay exact meanwhile); a background fill of ``matches`` or first
    grouping of duplicates stops after its chunk and resumes next time; a map recompute
    gives up without writing."""

    def __init__(self, store: Store, refresh_map: bool = True, stopping: threading.Event | None = None):
        self.store = store
        # A bad threshold in the environment stops the start with its message
        # (DuplicatesError), not every batch's upkeep later.
        duplicates.thresholds(store.model)
        self.indexer = Indexer(store.path)
        self.indexer.check()  # a collection from before segments gets its index at once
        # A long-running daemon recomputes the map when enough has changed; a one-off
        # `collection add` only places its images, since its process would not outlive
        # the recompute.
        self.refresh_map = refresh_map
        # Set by the owner's stop request (or by join): a map recompute gives up at once.
        self._stopping = stopping or threading.Event()

    def after_batch(self, ids: list[int]) -> None:
        searcher = open_index(self.store.path)
        # Every step searches for the same new images: one state for all of them, so each
        # image is searched once (see Searcher.held).
        with searcher.held():
            if searcher.streamed:
                # A large collection from before the index, until its first segment (started
                # at once) is built: each query would read every vector, so what asks many
                # waits. The change logs keep what matches and duplicates must catch up
                # with; the map places these images at its next recompute.
                self.indexer.check()
                return
            # What to do is what the change logs name (``ids`` are in them), both read
            # as of one commit: matches and duplicates then work on the same images,
            # all in the searcher's held state, whatever the writer (which does not
            # wait for the upkeep, see ingest.Behind) commits meanwhile; the next call
            # takes that, and not again what this one did.
            vectors_upto, duplicates_upto = self.store.db.execute(_LOG_ENDS).fetchone()
            update_matches(self.store, upto=vectors_upto or 0)
            self.indexer.check()
            projection.place_new(self.store, ids)
            duplicates.update(self.store, upto=duplicates_upto or 0)
        if self.refresh_map:
            projection.refresh_in_background(self.store, self._stopping)

    def after_delete(self, ids: list[int]) -> None:
        update_matches(self.store, deleted_ids=ids)
        duplicates.update(self.store, ids)
        self.indexer.check()  # deleted copies count toward compaction

    def join(self) -> None:
        self._stopping.set()  # not waited for: the map is recomputed again after the next start
        stop_filling(self.store.path)
        duplicates.stop_regrouping(self.store.path)
