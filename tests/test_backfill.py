"""Backfill on a local Ray (2 CPUs) into Parquet shards, and their import: the same
collection as `collection add`, exactly one row per file after a crash, resumable."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from collection.cli import cli
from collection.store import Store
from conftest import make_image

if importlib.util.find_spec("ray") is None and not os.environ.get("CI"):
    pytest.skip("Ray is not installed: pip install -e '.[ray]'", allow_module_level=True)

import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402

from collection import backfill, categories, files, shards  # noqa: E402
from collection.sources import Source  # noqa: E402

MODEL = "efficientnet_lite0"  # real weights: top labels far apart, so their order is stable
GOOD = 9
BAD = ("broken.jpg", "empty.png")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module: starting one costs seconds."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=300 * 2**20, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Distinct small pictures in two formats and a subfolder, one with EXIF, and two bad files."""
    folder = tmp_path_factory.mktemp("photos")
    for i in range(GOOD - 1):
        make_image(folder / ("sub" if i % 3 == 0 else "") / f"{i}.{'jpg' if i % 2 else 'png'}", seed=i, size=(320, 240))
    exif = Image.Exif()
    exif[271], exif[272], exif[306] = "Canon", "Canon EOS 5D", "2021:06:01 12:30:00"
    make_image(folder / "exif.jpg", seed=99, size=(300, 200), exif=exif.tobytes())
    (folder / BAD[0]).write_bytes(b"not a jpeg at all")
    (folder / BAD[1]).write_bytes(b"")
    return folder


@pytest.fixture(scope="module")
def backfilled(local_ray, photos, tmp_path_factory) -> tuple[Path, str]:
    """The photos backfilled once through the CLI: (shards folder, what it printed)."""
    out = tmp_path_factory.mktemp("backfill") / "shards"
    printed = run(["backfill", str(photos), "--out", str(out), "--model", MODEL, "--batch-size", "4"])
    return out, printed


