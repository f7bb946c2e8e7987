"""Duplicate groups: the three tiers, incremental upkeep against regrouping from scratch,
no chaining, decisions, the review page and its permission, the CLI, and a browser check."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from collection import duplicates
from collection.cli import cli
from collection.store import Store
from conftest import CHROMIUM, CHROMIUM_ARGS, free_port, needs_chromium, responds, wait_until

ROOT = Path(__file__).resolve().parent.parent
MODEL = "test-vectors"
DIMENSIONS = 16
NEAR, SIMILAR = 0.90, 0.60


@pytest.fixture(autouse=True)
def thresholds(monkeypatch):
    monkeypatch.setenv("COLLECTION_NEAR_DUPLICATE", str(NEAR))
    monkeypatch.setenv("COLLECTION_SIMILAR", str(SIMILAR))


def unit(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return (v / np.linalg.norm(v)).astype("<f4")


def angled(degrees: float, plane: int = 0) -> np.ndarray:
    """A unit vector at ``degrees`` in the plane of axes (2 * plane, 2 * plane + 1)."""
    v = np.zeros(DIMENSIONS)
    v[2 * plane] = np.cos(np.radians(degrees))
    v[2 * plane + 1] = np.sin(np.radians(degrees))
    return unit(v)


def put(store: Store, name: str, vector, sha256: str | None = None, size=(100, 80), fmt="JPEG",
        folder: Path | None = None) -> int:
    """One image row with a given vector, as ingest would write it (no file needed)."""
    folder = folder or store.path.parent
    metadata = {"sha256": sha256 or f"sha-{name}", "size": size[0] * size[1], "width": size[0],
                "height": size[1], "format": fmt, "taken_at": None}
    with store.db.atomic():
        return store.save_image(str(folder / name), 1.0, metadata, vector, [("n0", "thing", 0.9)], MODEL)


def rows(store: Store) -> set[tuple]:
    return {
        (r["tier"], r["group_id"], r["image_id"], r["is_keeper"], round(r["score"], 5))
        for r in store.db["duplicate_groups"].rows
    }


def grouped(store: Store, tier: str) -> list[set[int]]:
    found: dict[int, set[int]] = {}
    for r in store.db["duplicate_groups"].rows_where("tier = ?", [tier]):
        found.setdefault(r["group_id"], set()).add(r["image_id"])
    return sorted(found.values(), key=min)


@pytest.fixture
def vstore(store):
    store.claim_model(MODEL, DIMENSIONS, "fp32")
    return store


def test_no_chaining_through_an_intermediate(vstore):
    # A ~ B and B ~ C at 0.92, but A and C only 0.69: never one near-duplicate group.
    a = put(vstore, "a.jpg", angled(0))
    b = put(vstore, "b.jpg", angled(23.07))
    c = put(vstore, "c.jpg", angled(46.14))
    duplicates.update(vstore, [a, b, c])
    assert grouped(vstore, "near") == [{a, b}]
    assert grouped(vstore, "similar") == [{a, b, c}]  # 0.69 >= 0.60: look-alikes
    # Every member within the threshold of its group's representative (the group id).
    for r in vstore.db["duplicate_groups"].rows_where("tier = 'near'"):
        rep = vstore.vector(r["group_id"])
        assert float(np.dot(rep, vstore.vector(r["image_id"]))) >= NEAR - 1e-6


def test_tiers_and_suggested_keeper(vstore):
    original = put(vstore, "photo.jpg", angled(0), sha256="same", size=(4000, 3000))
    copy = put(vstore, "copy.jpg", angled(0), sha256="same", size=(4000, 3000))
    small = put(vstore, "small.jpg", angled(3), size=(800, 600))
    png = put(vstore, "photo.png", angled(2), size=(4000, 3000), fmt="PNG")
    other = put(vstore, "other.jpg", angled(0, plane=1))
    duplicates.update(vstore)
    assert grouped(vstore, "exact") == [{original, copy}]
    assert grouped(vstore, "near") == [{original, copy, small, png}]
    keepers = {r["tier"]: r["image_id"] for r in vstore.db["duplicate_groups"].rows_where("is_keeper")}
    # Most pixels, then an original format (JPEG before PNG), then the oldest (the first added).
    assert keepers == {"exact": original, "near": original, "similar": original}
    assert other not in {r["image_id"] for r in vstore.db["duplicate_groups"].rows}
    scores = {r["image_id"]: r["score"] for r in vstore.db["duplicate_groups"].rows_where("tier = 'near'")}
    assert scores[original] == pytest.approx(1.0) and scores[small] == pytest.approx(np.cos(np.radians(3)), abs=1e-5)


def test_updates_equal_regrouping_from_scratch(vstore, tmp_path):
    """Adds, changes, copies, moves and deletes, each followed by the per-batch update:
    the table always equals a regrouping from scratch."""
    rng = np.random.default_rng(7)
    centres = [unit(rng.normal(size=DIMENSIONS)) for _ in range(6)]

    def near(centre, spread):
        return unit(centre + rng.normal(scale=spread, size=DIMENSIONS))

    ids: list[int] = []
    counter = iter(range(10_000))

    def check():
        incremental = rows(vstore)
        duplicates.regroup(vstore)
        assert rows(vstore) == incremental
        return incremental

    for step in range(12):
        batch = []
        for _ in range(int(rng.integers(3, 9))):  # adds, around a few centres
            centre = centres[int(rng.integers(len(centres)))]
            batch.append(put(vstore, f"{next(counter)}.jpg", near(centre, float(rng.choice([0.05, 0.2, 0.5])))))
        if ids:  # a changed file: same id, new vector and bytes
            changed = ids[int(rng.integers(len(ids)))]
            row = vstore.by_id(changed)
            if row["deleted_at"] is None:
                batch.append(put(vstore, Path(row["path"]).name, near(centres[int(rng.integers(6))], 0.1)))
        if len(ids) > 4:  # an exact copy of a live image, as ingest's reuse writes it
            source = vstore.by_id(ids[int(rng.integers(len(ids)))])
            if source["deleted_at"] is None:
                with vstore.db.atomic():
                    batch.append(vstore.copy(source["id"], str(tmp_path / f"copy-{next(counter)}.jpg"), 2.0))
        duplicates.update(vstore, batch)
        ids.extend(i for i in batch if i not in ids)
        if step % 2:  # deletions, representatives among them
            gone = [int(i) for i in rng.choice(ids, size=3, replace=False)]
            with vstore.db.atomic():
                vstore.mark_deleted(gone)
            duplicates.update(vstore, gone)
        if step == 5:  # a row removed for good, as a move onto its path does
            with vstore.db.atomic():
                vstore.delete_rows([ids[0]])
            duplicates.update(vstore)  # no ids given: the change log names it
        check()
    final = check()
    assert {t for t, *_ in final} == {"exact", "near", "similar"}  # every tier has groups to compare
    assert len(final) > 20


def test_added_image_never_moves_others(vstore):
    """Stable as images are added: existing members keep their groups."""
    first = [put(vstore, f"{i}.jpg", angled(i * 5.0)) for i in range(6)]
    duplicates.update(vstore, first)
    before = {(t, g, i) for t, g, i, *_ in rows(vstore)}
    later = [put(vstore, f"late-{i}.jpg", angled(i * 7.0 + 1)) for i in range(6)]
    duplicates.update(vstore, later)
    after = {(t, g, i) for t, g, i, *_ in rows(vstore)}
    assert {entry for entry in after if entry[2] in first} >= before


def test_decisions_survive_regrouping(vstore):
    a = put(vstore, "a.jpg", angled(0), size=(100, 80))
    b = put(vstore, "b.jpg", angled(2), size=(200, 160))
    c = put(vstore, "c.jpg", angled(4), size=(50, 40))
    d = put(vstore, "d.jpg", angled(0, plane=2))
    e = put(vstore, "e.jpg", angled(3, plane=2))
    duplicates.update(vstore)
    conn = vstore.db.conn
    (group,) = duplicates.groups(conn, "near", [a])
    assert group["keeper_id"] == b  # the most pixels
    with vstore.db.atomic():
        duplicates.decide(conn, "near", a, a, "keep", "root")
        duplicates.decide(conn, "near", a, c, "not_duplicate", "root")
        duplicates.decide(conn, "near", d, None, "ignore", "root")
    duplicates.regroup(vstore)
    put(vstore, "f.jpg", angled(10, plane=3))  # unrelated arrivals and a from-scratch pass
    duplicates.update(vstore)
    duplicates.regroup(vstore)
    (group,) = duplicates.groups(conn, "near", [a])
    roles = {m["image_id"]: m["role"] for m in group["members"]}
    assert roles == {a: "keeper", b: "duplicate", c: "not_duplicate"}
    assert group["keeper_id"] == a and group["wasted_bytes"] == 200 * 160
    assert duplicates.group_ids(conn, "near") == [a]  # the ignored group is hidden ...
    assert duplicates.group_ids(conn, "near", ignored=True) == [a, d]  # ... unless asked for
    assert {m["role"] for m in duplicates.groups(conn, "near", [d])[0]["members"]} == {"ignored"}
    with pytest.raises(duplicates.DuplicatesError):
        duplicates.decide(conn, "near", a, e, "keep", "root")  # not in that group
    with pytest.raises(duplicates.DuplicatesError):
        duplicates.decide(conn, "near", a, a, "delete", "root")  # no such decision


def test_thresholds_from_the_environment(vstore, monkeypatch):
    a = put(vstore, "a.jpg", angled(0))
    b = put(vstore, "b.jpg", angled(20))  # cosine 0.94
    duplicates.update(vstore)
    assert grouped(vstore, "near") == [{a, b}]
    monkeypatch.setenv("COLLECTION_NEAR_DUPLICATE", "0.95")
    duplicates.update(vstore)  # other thresholds: regrouped from scratch
    assert grouped(vstore, "near") == []
    monkeypatch.setenv("COLLECTION_NEAR_DUPLICATE", "nonsense")
    with pytest.raises(duplicates.DuplicatesError, match="COLLECTION_NEAR_DUPLICATE"):
        duplicates.update(vstore)
