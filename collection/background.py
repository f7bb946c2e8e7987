"""Long catch-up work run in a thread beside ingest: at most one job of a kind per
database in this process, each with its own connection, told to stop between chunks
(it resumes from its progress next time). The matches fill and the first duplicate
grouping run this way, never inside an ``add``."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Callable

from .store import Store

log = logging.getLogger(__name__)


class Jobs:
    """The running jobs of one kind, by database."""

    def __init__(self, name: str):
        self.name = name
        self._running: dict[str, tuple[threading.Thread, threading.Event]] = {}
        self._lock = threading.Lock()

    def start(self, db_path: str | Path, work: Callable[[Store, threading.Event], object]) -> bool:
        """Run ``work(store, stop)`` in a thread unless one runs for this database; True
        when started. A failure is logged; the next batch starts the job again."""
        key = os.path.realpath(db_path)
        with self._lock:
            running = self._running.get(key)
            if running is not None and running[0].is_alive():
                return False
            stop = threading.Event()

            def run() -> None:
                store = Store(key)
                try:
                    work(store, stop)
                except Exception:
                    log.exception("%s of %s failed", self.name, key)
                finally:
                    store.close()

            thread = threading.Thread(target=run, name=self.name, daemon=True)
            self._running[key] = (thread, stop)
            thread.start()
            return True

    def stop(self, db_path: str | Path, timeout: float | None = None) -> None:
        """Tell the job to stop after its current chunk, and wait up to ``timeout``."""
        running = self._running.get(os.path.realpath(db_path))
        if running is not None:
            running[1].set()
            running[0].join(timeout)

    def wait(self, db_path: str | Path, timeout: float | None = None) -> None:
        running = self._running.get(os.path.realpath(db_path))
        if running is not None:
            running[0].join(timeout)
