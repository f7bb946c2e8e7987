"""The SQLite collection: schema as named migrations, upserts and reads, WAL mode."""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sqlite_utils
from sqlite_utils.migrations import Migrations

from . import categories
from .files import display

DEFAULT_DB = "collection.db"

migrations = Migrations("collection")


@migrations()
def m001_initial(db: sqlite_utils.Database) -> None:
    db["images"].create(
        {
            "id": int,
            "path": str,
            "sha256": str,
            "size": int,
            "mtime": float,
            "width": int,
            "height": int,
            "format": str,
            "taken_at": str,
            "camera": str,
            "latitude": float,
            "longitude": float,
            "added_at": str,
            "updated_at": str,
            "model": str,
            "labels": str,
            "top_label": str,
            "top_score": float,
        },
        pk="id",
        not_null={"path"},
    )
    db["images"].create_index(["path"], unique=True)
    db["images"].create_index(["sha256"])
    db["labels"].create(
        {"image_id": int, "rank": int, "wnid": str, "label": str, "score": float},
        pk=("image_id", "rank"),
        foreign_keys=[("image_id", "images", "id")],
    )
    db["labels"].create_index(["label"])
    db["vectors"].create(
        {"image_id": int, "model": str, "vector": bytes},
        pk="image_id",
        foreign_keys=[("image_id", "images", "id")],
    )
    db["failures"].create(
        {"path": str, "error": str, "at": str, "attempts": int, "size": int, "mtime": float},
        pk="path",
    )
    db["collection_meta"].create({"key": str, "value": str}, pk="key")


@migrations()
def m002_deleted_and_thumbnails(db: sqlite_utils.Database) -> None:
    db["images"].add_column("deleted_at", str)
    db["images"].create_index(["deleted_at"])
    db["thumbnails"].create(
        {"image_id": int, "jpeg": bytes, "width": int, "height": int},
        pk="image_id",
        foreign_keys=[("image_id", "images", "id")],
    )


@migrations()
def m003_matches(db: sqlite_utils.Database) -> None:
    """Each image's nearest neighbours, and a log of the changes that make them stale.

    Triggers append to ``vector_changes`` whenever an image's vector is written or
    removed, or the image is deleted or comes back, whoever makes the change. The
    similar-images index (collection/index.py) reads the log to know which vectors
    its Annoy file no longer covers, and to keep ``matches`` current.
    """
    db["matches"].create(
        {"image_id": int, "match_id": int, "rank": int, "score": float},
        pk=("image_id", "rank"),
    )
    db["matches"].create_index(["match_id"])
    # AUTOINCREMENT: a seq is never reused, even after old entries are pruned.
    db.execute(
        "create table vector_changes (seq integer primary key autoincrement, image_id integer not null)"
    )
    db["vector_changes"].create_index(["image_id", "seq"])
    log = "insert into vector_changes (image_id) values"
    for trigger in (  # one statement each: executescript would commit the migration half-done
        f"vector_changes_insert after insert on vectors begin {log} (new.image_id); end",
        f"vector_changes_update after update on vectors when old.vector is not new.vector "
        f"or old.model is not new.model or old.image_id is not new.image_id "
        f"begin {log} (new.image_id); insert into vector_changes (image_id) "
        f"select old.image_id where old.image_id is not new.image_id; end",
        f"vector_changes_delete after delete on vectors begin {log} (old.image_id); end",
        f"vector_changes_image_delete after delete on images begin {log} (old.id); end",
        f"vector_changes_image_deleted_at after update of deleted_at on images "
        f"when (old.deleted_at is null) <> (new.deleted_at is null) begin {log} (new.id); end",
    ):
        db.execute(f"create trigger {trigger}")


@migrations()
def m004_ingest_log(db: sqlite_utils.Database) -> None:
    # One row per unit of the watcher's work (a reconcile scan, or the events it drained).
    db["ingest_log"].create(
        {
            "id": int,
            "at": str,
            "source": str,
            "files": int,
            "added": int,
            "updated": int,
            "reused": int,
            "moved": int,
            "unchanged": int,
            "failed": int,
            "deleted": int,
            "seconds": float,
        },
        pk="id",
    )
    db["ingest_log"].create_index(["at"])


@migrations()
def m005_taken_year(db: sqlite_utils.Database) -> None:
    # A generated column, so Datasette can facet images by the year they were taken;
    # virtual, so it costs no space and can never disagree with taken_at.
    db.execute(
        "alter table images add column taken_year integer "
        "generated always as (cast(substr(taken_at, 1, 4) as integer)) virtual"
    )


@migrations()
def m006_projection(db: sqlite_utils.Database) -> None:
    """The collection map (collection/projection.py): each image's 2-D position in [0, 1].

    ``placed`` is 1 for an image put near its neighbours after the map was computed;
    ``tile`` is its thumbnail's place in the map's sprite atlases; ``sha256`` is the
    content it was placed with, so changed content is placed again. No foreign key:
    the map is derived, and `Store.delete_rows` must not have to know about it.
    """
    db["projection"].create(
        {"image_id": int, "method": str, "x": float, "y": float, "placed": int, "tile": int,
         "sha256": str},
        pk="image_id",
    )
    db["projection"].create_index(["tile"])