def run(cli_args: list[str]) -> str:
    result = CliRunner().invoke(cli, cli_args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def shard_paths(folder: Path) -> list[str]:
    return [os.fsdecode(p) for t in map(pq.read_table, shards.image_files(folder)) for p in t["path"].to_pylist()]


def failure_paths(folder: Path) -> list[str]:
    return [os.fsdecode(p) for t in map(pq.read_table, shards.failure_files(folder)) for p in t["path"].to_pylist()]


def test_backfill_and_import_give_the_same_collection_as_add(backfilled, photos, tmp_path):
    added, imported = tmp_path / "added.db", tmp_path / "imported.db"
    run(["add", "-r", str(photos), "--db", str(added), "--model", MODEL])
    folder, printed = backfilled
    assert f"{GOOD} embedded, {len(BAD)} failed, 0 skipped" in printed
    out = run(["import", str(folder), "--db", str(imported)])
    assert f"{GOOD} added, 0 updated, 0 moved, 0 unchanged, 0 gone, {len(BAD)} failed" in out

    a, b = Store(added), Store(imported)
    columns = "path, sha256, size, mtime, width, height, format, taken_at, camera, latitude, longitude, model, labels, top_label, deleted_at"
    rows_a = {r["path"]: r for r in a.db.query(f"select id, top_score, {columns} from images")}
    rows_b = {r["path"]: r for r in b.db.query(f"select id, top_score, {columns} from images")}
    assert len(rows_a) == GOOD and rows_a.keys() == rows_b.keys()
    assert any(r["camera"] == "Canon EOS 5D" and r["taken_at"] == "2021-06-01T12:30:00" for r in rows_b.values())
    for path, row_a in rows_a.items():
        row_b = rows_b[path]
        assert {k: row_a[k] for k in columns.split(", ")} == {k: row_b[k] for k in columns.split(", ")}
        assert row_b["top_score"] == pytest.approx(row_a["top_score"], abs=1e-4)
        va, vb = a.vector(row_a["id"]), b.vector(row_b["id"])
        assert float(va @ vb) > 0.9999
        labels_a, labels_b = a.labels_for(row_a["id"]), b.labels_for(row_b["id"])
        assert [(r["rank"], r["wnid"]) for r in labels_a] == [(r["rank"], r["wnid"]) for r in labels_b]
        assert [r["score"] for r in labels_b] == pytest.approx([r["score"] for r in labels_a], abs=1e-4)
        thumb = "select jpeg, width, height from thumbnails where image_id = ?"
        assert a.db.execute(thumb, [row_a["id"]]).fetchone() == b.db.execute(thumb, [row_b["id"]]).fetchone()
        # the full distribution and the categories it gives, as `add` stores them
        probs = "select probs from distributions where image_id = ?"
        probs_a = categories.decode(a.db.execute(probs, [row_a["id"]]).fetchone()[0])
        probs_b = categories.decode(b.db.execute(probs, [row_b["id"]]).fetchone()[0])
        assert probs_b == pytest.approx(probs_a, abs=2e-3)
        wnids = "select wnid, score from image_categories where image_id = ? order by score desc, wnid"
        cats_a = list(a.db.execute(wnids, [row_a["id"]]))
        cats_b = list(b.db.execute(wnids, [row_b["id"]]))
        assert len(cats_a) > 1 and [w for w, _ in cats_b] == [w for w, _ in cats_a]
        assert [s for _, s in cats_b] == pytest.approx([s for _, s in cats_a], abs=2e-3)
    category_counts = "select wnid, images from categories where images > 0 order by wnid"
    assert list(a.db.execute(category_counts)) == list(b.db.execute(category_counts))
    # (not size: `add` records an empty file's size as NULL, the shards as 0)
    failures = "select path, error, mtime from failures order by path"
    assert list(a.db.query(failures)) == list(b.db.query(failures))
    assert sorted(Path(r["path"]).name for r in b.db.query(failures)) == sorted(BAD)
    assert b.get_meta("model") == MODEL and b.get_meta("precision") == "fp32"
    # the index and matches caught up as after `collection add`
    assert b.db["matches"].count == a.db["matches"].count > 0

    # the collection already holds every file: a backfill against it has nothing to do
    out = run(["backfill", str(photos), "--out", str(tmp_path / "more"), "--db", str(imported), "--model", "auto"])
    assert f"0 embedded, 0 failed, {GOOD + len(BAD)} skipped" in out
    assert not shards.image_files(tmp_path / "more")


class CrashOnce(backfill.Embedder):
    """A model actor whose process dies mid-batch the first time, as a killed worker would."""

    marker = ""

    def __call__(self, batch):
        if not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)
        return super().__call__(batch)


