from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from collection import store as store_module
from collection.ingest import Ingester, iter_files
from collection.store import Store, StoreError
from conftest import make_image


def _add(store, model, paths, **kw):
    return Ingester(store, model, **kw).add([str(p) for p in paths])


def test_stored_vectors_are_unit_length_little_endian_float32(store, small_model, images_dir):
    paths = [make_image(images_dir / f"{i}.png", seed=i) for i in range(3)]
    summary = _add(store, small_model, paths)
    assert summary.added == 3
    for row in store.db.query("select vector, model from vectors"):
        assert row["model"] == small_model.model_id
        assert len(row["vector"]) == small_model.dimensions * 4
        vector = np.frombuffer(row["vector"], dtype="<f4")
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    images = list(store.db.query("select * from images order by id"))
    assert [r["path"] for r in images] == [str(p) for p in paths]
    labels = list(store.db.query("select * from labels where image_id = ? order by rank", [images[0]["id"]]))
    assert [r["rank"] for r in labels] == [1, 2, 3, 4, 5]
    assert images[0]["top_label"] == labels[0]["label"]
    assert store.db["thumbnails"].count == 3


def test_readding_unchanged_files_runs_no_model(store, counting_model, images_dir):
    paths = [make_image(images_dir / f"{i}.jpg", seed=i) for i in range(4)]
    first = _add(store, counting_model, paths, batch_size=2)
    assert first.added == 4
    assert counting_model.calls == [2, 2]
    second = _add(store, counting_model, paths)
    assert second.unchanged == 4
    assert counting_model.calls == [2, 2]
    # touched but identical bytes: hashed, not embedded
    os.utime(paths[0], (1_000_000, 1_000_000))
    third = _add(store, counting_model, paths)
    assert (third.unchanged, counting_model.calls) == (4, [2, 2])


def test_rename_keeps_id_and_runs_no_model(store, counting_model, images_dir):
    old = make_image(images_dir / "old.png", seed=1)
    _add(store, counting_model, [old])
    image_id = store.by_path(str(old))["id"]
    new = images_dir / "sub" / "new.png"
    new.parent.mkdir()
    old.rename(new)
    summary = _add(store, counting_model, [new])
    assert summary.reused == 1
    assert counting_model.calls == [1]
    assert store.by_path(str(new))["id"] == image_id
    assert store.by_path(str(old)) is None
    assert len(store.labels_for(image_id)) == 5


def test_a_copy_reuses_the_vector_under_a_new_id(store, counting_model, images_dir):
    original = make_image(images_dir / "a.png", seed=1)
    _add(store, counting_model, [original])
    copy = shutil.copy(original, images_dir / "b.png")
    summary = _add(store, counting_model, [copy])
    assert summary.reused == 1 and counting_model.calls == [1]
    a, b = store.by_path(str(original)), store.by_path(str(copy))
    assert a["id"] != b["id"] and a["sha256"] == b["sha256"]
    assert np.array_equal(store.vector(a["id"]), store.vector(b["id"]))


def test_a_changed_file_is_embedded_again_in_place(store, counting_model, images_dir):
    path = make_image(images_dir / "x.png", seed=1)
    _add(store, counting_model, [path])
    before = store.by_path(str(path))
    vector_before = store.vector(before["id"])
    make_image(path, seed=2, size=(80, 60))
    os.utime(path, (before["mtime"] + 10, before["mtime"] + 10))
    summary = _add(store, counting_model, [path])
    after = store.by_path(str(path))
    assert summary.updated == 1 and counting_model.calls == [1, 1]
    assert after["id"] == before["id"]
    assert (after["width"], after["sha256"]) != (before["width"], before["sha256"])
    assert not np.array_equal(vector_before, store.vector(after["id"]))
    assert store.db["images"].count == 1