@migrations()
def m007_failure_retries(db: sqlite_utils.Database) -> None:
    """When a failed file is tried again. ``ctime`` joins size and mtime as the sign the
    file changed (a chmod changes only ctime); ``next_try`` is when a failure whose cause
    can pass by itself (permissions, a file changing while read) is due, null for one
    that waits for the file to change."""
    db["failures"].add_column("ctime", float)
    db["failures"].add_column("next_try", str)
    db["failures"].create_index(["next_try"])


@migrations()
def m009_label_counts_and_indexes(db: sqlite_utils.Database) -> None:
    """What browsing a million images needs: label counts kept by triggers, and an index
    under every query the pages run (each checked with EXPLAIN QUERY PLAN in the tests).

    ``label_counts`` holds, per label, how many images carry it among their top 5
    (``images``) and how many of those are live (``live``), so the label facet reads a
    few hundred rows instead of unpacking the JSON ``labels`` of every image. Triggers
    keep it exact whoever writes: an image counts once per label even when two of its
    classes share a name (ImageNet has two "crane"s), and marking an image deleted or
    bringing it back moves its labels between ``live`` and not.
    """
    db.execute(
        "create table label_counts (label text primary key, images integer not null, "
        "live integer not null) without rowid"
    )
    db.execute(
        "insert into label_counts (label, images, live) "
        "select l.label, count(distinct l.image_id), "
        "count(distinct case when i.deleted_at is null then l.image_id end) "
        "from labels l join images i on i.id = l.image_id group by l.label"
    )
    live = "(select count(*) from images where id = {0}.image_id and deleted_at is null)"
    for trigger in (  # one statement each: executescript would commit the migration half-done
        # The image's first row with this label: one more image carries it.
        "label_counts_insert after insert on labels when not exists (select 1 from labels "
        "where image_id = new.image_id and label is new.label and rank <> new.rank) begin "
        "insert into label_counts (label, images, live) values (new.label, 1, "
        f"{live.format('new')}) on conflict(label) do update set images = images + 1, "
        f"live = live + excluded.live; end",
        # Its last row with this label: one image fewer.
        "label_counts_delete after delete on labels when not exists (select 1 from labels "
        "where image_id = old.image_id and label is old.label) begin "
        f"update label_counts set images = images - 1, live = live - {live.format('old')} "
        "where label = old.label; end",
        "label_counts_deleted_at after update of deleted_at on images "
        "when (old.deleted_at is null) <> (new.deleted_at is null) begin "
        "update label_counts set live = live + (case when new.deleted_at is null then 1 else -1 end) "
        "where label in (select label from labels where image_id = new.id); end",
    ):
        db.execute(f"create trigger {trigger}")
    # The label filter and facet look labels up by name and want image ids only: a
    # covering index answers without touching the table. It replaces labels(label).
    db.execute("create index labels_label_image on labels (label, image_id)")
    db.execute("drop index if exists idx_labels_label")
    # The images table page sorts newest first; its column facets group by these.
    for column in ("added_at", "format", "camera", "taken_year"):
        db.execute(f"create index if not exists images_{column} on images ({column})")
    # The labels and matches table pages sort by score; near-duplicate queries filter on it.
    db.execute("create index if not exists labels_score on labels (score)")
    db.execute("create index if not exists matches_score on matches (score)")
    # The map holds live images only, so that what it shows and counts needs no join with
    # images: a deleted image leaves it, and one that comes back is placed again.
    db.execute(
        "delete from projection where image_id not in (select id from images where deleted_at is null)"
    )
    db.execute(
        "create trigger projection_image_deleted after update of deleted_at on images "
        "when new.deleted_at is not null begin delete from projection where image_id = new.id; end"
    )
    db.execute(
        "create trigger projection_image_delete after delete on images "
        "begin delete from projection where image_id = old.id; end"
    )
    db.execute("create index if not exists projection_placed on projection (placed)")
    # The map's data for the box in view: counted and thinned inside the index.
    db.execute("create index if not exists projection_xy on projection (x, y, tile)")