def test_a_killed_worker_and_a_rerun_leave_exactly_one_row_per_file(local_ray, photos, tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    CrashOnce.marker = str(tmp_path / "crashed")
    spec = backfill.ModelSpec(MODEL, None, "fp32")
    out = tmp_path / "shards"
    first = backfill.run(photos, out, spec, batch_size=2, shard_rows=3, embedder=CrashOnce)
    assert os.path.exists(CrashOnce.marker)  # the actor did die, and Ray retried its batch
    assert (first.embedded, first.failed) == (GOOD, len(BAD))
    assert first.units == len(shards.image_files(out)) > 1
    assert sorted(shard_paths(out)) == sorted(set(shard_paths(out))) and len(shard_paths(out)) == GOOD
    assert sorted(Path(p).name for p in failure_paths(out)) == sorted(BAD)

    # a run killed part-way: one unit never renamed into place, a writer's temporary left behind
    lost = shards.image_files(out)[0]
    lost_paths = set(shard_paths(out)) - {os.fsdecode(p) for p in pq.read_table(lost)["path"].to_pylist()}
    lost.unlink()
    (out / f"{shards.TEMPORARY}dead-writer-images-x.parquet").write_bytes(b"half")
    again = backfill.run(photos, out, spec)
    assert again.embedded == GOOD - len(lost_paths) and again.failed == 0
    assert again.skipped == len(lost_paths) + len(BAD)
    assert sorted(shard_paths(out)) == sorted(set(shard_paths(out))) and len(shard_paths(out)) == GOOD
    assert not list(out.glob(f"{shards.TEMPORARY}*"))

    # nothing left: the third run starts no pipeline at all
    assert backfill.run(photos, out, spec).skipped == GOOD + len(BAD)
    store = Store(tmp_path / "c.db")
    summary = shards.import_shards(store, out)
    assert (summary.added, summary.failed) == (GOOD, len(BAD))
    assert store.db.execute("select count(*), count(distinct path) from images").fetchone() == (GOOD, GOOD)
    assert sorted(Path(r[0]).name for r in store.db.execute("select path from failures")) == sorted(BAD)


def test_reimport_changes_nothing_and_keeps_ids(backfilled, tmp_path):
    out, _ = backfilled
    store = Store(tmp_path / "c.db")
    shards.import_shards(store, out)
    before = list(store.db.query("select id, path, updated_at from images order by id"))
    changes = store.db["vector_changes"].count
    failures = list(store.db.query("select * from failures"))
    again = shards.import_shards(store, out)
    assert (again.added, again.updated, again.failed, again.unchanged) == (0, 0, 0, GOOD + len(BAD))
    assert list(store.db.query("select id, path, updated_at from images order by id")) == before
    assert store.db["vector_changes"].count == changes  # no vector rewritten: the index has nothing to redo
    assert list(store.db.query("select * from failures")) == failures  # attempts not counted up

    # a file changed and re-added since the backfill: the shard's older row does not overwrite it
    newest = before[0]
    store.db.execute("update images set mtime = mtime + 100, sha256 = 'new' where id = ?", [newest["id"]])
    store.db.conn.commit()
    assert shards.import_shards(store, out).updated == 0
    assert store.by_id(newest["id"])["sha256"] == "new"


def test_import_refuses_shards_from_another_model(backfilled, photos, tmp_path):
    out, _ = backfilled
    db = tmp_path / "other.db"
    Store(db).claim_model("inception_v3:random", 2048, "fp32")
    result = CliRunner().invoke(cli, ["import", str(out), "--db", str(db)])
    assert result.exit_code == 1
    assert "would mix two models' vectors" in result.output
    assert Store(db).counts()["images"] == 0
    # nor does a backfill add another model's shards to the same folder
    with pytest.raises(backfill.EngineError, match="come from efficientnet_lite0"):
        backfill.run(photos, out, backfill.ModelSpec("inception_v3:random", None, "fp32"))


def test_without_ray_the_command_says_how_to_install_it(monkeypatch, photos, tmp_path):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    result = CliRunner().invoke(cli, ["backfill", str(photos), "--out", str(tmp_path / "s")])
    assert result.exit_code == 1
    assert "pip install 'collection[ray]'" in result.output
    assert "Traceback" not in result.output


def test_shard_names_depend_only_on_their_input_list(tmp_path):
    table = backfill.file_table([("/a/1.jpg", 10, 1.5), ("/a/2.jpg", 20, 2.5)])
    same = backfill.file_table([("/a/2.jpg", 20, 2.5), ("/a/1.jpg", 10, 1.5)])
    touched = backfill.file_table([("/a/1.jpg", 10, 1.5), ("/a/2.jpg", 20, 3.5)])
    assert shards.shard_key(table) == shards.shard_key(same) != shards.shard_key(touched)
    # a path that is not UTF-8 keeps its bytes
    odd = os.fsdecode(b"/a/caf\xe9.jpg")
    assert backfill.file_table([(odd, 1, 1.0)])["path"].to_pylist() == [b"/a/caf\xe9.jpg"]
    assert shards.without(table, same).num_rows == 0
    assert shards.without(table, touched)["path"].to_pylist() == [b"/a/2.jpg"]


def test_a_moved_file_keeps_its_id_on_import(local_ray, tmp_path):
    """As with `collection add`: known content at a new path, its old file gone, takes over the old row."""
    library = tmp_path / "library"
    for i in range(3):
        make_image(library / f"{i}.jpg", seed=200 + i, size=(320, 240))
    spec = backfill.ModelSpec(MODEL, None, "fp32")
    out, store = tmp_path / "shards", Store(tmp_path / "c.db")
    backfill.run(library, out, spec)
    shards.import_shards(store, out)
    ids = {Path(r["path"]).name: r["id"] for r in store.db.query("select id, path from images")}
    categories_of = "select wnid, score from image_categories where image_id = ? order by wnid"
    before = list(store.db.execute(categories_of, [ids["0.jpg"]]))
    assert before

    # 0.jpg moved to a subfolder; 1.jpg renamed after the watcher marked its row deleted
    (library / "sub").mkdir()
    os.rename(library / "0.jpg", library / "sub" / "0.jpg")
    os.rename(library / "1.jpg", library / "one.jpg")
    store.mark_deleted([ids["1.jpg"]])
    store.db.conn.commit()
    again = backfill.run(library, out, spec, done=backfill.file_table(store.file_states()))
    assert (again.embedded, again.skipped) == (2, 1)
    summary = shards.import_shards(store, out)
    assert (summary.added, summary.updated, summary.moved) == (0, 0, 2)
    rows = {r["id"]: r for r in store.db.query("select id, path, deleted_at from images")}
    assert len(rows) == 3
    assert rows[ids["0.jpg"]]["path"] == str(library / "sub" / "0.jpg")
    assert rows[ids["1.jpg"]]["path"] == str(library / "one.jpg") and rows[ids["1.jpg"]]["deleted_at"] is None
    assert list(store.db.execute(categories_of, [ids["0.jpg"]])) == before
    # the older shard's rows for the old paths stay out: those files are gone
    assert shards.import_shards(store, out).added == 0
    assert store.db.execute("select count(*) from images").fetchone()[0] == 3


def test_a_file_uri_source_is_the_folder_and_links_out_of_it_are_refused(local_ray, tmp_path):
    folder, outside = tmp_path / "photos", tmp_path / "elsewhere"
    for i in range(2):
        make_image(folder / f"{i}.jpg", seed=300 + i, size=(160, 120))
    make_image(outside / "secret.jpg", seed=399, size=(160, 120))
    (folder / "link.jpg").symlink_to(outside / "secret.jpg")
    out = tmp_path / "shards"
    printed = run(["backfill", folder.as_uri(), "--out", str(out), "--model", MODEL])
    assert "2 embedded, 1 failed, 0 skipped" in printed
    assert sorted(shard_paths(out)) == [str(folder / "0.jpg"), str(folder / "1.jpg")]  # plain paths, as `add` stores
    [failure] = pq.read_table(shards.failure_files(out)[0]).to_pylist()
    assert failure["path"] == os.fsencode(folder / "link.jpg") and "outside the folder" in failure["error"]
    # the same folder by its path: nothing left to do
    assert "0 embedded, 0 failed, 3 skipped" in run(["backfill", str(folder), "--out", str(out), "--model", MODEL])
    result = CliRunner().invoke(cli, ["backfill", "nosuch://bucket/x", "--out", str(out)])
    assert result.exit_code == 1 and "cannot open nosuch://bucket/x" in result.output and "Traceback" not in result.output


def test_a_pyarrow_filesystem_source_lists_and_reads_within_the_limits(tmp_path):
    """The path every remote URI takes (s3://, gs://), here on pyarrow's local filesystem."""
    folder = tmp_path / "bucket"
    make_image(folder / "a.jpg", seed=1, size=(64, 48))
    make_image(folder / "deep" / "er" / "b.png", seed=2, size=(64, 48))
    make_image(folder / "@eaDir" / "thumb.jpg", seed=3, size=(64, 48))  # a NAS's thumbnails: skipped
    (folder / ".hidden.jpg").write_bytes(b"x")
    (folder / "notes.txt").write_text("not an image")
    (folder / "big.jpg").write_bytes(b"\xff" * 5000)
    source = Source(str(folder), folder.as_uri(), files.Limits(max_bytes=4000))
    states = list(source.states())
    uri = folder.as_uri()
    assert [p for p, _, _ in states] == [f"{uri}/a.jpg", f"{uri}/big.jpg", f"{uri}/deep/er/b.png"]
    assert [(size, mtime) for _, size, mtime in states][0] == ((folder / "a.jpg").stat().st_size, (folder / "a.jpg").stat().st_mtime)
    path, size, _ = states[0]
    assert source.read(path, size) == (folder / "a.jpg").read_bytes()
    with pytest.raises(files.TooBig):
        source.read(states[1][0], states[1][1])
    with pytest.raises(files.Unreadable, match="changed since it was listed"):
        source.read(path, size + 1)
    with pytest.raises(files.Unreadable, match="cannot read file"):
        source.read(f"{uri}/gone.jpg", 10)