def test_bad_files_become_failures_and_the_run_goes_on(store, counting_model, images_dir):
    for i in range(3):
        make_image(images_dir / f"good{i}.png", seed=i)
    (images_dir / "text.jpg").write_text("not a picture")
    (images_dir / "empty.png").write_bytes(b"")
    whole = make_image(images_dir / "whole.jpg", size=(300, 200)).read_bytes()
    (images_dir / "cut.jpg").write_bytes(whole[:400])
    paths = sorted(images_dir.iterdir())
    summary = _add(store, counting_model, paths)
    assert (summary.added, summary.failed) == (4, 3)  # whole.jpg is fine too
    failures = {os.path.basename(r["path"]): r["error"] for r in store.db["failures"].rows}
    assert set(failures) == {"text.jpg", "empty.png", "cut.jpg"}
    assert "not an image" in failures["text.jpg"]
    assert "empty" in failures["empty.png"]
    assert "truncated" in failures["cut.jpg"]
    # unchanged failures are not retried; a fixed file is, and its failure row goes
    again = _add(store, counting_model, paths)
    assert again.failed == 3 and store.db["failures"].get(str(images_dir / "text.jpg"))["attempts"] == 1
    make_image(images_dir / "text.jpg", seed=9, fmt="JPEG")
    fixed = _add(store, counting_model, [images_dir / "text.jpg"])
    assert fixed.added == 1
    assert store.failure(str(images_dir / "text.jpg")) is None


def test_every_awkward_input_ends_as_a_row_or_a_failure(store, small_model, images_dir):
    """The issue's list of bad inputs: each is either a correct images row or a clear failure."""
    Image.new("CMYK", (50, 40), (10, 200, 30, 0)).save(images_dir / "cmyk.jpg")
    Image.new("RGBA", (50, 40), (255, 0, 0, 100)).save(images_dir / "alpha.png")
    Image.fromarray(np.full((40, 50), 40000, np.uint16)).save(images_dir / "deep.png")
    frames = [Image.new("L", (30, 30), v) for v in (0, 128, 255)]
    frames[0].save(images_dir / "anim.gif", save_all=True, append_images=frames[1:])
    exif = Image.Exif()
    exif[0x0112] = 6
    make_image(images_dir / "rotated.jpg", size=(60, 40), exif=exif)
    from test_images import _png_claiming

    (images_dir / "bomb.png").write_bytes(_png_claiming(40_000, 40_000))
    summary = _add(store, small_model, sorted(images_dir.iterdir()))
    assert (summary.added, summary.failed) == (5, 1)
    rows = {os.path.basename(r["path"]): r for r in store.db["images"].rows}
    assert (rows["rotated.jpg"]["width"], rows["rotated.jpg"]["height"]) == (40, 60)
    assert rows["anim.gif"]["format"] == "GIF"
    assert "decompression bomb" in store.failure(str(images_dir / "bomb.png"))["error"]


def test_another_model_is_refused(store, small_model, images_dir):
    _add(store, small_model, [make_image(images_dir / "a.png")])
    from collection.models import get_model

    other = get_model("inception_v3:random")
    with pytest.raises(StoreError, match="mix two models"):
        Ingester(store, other)


def test_an_old_database_upgrades_when_opened(db_path):
    import sqlite_utils

    old = sqlite_utils.Database(db_path)
    store_module.migrations.apply(old, stop_before="m002_deleted_and_thumbnails")
    old["images"].insert({"path": "/x.jpg", "sha256": "ab"})
    assert "deleted_at" not in old["images"].columns_dict
    old.close()
    store = Store(db_path)
    assert "deleted_at" in store.db["images"].columns_dict
    assert store.db["thumbnails"].exists()
    assert store.by_path("/x.jpg")["sha256"] == "ab"


def test_unreadable_database_is_a_clear_error(tmp_path):
    bad = tmp_path / "notes.db"
    bad.write_text("this is not sqlite " * 100)
    with pytest.raises(StoreError, match="cannot open"):
        Store(bad)


def test_iter_files_filters_folders(images_dir):
    make_image(images_dir / "a.jpg")
    make_image(images_dir / ".hidden.jpg")
    (images_dir / "notes.txt").write_text("x")
    make_image(images_dir / "deep" / "b.png")
    flat = [os.path.basename(p) for p in iter_files([images_dir])]
    deep = [os.path.basename(p) for p in iter_files([images_dir], recursive=True)]
    assert flat == ["a.jpg"]
    assert deep == ["a.jpg", "b.png"]


