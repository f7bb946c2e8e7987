"""The store's write transactions (store._Database.atomic)."""

from __future__ import annotations

import threading

from collection.store import Store


def test_a_write_transaction_outlasts_a_commit_beside_it(tmp_path):
    """A transaction that reads and then writes, while another connection wants to
    commit in between (as `collection add` does beside the background grouping of
    duplicates): the other waits for the write lock, and both land. With a deferred
    BEGIN the first would fail at its write with "database is locked"."""
    db_path = tmp_path / "collection.db"
    Store(db_path).close()
    store = Store(db_path)
    finished = threading.Event()
    errors = []

    def beside() -> None:
        other = Store(db_path)
        try:
            with other.db.atomic():
                other.set_meta("beside", "1")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
        finally:
            other.close()
            finished.set()

    with store.db.atomic():
        store.get_meta("anything")  # a read first: a deferred transaction's snapshot starts here
        thread = threading.Thread(target=beside)
        thread.start()
        assert not finished.wait(0.5)  # it waits for our write lock
        store.set_meta("here", "1")
    thread.join(10)
    assert not errors
    assert store.get_meta("here") == "1" and store.get_meta("beside") == "1"
    store.close()


def test_nested_blocks_are_savepoints(tmp_path):
    store = Store(tmp_path / "collection.db")
    with store.db.atomic():
        store.set_meta("kept", "1")
        try:
            with store.db.atomic():
                store.set_meta("undone", "1")
                raise RuntimeError
        except RuntimeError:
            pass
    assert store.get_meta("kept") == "1" and store.get_meta("undone") is None
    store.close()