@migrations()
def m010_categories(db: sqlite_utils.Database) -> None:
    """Labels at every level (collection/categories.py): the WordNet categories above
    the ImageNet classes, each image's categories with their scores, and the full
    1,000-way distribution they are computed from.

    ``categories.images`` counts the live images under each category; the triggers
    keep it current whoever writes, one primary-key update per row changed. Rows of
    an image are removed before the image itself (no foreign keys, so a writer that
    does not know these tables can still delete images).
    """
    db.execute(
        "create table categories (wnid text primary key, name text not null, parent_wnid text, "
        "depth integer not null, images integer not null default 0, class_index integer, "
        "lemmas text, gloss text)"
    )
    db.execute("create index categories_parent_wnid on categories (parent_wnid)")
    db.execute(
        "create table category_parents (wnid text not null, parent_wnid text not null, "
        "primary key (wnid, parent_wnid)) without rowid"
    )
    db.execute("create index category_parents_parent_wnid on category_parents (parent_wnid)")
    # Without rowid: the primary key is the table, so per-image reads and deletes are one seek.
    db.execute(
        "create table image_categories (image_id integer not null, wnid text not null, "
        "score real not null, primary key (image_id, wnid)) without rowid"
    )
    # Filters, counts and "best images of a category" read this index alone (it holds image_id too).
    db.execute("create index image_categories_wnid_score on image_categories (wnid, score)")
    db.execute("create table distributions (image_id integer primary key, probs blob not null)")
    live = "exists (select 1 from images where id = {}.image_id and deleted_at is null)"
    for trigger in (  # one statement each: executescript would commit the migration half-done
        f"image_categories_count_insert after insert on image_categories when {live.format('new')} "
        f"begin update categories set images = images + 1 where wnid = new.wnid; end",
        f"image_categories_count_delete after delete on image_categories when {live.format('old')} "
        f"begin update categories set images = images - 1 where wnid = old.wnid; end",
        "image_categories_count_deleted_at after update of deleted_at on images "
        "when (old.deleted_at is null) <> (new.deleted_at is null) begin "
        "update categories set images = images + (case when new.deleted_at is null then 1 else -1 end) "
        "where wnid in (select wnid from image_categories where image_id = new.id); end",
        "image_categories_image_delete before delete on images begin "
        "delete from image_categories where image_id = old.id; "
        "delete from distributions where image_id = old.id; end",
    ):
        db.execute(f"create trigger {trigger}")
    categories.fill_categories(db.conn)


@migrations()
def m011_duplicates(db: sqlite_utils.Database) -> None:
    """Duplicate groups in three tiers (collection/duplicates.py), a person's decisions
    about them, and a log of the changes that can move an image between groups.

    ``duplicate_groups`` holds only groups of two or more; an image is in at most one
    group per tier, and ``group_id`` is the id of the group's representative, so a
    regrouping from scratch gives the same ids. Decisions name images and groups by
    those ids and live apart, so regrouping never touches them. The triggers log every
    write that can change a grouping or a keeper, whoever makes it, as m003 does for
    vectors: the duplicates code keeps and prunes its own log.
    """
    db["duplicate_groups"].create(
        {"tier": str, "group_id": int, "image_id": int, "is_keeper": int, "score": float},
        pk=("tier", "image_id"),
    )
    db["duplicate_groups"].create_index(["tier", "group_id"])
    # image_id null: a decision about the whole group (ignore it).
    db.execute(
        "create table duplicate_decisions (tier text not null, group_id integer not null, "
        "image_id integer, decision text not null, actor text, decided_at text not null)"
    )
    db.execute(
        "create unique index duplicate_decisions_key "
        "on duplicate_decisions (tier, group_id, coalesce(image_id, -1))"
    )
    db.execute(
        "create table duplicate_changes (seq integer primary key autoincrement, image_id integer not null)"
    )
    log = "insert into duplicate_changes (image_id) values"
    watched = ("sha256", "width", "height", "format", "taken_at", "mtime", "deleted_at")
    differs = " or ".join(f"old.{c} is not new.{c}" for c in watched)
    for trigger in (
        f"duplicate_changes_image_insert after insert on images begin {log} (new.id); end",
        f"duplicate_changes_image_delete after delete on images begin {log} (old.id); end",
        f"duplicate_changes_image_update after update of {', '.join(watched)} on images "
        f"when {differs} begin {log} (new.id); end",
        f"duplicate_changes_vector_insert after insert on vectors begin {log} (new.image_id); end",
        f"duplicate_changes_vector_update after update on vectors when old.vector is not new.vector "
        f"begin {log} (new.image_id); end",
        f"duplicate_changes_vector_delete after delete on vectors begin {log} (old.image_id); end",
    ):
        db.execute(f"create trigger {trigger}")


@migrations()
def m012_ingest_log_runtime(db: sqlite_utils.Database) -> None:
    # Which runtime ran the model in each run, e.g. "openvino 2026.4.1": vectors from
    # OpenVINO f32 and TensorFlow fp32 agree and may share a collection, so a run says which.
    db["ingest_log"].add_column("runtime", str)


@migrations()
def m013_live_images(db: sqlite_utils.Database) -> None:
    """``live_images``: the images whose files are still there. Pages, canned queries and
    SQL that browse or search read it, so a deleted file drops out of them, while
    ``images`` keeps every row with its ``deleted_at`` for the history."""
    db.execute("create view live_images as select * from images where deleted_at is null")
    # The gallery's label filter pages through a label's images newest first on
    # m009's labels(label, image_id) index: a range scan.