class _SlowModel:
    """Wraps a model: each forward pass notes how many files were decoded when it
    ended, after a pause long enough for a worker to decode a batch meanwhile."""

    def __init__(self, model, ingester_reads):
        self._model = model
        self._reads = ingester_reads
        self.decoded_at_end: list[int] = []

    def embed_batch(self, batch):
        time.sleep(0.5)
        self.decoded_at_end.append(len(self._reads))
        return self._model.embed_batch(batch)

    def __getattr__(self, name):
        return getattr(self._model, name)


def test_the_next_batches_are_decoded_while_the_model_runs(store, small_model, images_dir):
    from collection.ingest import DECODE_AHEAD

    count = 2 * (DECODE_AHEAD + 3)
    paths = [make_image(images_dir / f"{i}.png", seed=i) for i in range(count)]
    reads: list[str] = []

    class Recording(Ingester):
        def _read(self, read):
            result = super()._read(read)
            reads.append(read.path)
            return result

    model = _SlowModel(small_model, reads)
    summary = Recording(store, model, batch_size=2, workers=1).add([str(p) for p in paths])
    assert summary.added == count and summary.batches == [2] * (count // 2)
    # while batch 1 was in the model, the DECODE_AHEAD batches after it were decoded
    # too, then one more during each later batch: that many ahead, never more
    assert model.decoded_at_end == [min(2 * (k + DECODE_AHEAD), count) for k in range(1, count // 2 + 1)]


def test_summary_says_where_the_time_went(store, small_model, images_dir):
    paths = [make_image(images_dir / f"{i}.jpg", seed=i) for i in range(5)]
    started = time.perf_counter()
    summary = _add(store, small_model, paths, batch_size=2, on_batch=lambda ids: time.sleep(0.1))
    elapsed = time.perf_counter() - started
    assert set(summary.seconds) == {"decoding", "model", "writing", "after batch"}
    assert summary.seconds["after batch"] >= 0.3  # three batches, 0.1 s each
    assert summary.seconds["model"] > 0
    assert sum(summary.seconds.values()) <= elapsed


def test_decoding_threads_leave_a_cpu_model_most_cores(monkeypatch):
    from collection import ingest

    class Model:
        accelerated = False
        runtime = "tensorflow"

    for cores, on_cpu, on_gpu in ((1, 1, 1), (2, 1, 2), (8, 2, 4), (16, 4, 4)):
        monkeypatch.setattr(ingest.os, "cpu_count", lambda cores=cores: cores)
        Model.accelerated, Model.runtime = False, "tensorflow"
        assert ingest.decode_workers(Model()) == on_cpu
        Model.runtime = "openvino"  # the model a fraction of decoding's work: a thread per core
        assert ingest.decode_workers(Model()) == cores
        Model.accelerated = True
        assert ingest.decode_workers(Model()) == on_gpu


def _photo_copies(folder) -> list:
    """The shipped sample photos, each with a smaller re-encoded copy and a crop: matches
    and duplicate groups with something in them."""
    from conftest import sample_photos

    paths = []
    for name, array in sample_photos().items():
        photo = Image.fromarray(array).convert("RGB")
        w, h = photo.size
        photo.save(folder / f"{name}.jpg", quality=90)
        photo.resize((w // 2, h // 2)).save(folder / f"{name}-small.png")
        photo.crop((w // 10, 0, w, h)).save(folder / f"{name}-crop.jpg", quality=80)
        paths += [folder / f"{name}.jpg", folder / f"{name}-small.png", folder / f"{name}-crop.jpg"]
    return paths


def _upkept(db) -> list:
    rows = [("matches", *r) for r in db.execute("select image_id, match_id, rank, round(score, 5) from matches order by 1, 3")]
    rows += [("duplicates", *r) for r in db.execute("select tier, group_id, image_id, is_keeper, round(score, 5) from duplicate_groups order by 1, 3")]
    return rows


@pytest.mark.parametrize("at_least", [6, 64])
def test_upkeep_behind_leaves_what_upkeep_inline_leaves(tmp_path, small_model, at_least):
    """Matches and duplicate groups are the same whether the upkeep runs inline after each
    batch or on its own thread while the next batches are embedded, two batches a call
    or all at the end."""
    from collection.ingest import upkeep_behind
    from collection.upkeep import Upkeep

    folder = tmp_path / "photos"
    folder.mkdir()
    paths = _photo_copies(folder)
    inline = Store(tmp_path / "inline.db")
    upkeep = Upkeep(inline, refresh_map=False)
    first = _add(inline, small_model, paths, batch_size=4, on_batch=upkeep.after_batch)
    upkeep.join()
    behind = Store(tmp_path / "behind.db")
    upkeep = upkeep_behind(behind.path, at_least=at_least)
    second = _add(behind, small_model, paths, batch_size=4, on_batch=upkeep)
    upkeep.close()
    assert first.line() == second.line() and first.added == len(paths)
    assert upkeep.core_seconds > 0
    expected = _upkept(inline.db)
    assert any(r[0] == "matches" for r in expected) and any(r[0] == "duplicates" for r in expected)
    assert _upkept(behind.db) == expected


def test_work_behind_does_not_hold_up_the_writer(store, small_model, images_dir):
    """The batches after the first commit while the work on it runs; what they wrote
    gathers and goes in the next call, and add returns once that is done."""
    import threading

    from collection.ingest import Behind

    paths = [make_image(images_dir / f"{i}.png", seed=i) for i in range(7)]
    seen, ends, finished = [], [], []

    def start():
        own = Store(store.path)  # opened on the thread that uses it

        def count() -> int:
            return own.db.execute("select count(*) from images").fetchone()[0]

        def call(ids):
            seen.append((threading.current_thread() is threading.main_thread(), len(ids), count()))
            if len(seen) == 1:
                time.sleep(1.0)  # far longer than the two small batches after it take
            ends.append(count())

        return call, lambda: finished.append(own.close())

    behind = Behind(start)
    summary = _add(store, small_model, paths, batch_size=3, on_batch=behind)
    assert len(ends) == 2  # add returns once the last call is done
    behind.close()
    assert summary.added == 7 and finished == [None]
    assert seen[0][:2] == (False, 3) and seen[0][2] >= 3  # its own batch committed
    assert ends[0] == 7  # the writer went on meanwhile
    assert seen[1] == (False, 4, 7)  # the two later batches, in one call


def test_work_behind_takes_several_batches_at_once(store, small_model, images_dir):
    from collection.ingest import DECODE_AHEAD, Behind

    # enough batches of 3 that the last are still decoding (then ids go at once) only
    # after the first two were committed
    paths = [make_image(images_dir / f"{i}.png", seed=i) for i in range(3 * (DECODE_AHEAD + 3) - 2)]
    seen = []

    def start():
        own = Store(store.path)
        return lambda ids: seen.append((ids, own.db.execute("select count(*) from images").fetchone()[0])), own.close

    behind = Behind(start, at_least=5)
    _add(store, small_model, paths, batch_size=3, on_batch=behind)
    # The first two batches in one call once they were committed; each call finds its
    # ids committed; every id goes once, in order.
    assert len(seen[0][0]) == 6 and seen[0][1] >= 6
    assert all(count >= max(ids) for ids, count in seen)
    assert [i for ids, _ in seen for i in ids] == [r[0] for r in store.db.execute("select id from images order by id")]
    behind.close()


def test_an_error_behind_is_raised_by_add(store, small_model, images_dir):
    from collection.ingest import Behind

    paths = [make_image(images_dir / f"{i}.png", seed=i) for i in range(4)]
    finished = []

    def start():
        def call(ids):
            raise RuntimeError("upkeep broke")

        return call, lambda: finished.append(1)

    behind = Behind(start)
    with pytest.raises(RuntimeError, match="upkeep broke"):
        _add(store, small_model, paths, batch_size=2, on_batch=behind)
    behind.close()
    assert finished == [1]
    assert store.db["images"].count == 4  # what was written stays: the writer does not wait for the work


def test_upkeep_behind_a_writer_searches_each_new_image_once(store, small_model, images_dir, monkeypatch):
    """The writer does not wait for the upkeep (ingest.Behind): a batch it commits while
    a call works is left to the next call, whole; no image is searched twice."""
    from collection import projection
    from collection.search import open_index
    from collection.upkeep import Upkeep

    _add(store, small_model, [make_image(images_dir / f"a{n}.png", seed=n) for n in range(8)])
    projection.project(store, method="pca")
    upkeep = Upkeep(store, refresh_map=False)
    upkeep.after_batch([])
    searcher = open_index(store.path)
    ids = _add(store, small_model, [make_image(images_dir / f"b{n}.png", seed=100 + n) for n in range(5)]).ids
    late_paths = [make_image(images_dir / f"c{n}.png", seed=200 + n) for n in range(4)]
    late: list[int] = []
    place_new = projection.place_new

    def commit_meanwhile(on, placing):  # the writer commits its next batch mid-call
        if not late:
            writer = Store(store.path)
            late.extend(_add(writer, small_model, late_paths).ids)
            writer.close()
        return place_new(on, placing)

    monkeypatch.setattr(projection, "place_new", commit_meanwhile)
    searched = searcher.searches
    upkeep.after_batch(ids)
    assert late and searcher.searches - searched == len(ids)

    def logged(table: str) -> set[int]:
        return {r[0] for r in store.db.execute(f"select image_id from {table}")}

    assert set(late) <= logged("duplicate_changes") and not set(ids) & logged("duplicate_changes")
    assert set(ids) <= logged("matches") and not set(late) & logged("matches")
    upkeep.after_batch(late)
    assert searcher.searches - searched == len(ids) + len(late)
    assert set(ids + late) <= logged("matches") and not set(ids + late) & logged("duplicate_changes")


def test_starting_an_add_reads_nothing_per_stored_image(store, counting_model, images_dir):
    """Known content is looked up by its hash when a file is read, not by loading every
    stored hash when `add` starts (8 s at a million images): the database work of
    starting an Ingester is the same for 10 and for 3,000 stored images."""
    paths = [make_image(images_dir / f"{n}.png", seed=n) for n in range(3)]

    def steps_to_start() -> int:
        ticks = []
        store.db.conn.set_progress_handler(lambda: ticks.append(1), 100)
        try:
            Ingester(store, counting_model)
        finally:
            store.db.conn.set_progress_handler(None, 100)
        return len(ticks)

    _add(store, counting_model, paths)
    few = steps_to_start()
    vector = store.db.execute("select vector from vectors limit 1").fetchone()[0]
    with store.db.atomic():
        for n in range(3000):
            store.db.execute("insert into images (path, sha256) values (?, ?)", [f"/many/{n}.jpg", f"{n:064x}"])
            store.db.execute("insert into vectors (image_id, model, vector) values (last_insert_rowid(), ?, ?)",
                             [store.model, vector])
    assert steps_to_start() <= few + 5
    # and known content is still known: a copy of a stored file reuses its vector
    calls = list(counting_model.calls)
    copy = shutil.copy(paths[0], images_dir / "copy-of-first.png")
    summary = _add(store, counting_model, [copy])
    assert summary.reused == 1 and counting_model.calls == calls


def test_upkeep_searches_once_for_each_new_image(store, small_model, images_dir):
    """After a batch, matches, the map and duplicates all want each new image's nearest;
    the searcher finds them once (the lists of the others are read, not searched)."""
    from collection import projection
    from collection.search import open_index
    from collection.upkeep import Upkeep

    first = [make_image(images_dir / f"a{n}.png", seed=n) for n in range(8)]
    _add(store, small_model, first)
    projection.project(store, method="pca")
    upkeep = Upkeep(store, refresh_map=False)
    upkeep.after_batch([])  # the first grouping of duplicates and the matches of the first 8
    searcher = open_index(store.path)
    later = [make_image(images_dir / f"b{n}.png", seed=100 + n) for n in range(5)]
    ids = _add(store, small_model, later).ids
    searched = searcher.searches
    upkeep.after_batch(ids)
    assert searcher.searches - searched == len(ids)
    placed = store.db.execute(
        f"select count(*) from projection where image_id in ({','.join('?' * len(ids))})", ids
    ).fetchone()[0]
    assert placed == len(ids)  # the map took them in, from the remembered answers
    assert {row[0] for row in store.db.execute("select image_id from matches")} >= set(ids)
