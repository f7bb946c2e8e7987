"""What follows each committed batch, so that nothing derived lags behind the rows:
similar-image search and ``matches`` (index.py) and the collection map (projection.py)."""

from __future__ import annotations

from . import duplicates, projection
from .index import Indexer, update_matches
from .store import Store


class Upkeep:
    """Call ``after_batch`` with the ids each batch wrote and ``after_delete`` with the
    ids marked deleted; ``join`` before exiting lets a background index build finish."""

    def __init__(self, store: Store, refresh_map: bool = True):
        self.store = store
        self.indexer = Indexer(store.path)
        # A long-running daemon recomputes the map when enough has changed; a one-off
        # `collection add` only places its images, since its process would not outlive
        # the recompute.
        self.refresh_map = refresh_map

    def after_batch(self, ids: list[int]) -> None:
        update_matches(self.store, ids)
        self.indexer.check()
        projection.place_new(self.store, ids)
        duplicates.update(self.store, ids)
        if self.refresh_map:
            projection.refresh_in_background(self.store)

    def after_delete(self, ids: list[int]) -> None:
        update_matches(self.store, deleted_ids=ids)
        duplicates.update(self.store, ids)

    def join(self) -> None:
        self.indexer.join()