@migrations()
def m014_projection_side_table(db: sqlite_utils.Database) -> None:
    """``projection_next``: where a map recompute writes its rows, a few thousand per
    transaction, before `swap_projection` makes it ``projection`` in one short
    transaction; so a recompute at a million images never holds the write lock while it
    writes. Triggers keep images deleted meanwhile off it, as m009's keep them off the map."""
    make_projection_next(db.conn, "0")
    db.execute(
        "create trigger projection_next_image_deleted after update of deleted_at on images "
        "when new.deleted_at is not null begin delete from projection_next where image_id = new.id; end"
    )
    db.execute(
        "create trigger projection_next_image_delete after delete on images "
        "begin delete from projection_next where image_id = old.id; end"
    )


# The images table's column facets (metadata.yml) whose counts m015 keeps, and the column
# an update of which changes each (taken_year is generated from taken_at).
FACET_COLUMNS = {"format": "format", "camera": "camera", "taken_year": "taken_at"}
# facet_counts' label for the counts over every image, not those of one label.
EVERY_IMAGE = ""


@migrations()
def m015_facet_counts(db: sqlite_utils.Database) -> None:
    """``facet_counts``: what the images page's facets show, kept by triggers like
    ``label_counts``, so a page filtered by a label counts nothing at request time.

    A row (label, facet, value, images, live): of the images carrying ``label``, how many
    have ``value`` in ``facet`` (a column of FACET_COLUMNS, or ``labels``: how many also
    carry the label ``value``, the label itself included), and how many of those are live.
    ``label`` EVERY_IMAGE holds the column counts over every image. At a million images a
    label filter's column facets took 90-430 ms each, grouping the rows the filter leaves;
    here they are one index range. An image counts once per label name, as in
    ``label_counts``. The first fill reads every label row (about a minute at a million).
    """
    db.execute(
        "create table facet_counts (label text not null, facet text not null, value not null, "
        "images integer not null, live integer not null, primary key (label, facet, value)) without rowid"
    )
    for facet in FACET_COLUMNS:
        db.execute(
            f"insert into facet_counts select :every, :facet, {facet}, count(*), sum(deleted_at is null) "
            f"from images where {facet} is not null group by {facet}",
            {"every": EVERY_IMAGE, "facet": facet},
        )
        db.execute(
            f"insert into facet_counts select l.label, :facet, i.{facet}, count(*), sum(i.deleted_at is null) "
            f"from (select distinct image_id, label from labels) l join images i on i.id = l.image_id "
            f"where i.{facet} is not null group by l.label, i.{facet}",
            {"facet": facet},
        )
    db.execute(
        "insert into facet_counts select a.label, 'labels', b.label, count(*), sum(i.deleted_at is null) "
        "from (select distinct image_id, label from labels) a "
        "join (select distinct image_id, label from labels) b on b.image_id = a.image_id "
        "join images i on i.id = a.image_id group by a.label, b.label"
    )
    for trigger in _facet_count_triggers():
        db.execute(f"create trigger {trigger}")


_ADD = "on conflict do update set images = images + excluded.images, live = live + excluded.live"


