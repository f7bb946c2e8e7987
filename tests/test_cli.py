from __future__ import annotations

import sqlite3

from click.testing import CliRunner

from collection.cli import cli
from conftest import make_image

MODEL = ["--model", "efficientnet_lite0:random"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_add_many_files_shows_progress_and_summary(tmp_path, images_dir):
    for i in range(25):
        make_image(images_dir / f"{i:02}.jpg", seed=i)
    make_image(images_dir / "nested" / "deep.png", seed=99)
    (images_dir / "broken.jpg").write_text("nope")
    db = tmp_path / "c.db"
    result = run("add", images_dir, "--db", db, *MODEL)
    assert result.exit_code == 0, result.output
    assert "Adding" in result.output  # the progress bar
    assert "25 added, 0 updated, 0 unchanged, 0 reused, 1 failed" in result.output
    again = run("add", images_dir, "--db", db, "--recursive")  # auto: the database's model
    assert "1 added, 0 updated, 25 unchanged, 0 reused, 1 failed" in again.output
    with sqlite3.connect(db) as conn:
        counts = conn.execute("select label, count(*) from labels group by label").fetchall()
    assert sum(n for _, n in counts) == 26 * 5


def test_labels_status_and_failures(tmp_path, images_dir):
    path = make_image(images_dir / "one.png")
    (images_dir / "bad.jpg").write_bytes(b"")
    db = tmp_path / "c.db"
    run("add", path, images_dir / "bad.jpg", "--db", db, *MODEL)
    by_id = run("labels", "1", "--db", db)
    by_path = run("labels", path, "--db", db)
    assert by_id.output == by_path.output
    assert str(path) in by_id.output and "  5. " in by_id.output
    status = run("status", "--db", db)
    assert "images:    1" in status.output
    assert "efficientnet_lite0:random" in status.output
    assert "failures:  1" in status.output
    failures = run("failures", "--db", db)
    assert "bad.jpg" in failures.output and "empty file" in failures.output


def test_user_mistakes_are_one_clear_line(tmp_path, images_dir):
    path = make_image(images_dir / "one.png")
    missing = run("add", tmp_path / "nowhere.jpg")
    assert missing.exit_code != 0 and "does not exist" in missing.output
    unknown = run("add", path, "--db", tmp_path / "a.db", "--model", "resnet9000")
    assert unknown.exit_code == 1
    assert unknown.output.strip().startswith("Error: unknown model 'resnet9000'")
    assert "Traceback" not in unknown.output
    notdb = tmp_path / "text.db"
    notdb.write_text("hello " * 500)
    bad = run("status", "--db", notdb)
    assert bad.exit_code == 1 and "cannot open" in bad.output and len(bad.output.strip().splitlines()) == 1
    absent = run("status", "--db", tmp_path / "absent.db")
    assert absent.exit_code == 1 and "no collection database" in absent.output


def test_adding_with_another_model_is_refused(tmp_path, images_dir):
    path = make_image(images_dir / "one.png")
    db = tmp_path / "c.db"
    run("add", path, "--db", db, *MODEL)
    other = run("add", path, "--db", db, "--model", "inception_v3:random")
    assert other.exit_code == 1 and "mix two models" in other.output


def test_models_lists_the_registry():
    result = run("models")
    assert "inception_v3" in result.output and "2048" in result.output
    assert "efficientnet_lite0" in result.output and "1280" in result.output


def test_add_keeps_matches_and_the_map_current(tmp_path, images_dir):
    for i in range(12):
        make_image(images_dir / f"{i:02}.png", seed=i)
    db = tmp_path / "c.db"
    run("add", images_dir, "--db", db, *MODEL)
    assert run("map", "--db", db, "--method", "pca").exit_code == 0
    new = make_image(tmp_path / "later" / "new.png", seed=100)
    run("add", new, "--db", db)
    with sqlite3.connect(db) as conn:
        new_id = conn.execute("select id from images where path = ?", [str(new)]).fetchone()[0]
        placed = conn.execute("select placed from projection where image_id = ?", [new_id]).fetchone()
        matches = conn.execute("select count(*) from matches where image_id = ?", [new_id]).fetchone()[0]
    assert placed == (1,)  # put on the map next to its neighbours, no recompute
    assert matches == 10