def _facet_count_triggers() -> list[str]:
    """m015's triggers, one statement each (see m009 for why)."""
    live = "(select count(*) from images where id = {0}.image_id and deleted_at is null)"
    names = "(select label from labels where image_id = {0})"  # the image's labels now
    every = f"'{EVERY_IMAGE}'"
    # The rows an image's column values count in: those of its labels, and every image's.
    counted_in = f"(select label from labels where image_id = new.id union all select {every})"
    on_insert, on_delete = [], []
    for facet in FACET_COLUMNS:
        on_insert.append(
            f"insert into facet_counts select new.label, '{facet}', {facet}, 1, deleted_at is null "
            f"from images where id = new.image_id and {facet} is not null {_ADD};"
        )
        on_delete.append(
            f"update facet_counts set images = images - 1, live = live - {live.format('old')} "
            f"where label = old.label and facet = '{facet}' "
            f"and value = (select {facet} from images where id = old.image_id);"
        )
    triggers = [
        # The image's first row with this label: pairs with each label it has, both ways
        # (itself once), and its column values.
        "facet_counts_label_insert after insert on labels when not exists (select 1 from labels "
        "where image_id = new.image_id and label is new.label and rank <> new.rank) begin "
        f"insert into facet_counts select new.label, 'labels', label, 1, {live.format('new')} "
        f"from (select distinct label from labels where image_id = new.image_id) where true {_ADD}; "
        f"insert into facet_counts select label, 'labels', new.label, 1, {live.format('new')} "
        f"from (select distinct label from labels where image_id = new.image_id and label is not new.label) "
        f"where true {_ADD}; " + " ".join(on_insert) + " end",
        # Its last row with this label: the same, taken away.
        "facet_counts_label_delete after delete on labels when not exists (select 1 from labels "
        "where image_id = old.image_id and label is old.label) begin "
        f"update facet_counts set images = images - 1, live = live - {live.format('old')} "
        f"where label = old.label and facet = 'labels' "
        f"and value in (select label from labels where image_id = old.image_id union all select old.label); "
        f"update facet_counts set images = images - 1, live = live - {live.format('old')} "
        f"where facet = 'labels' and value = old.label and label in {names.format('old.image_id')}; "
        + " ".join(on_delete) + " end",
        "facet_counts_image_insert after insert on images begin "
        + " ".join(
            f"insert into facet_counts select {every}, '{facet}', new.{facet}, 1, new.deleted_at is null "
            f"where new.{facet} is not null {_ADD};"
            for facet in FACET_COLUMNS
        ) + " end",
        "facet_counts_image_delete after delete on images begin "
        + " ".join(
            f"update facet_counts set images = images - 1, live = live - (old.deleted_at is null) "
            f"where label = {every} and facet = '{facet}' and value = old.{facet};"
            for facet in FACET_COLUMNS
        ) + " end",
        # Deleted or back: its label pairs and its unchanged column values move between
        # live and not (a column that changed in the same update moves in its own trigger).
        "facet_counts_deleted_at after update of deleted_at on images "
        "when (old.deleted_at is null) <> (new.deleted_at is null) begin "
        "update facet_counts set live = live + (case when new.deleted_at is null then 1 else -1 end) "
        f"where facet = 'labels' and label in {names.format('new.id')} and value in {names.format('new.id')}; "
        + " ".join(
            f"update facet_counts set live = live + (case when new.deleted_at is null then 1 else -1 end) "
            f"where old.{facet} is new.{facet} and facet = '{facet}' and value = new.{facet} "
            f"and label in {counted_in};"
            for facet in FACET_COLUMNS
        ) + " end",
    ]
    for facet, column in FACET_COLUMNS.items():
        # A column's value changed (a file re-embedded): its counts move from old to new.
        triggers.append(
            f"facet_counts_{facet} after update of {column} on images "
            f"when old.{facet} is not new.{facet} begin "
            f"update facet_counts set images = images - 1, live = live - (old.deleted_at is null) "
            f"where facet = '{facet}' and value = old.{facet} "
            f"and label in {counted_in}; "
            f"insert into facet_counts select label, '{facet}', new.{facet}, 1, new.deleted_at is null "
            f"from (select distinct label from labels where image_id = new.id union select {every}) "
            f"where new.{facet} is not null {_ADD}; end"
        )
    return triggers


# The map's indexes (m006, m009), made on each new side table under names of its own.
_PROJECTION_INDEXES = {"tile": "tile", "placed": "placed", "xy": "x, y, tile"}


def make_projection_next(conn: sqlite3.Connection, generation: str) -> None:
    """An empty ``projection_next`` like ``projection``, with the map's indexes named
    after ``generation`` (index names are database-wide: the map's own keep theirs)."""
    sql = conn.execute("select sql from sqlite_master where type = 'table' and name = 'projection'").fetchone()[0]
    conn.execute("drop table if exists projection_next")
    conn.execute(re.sub(r'^create table\s+(\[projection\]|"projection"|projection)', "CREATE TABLE projection_next", sql, flags=re.I))
    for name, columns in _PROJECTION_INDEXES.items():
        conn.execute(f"create index projection_{name}_{generation} on projection_next ({columns})")


def swap_projection(conn: sqlite3.Connection, generation: str) -> None:
    """Inside the caller's write transaction: ``projection_next`` becomes ``projection``,
    the old map ``projection_old`` (for `drop_old_projection`, outside it), and a new empty
    side table is made: renames, quick at any size. The triggers on ``images`` name the
    tables in their bodies; the legacy rename leaves those names as they are, so each
    keeps acting on the table that now has its name."""
    conn.execute("drop table if exists projection_old")  # left by a process that stopped
    conn.execute("pragma legacy_alter_table = on")
    try:
        conn.execute("alter table projection rename to projection_old")
        conn.execute("alter table projection_next rename to projection")
    finally:
        conn.execute("pragma legacy_alter_table = off")
    make_projection_next(conn, generation)


def drop_old_projection(conn: sqlite3.Connection, rows: int = 5000) -> None:
    """Empty the replaced map ``rows`` at a time, each in its own transaction, then drop
    it: dropping a million rows at once would hold the write lock for a second."""
    while conn.execute("select 1 from sqlite_master where type = 'table' and name = 'projection_old'").fetchone():
        with conn:
            if not conn.execute(
                "delete from projection_old where rowid in (select rowid from projection_old limit ?)", [rows]
            ).rowcount:
                conn.execute("drop table projection_old")


def embedded(conn: sqlite3.Connection, sha256: str) -> bool:
    """Whether content with this SHA-256 already has a vector (on the sha256 index)."""
    return conn.execute(
        "select 1 from images i join vectors v on v.image_id = i.id where i.sha256 = ? limit 1", [sha256]
    ).fetchone() is not None


# Ids per statement: far under SQLite's smallest variable limit (999 before 3.32).
CHUNK = 500


def chunks(ids: Iterable[int], size: int = CHUNK) -> Iterable[list[int]]:
    """``ids`` in lists of at most ``size``, for ``in (...)`` lists of bound variables."""
    ids = list(ids)
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


# The columns of ``images`` that come from the file itself (images.Decoded.metadata()).
_METADATA = ("sha256", "size", "width", "height", "format", "taken_at", "camera", "latitude", "longitude")


class StoreError(Exception):
    """The database cannot be used as asked; the message says why."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def encode(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f4").tobytes()


def decode(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f4")


# Per connection: 256 MB of the file mapped (reads without copying into SQLite's cache;
# the pages are the OS's page cache, shared and reclaimable, not this process's heap),
# a 64 MB page cache, and WAL's own safe sync level (a crash of the process loses nothing
# committed; a power cut may lose the last transactions, never corrupts).
PRAGMAS = {"mmap_size": 256 * 2**20, "cache_size": -64 * 1024, "synchronous": "normal"}
# Rows ANALYZE samples per index, so that keeping statistics stays quick at a million rows.
ANALYSIS_LIMIT = 1000


def tune(conn: sqlite3.Connection) -> None:
    """Set a connection up for a large collection (Store and Datasette's connections)."""
    for name, value in PRAGMAS.items():
        conn.execute(f"pragma {name} = {value}")
    conn.execute(f"pragma analysis_limit = {ANALYSIS_LIMIT}")


# Statistics start at this many images: a small collection's would tell the planner that
# scanning a table beats its index, a plan that would stay until the table grew 25-fold.
ANALYZE_FROM = 10_000


# Indexes on a column of a handful of values. ANALYZE under ANALYSIS_LIMIT samples
# a thousand entries and guesses 1,001 rows a value, so "deleted_at is null" (every live
# image) looked like a narrow lookup: at a million images the map's atlas query drove its
# join from it and read every image for each atlas. These get exact statistics: a scan of
# each index, about half a second at a million images, whenever the sampled guess is there.
FEW_VALUED = ("idx_images_deleted_at", "images_format", "images_camera", "images_taken_year")


def optimize(conn: sqlite3.Connection) -> None:
    """Refresh the planner's statistics where they are missing or stale: cheap when
    nothing changed much, bounded by ANALYSIS_LIMIT otherwise, exact for FEW_VALUED."""
    if (conn.execute("select max(id) from images").fetchone()[0] or 0) < ANALYZE_FROM:
        return
    conn.execute("pragma optimize")
    if not conn.execute("select 1 from sqlite_master where name = 'sqlite_stat1'").fetchone():
        return  # no statistics at all (an SQLite whose optimize analyzed nothing yet)
    sampled = [
        name for name, stat in conn.execute(
            f"select idx, stat from sqlite_stat1 where idx in ({', '.join('?' * len(FEW_VALUED))})", FEW_VALUED
        )
        if stat.split()[1:2] == [str(ANALYSIS_LIMIT + 1)]
    ]
    if sampled:
        conn.execute("pragma analysis_limit = 0")
        try:
            for name in sampled:
                conn.execute(f"analyze {name}")
        finally:
            conn.execute(f"pragma analysis_limit = {ANALYSIS_LIMIT}")


class _Database(sqlite_utils.Database):
    """sqlite-utils' Database whose outermost ``atomic()`` takes the write lock as it
    begins (BEGIN IMMEDIATE), waiting out another writer through busy_timeout. A deferred
    BEGIN that reads before it writes fails at once with "database is locked" when another
    connection commits in between (in WAL its snapshot is then stale, and waiting cannot
    help): at a million images `collection add` died so while the first grouping of
    duplicates wrote its chunks beside it. Nested blocks stay savepoints."""

    @contextlib.contextmanager
    def atomic(self):
        if self.conn.in_transaction:
            with super().atomic():
                yield self
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self
        except BaseException:
            self.conn.rollback()
            raise
        else:
            self.conn.commit()


class Store:
    """One collection database. Not shared between threads: each opens its own."""

    def __init__(self, path: str | Path = DEFAULT_DB, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.exists():
            raise StoreError(f"no collection database at {self.path}")
        try:
            self.db = _Database(self.path)
            self.db.execute("PRAGMA busy_timeout = 30000")
            self.db.enable_wal()
            self.db.execute("PRAGMA foreign_keys = ON")
            tune(self.db.conn)
            migrations.apply(self.db)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"cannot open {self.path} as a collection database: {e}") from None

    def close(self) -> None:
        optimize(self.db.conn)
        self.db.close()

    # --- collection-wide settings -------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("select value from collection_meta where key = ?", [key]).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value) -> None:
        self.db["collection_meta"].upsert({"key": key, "value": str(value)}, pk="key")

    @property
    def model(self) -> str | None:
        return self.get_meta("model")

    @property
    def category_threshold(self) -> float:
        """Categories scoring at least this are stored per image (``collection categories``)."""
        return categories.threshold(self.db.conn)

    def claim_model(self, model_id: str, dimensions: int, precision: str) -> None:
        """Record the database's model, or refuse a different one: vectors never mix."""
        current = self.model
        if current is None:
            with self.db.atomic():
                self.set_meta("model", model_id)
                self.set_meta("dimensions", dimensions)
                self.set_meta("precision", precision)
        elif current != model_id:
            raise StoreError(
                f"{self.path} holds vectors from model {current!r}; adding with {model_id!r} "
                f"would mix two models' vectors. Use --model {current} (or auto), or a new --db."
            )
        elif self.get_meta("precision") != precision:
            raise StoreError(
                f"{self.path} was embedded at {self.get_meta('precision')} precision; "
                f"adding at {precision} would mix the two. Use --precision {self.get_meta('precision')}."
            )

    def log_ingest(self, row: dict) -> None:
        """One ``ingest_log`` row: a run of `collection add`, or a unit of the watcher's work."""
        self.db["ingest_log"].insert({"at": now(), **row})

    # --- reads --------------------------------------------------------------------

    def _first(self, sql: str, params: list) -> dict | None:
        """The query's first row as a dict, for the lookups `add` makes per file on its
        calling thread. Not sqlite-utils: its rows_where looks the table up again on
        every call (0.13 core-ms of the thread's 1.1 per image, bench/ingest.py), and its
        query() wraps each statement in a savepoint (14 against 6 us a lookup)."""
        cursor = self.db.execute(sql, params)
        row = cursor.fetchone()
        return dict(zip([column[0] for column in cursor.description], row)) if row else None

    def by_path(self, path: str) -> dict | None:
        return self._first("select * from images where path = ?", [display(path)])

    def by_id(self, image_id: int) -> dict | None:
        return self._first("select * from images where id = ?", [image_id])

    def by_sha256(self, sha256: str) -> list[dict]:
        """Rows with this content that still have a vector, live ones first."""
        return list(
            self.db.query(
                "select images.* from images join vectors on vectors.image_id = images.id "
                "where sha256 = ? order by deleted_at is not null, id",
                [sha256],
            )
        )

    def labels_for(self, image_id: int) -> list[dict]:
        return list(self.db["labels"].rows_where("image_id = ?", [image_id], order_by="rank"))

    def vector(self, image_id: int) -> np.ndarray | None:
        row = self.db.execute("select vector from vectors where image_id = ?", [image_id]).fetchone()
        return decode(row[0]) if row else None

    def counts(self) -> dict:
        one = lambda sql: self.db.execute(sql).fetchone()[0]  # noqa: E731
        return {
            "images": one("select count(*) from images where deleted_at is null"),
            "deleted": one("select count(*) from images where deleted_at is not null"),
            "labels": one("select count(distinct label) from labels"),
            "failures": one("select count(*) from failures"),
        }

    def file_states(self) -> Iterator[tuple[str, int | None, float | None]]:
        """(path, size, mtime) of every live image with a vector and every recorded
        failure: the files a backfill of the same folder need not read again."""
        yield from self.db.execute(
            "select path, size, mtime from images join vectors on vectors.image_id = images.id "
            "where deleted_at is null union all select path, size, mtime from failures"
        )

    # --- writes (callers group them in ``with store.db.atomic():``) ----------------

    def save_image(
        self,
        path: str,
        mtime: float,
        metadata: dict,
        vector: np.ndarray,
        labels: list[tuple[str, str, float]],
        model_id: str,
        thumbnail: tuple[bytes, int, int] | None = None,
        probabilities: np.ndarray | None = None,
    ) -> int:
        """Insert or update the image at ``path`` (keeping its id) with its vector and labels,
        and, given the model's 1,000 class probabilities, its categories (categories.py).

        Plain SQL rather than sqlite-utils' insert/upsert: this runs once per image
        on the ingest path, where table introspection would cost more than the writes.
        """
        stamp = now()
        row = {
            "path": path,
            "mtime": mtime,
            **{k: metadata.get(k) for k in _METADATA},
            "updated_at": stamp,
            "model": model_id,
            "labels": json.dumps([label for _, label, _ in labels]),
            "top_label": labels[0][1] if labels else None,
            "top_score": labels[0][2] if labels else None,
        }
        existing = self.db.execute("select id from images where path = ?", [path]).fetchone()
        if existing:
            image_id = existing[0]
            assignments = ", ".join(f"[{k}] = :{k}" for k in row)
            self.db.execute(
                f"update images set {assignments}, deleted_at = null where id = :id",
                {**row, "id": image_id},
            )
        else:
            row["added_at"] = stamp
            columns = ", ".join(f"[{k}]" for k in row)
            values = ", ".join(f":{k}" for k in row)
            image_id = self.db.execute(f"insert into images ({columns}) values ({values})", row).lastrowid
        self.db.execute(
            "insert into vectors (image_id, model, vector) values (?, ?, ?) "
            "on conflict(image_id) do update set model = excluded.model, vector = excluded.vector",
            [image_id, model_id, encode(vector)],
        )
        self.db.execute("delete from labels where image_id = ?", [image_id])
        self.db.conn.executemany(
            "insert into labels (image_id, rank, wnid, label, score) values (?, ?, ?, ?, ?)",
            [(image_id, rank, *label) for rank, label in enumerate(labels, start=1)],
        )
        if thumbnail:
            self.save_thumbnail(image_id, *thumbnail)
        if probabilities is None:
            categories.clear(self.db.conn, image_id)
        else:
            categories.save(self.db.conn, [image_id], probabilities[None], self.category_threshold)
        return image_id

    def save_thumbnail(self, image_id: int, jpeg: bytes, width: int, height: int) -> None:
        self.db.execute(
            "insert or replace into thumbnails (image_id, jpeg, width, height) values (?, ?, ?, ?)",
            [image_id, jpeg, width, height],
        )

    def move(self, image_id: int, path: str, mtime: float) -> None:
        """The same content under a new path: same id, vector and labels; no model run."""
        existing = self.by_path(path)
        if existing and existing["id"] != image_id:
            self.delete_rows([existing["id"]])
        self.db["images"].update(
            image_id, {"path": path, "mtime": mtime, "deleted_at": None, "updated_at": now()}
        )

    def copy(self, source_id: int, path: str, mtime: float) -> int:
        """A second file with known content: a new row that reuses the source's vector and labels."""
        source = self.by_id(source_id)
        metadata = {k: source[k] for k in _METADATA}
        labels = [(r["wnid"], r["label"], r["score"]) for r in self.labels_for(source_id)]
        thumb = self.db.execute(
            "select jpeg, width, height from thumbnails where image_id = ?", [source_id]
        ).fetchone()
        image_id = self.save_image(
            path, mtime, metadata, self.vector(source_id), labels, source["model"], thumb
        )
        categories.copy(self.db.conn, source_id, image_id)
        return image_id

    def touch(self, image_id: int, mtime: float) -> None:
        """Same path, same content, new mtime (e.g. `touch`, a copy that kept the bytes)."""
        self.db["images"].update(image_id, {"mtime": mtime, "deleted_at": None})

    def mark_deleted(self, image_ids: Iterable[int]) -> None:
        stamp = now()
        for part in chunks(image_ids):
            self.db.execute(
                f"update images set deleted_at = ? where id in ({', '.join('?' * len(part))})",
                [stamp, *part],
            )

    def delete_rows(self, image_ids: Iterable[int]) -> None:
        for part in chunks(image_ids):
            marks = ", ".join("?" * len(part))
            for table in ("labels", "vectors", "thumbnails"):
                self.db.execute(f"delete from {table} where image_id in ({marks})", part)
            self.db.execute(f"delete from images where id in ({marks})", part)

    # --- failures: keyed by ``display(path)``, so a name that is not UTF-8 has one too --

    def record_failure(
        self,
        path: str,
        error: str,
        size: int | None,
        mtime: float | None,
        ctime: float | None = None,
        next_try: str | None = None,
    ) -> None:
        """``next_try``: when to try again without waiting for the file to change."""
        key = display(path)
        previous = self.db.execute("select attempts from failures where path = ?", [key]).fetchone()
        self.db["failures"].upsert(
            {
                "path": key,
                "error": error,
                "at": now(),
                "attempts": (previous[0] if previous else 0) + 1,
                "size": size,
                "mtime": mtime,
                "ctime": ctime,
                "next_try": next_try,
            },
            pk="path",
        )

    def failure(self, path: str) -> dict | None:
        return self._first("select * from failures where path = ?", [display(path)])

    def failures_under(self, prefix: str, due_by: str | None = None) -> list[str]:
        """Paths of failures below ``prefix``; with ``due_by``, only those due by then."""
        prefix = display(prefix)
        sql = "select path from failures where substr(path, 1, ?) = ?"
        if due_by is not None:
            sql = "select path from failures where next_try <= ? and substr(path, 1, ?) = ?"
            return [r[0] for r in self.db.execute(sql, [due_by, len(prefix), prefix])]
        return [r[0] for r in self.db.execute(sql, [len(prefix), prefix])]

    def count_failures_under(self, prefix: str) -> int:
        prefix = display(prefix)
        sql = "select count(*) from failures where substr(path, 1, ?) = ?"
        return self.db.execute(sql, [len(prefix), prefix]).fetchone()[0]

    def clear_failure(self, path: str) -> None:
        self.db.execute("delete from failures where path = ?", [display(path)])
