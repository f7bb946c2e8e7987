"""Labels at every level: the WordNet 3.0 hierarchy above ImageNet's 1,000 classes.

A category's score for an image is the sum of the model's probabilities for the
classes below it, so "dog" can score 0.9 when no single breed passes 0.3. WordNet
gives some synsets two hypernyms ("dog" is a canine and a domestic animal): every
path is followed, and a class counts once towards each category above it however
many paths lead there, so a score is never more than 1.

Per image the store keeps the full 1,000-way distribution (``distributions``,
little-endian float16) and every category scoring at least the collection's
threshold (``image_categories``). Scores are always computed from the float16
distribution, so recomputing from the stored one gives exactly what ingest wrote.
``categories.images`` counts the live images under each category; triggers made
by migration m010 (store.py) keep it current as rows come and go.

The hierarchy ships as package data (data/imagenet_hierarchy.tsv, made from
WordNet 3.0 by ``python -m collection.data.make_hierarchy``). Nothing here
imports TensorFlow: the Datasette plugin uses this module.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Callable, Iterable, Iterator

import numpy as np
import sqlite_utils

ROOT = "n00001740"  # entity
DEFAULT_THRESHOLD = 0.2
THRESHOLD_KEY = "category_threshold"  # in collection_meta
DATA_FILE = "imagenet_hierarchy.tsv"
CLASSES = 1000
WNID = re.compile(r"n[0-9]{8}")
RECOMPUTE_CHUNK = 1000  # images per transaction when recomputing from stored distributions


@dataclass(frozen=True)
class Category:
    wnid: str
    name: str
    lemmas: tuple[str, ...]
    parents: tuple[str, ...]  # WordNet's first hypernym first
    gloss: str
    class_index: int | None  # the ImageNet class index, for the 1,000 leaves


class Hierarchy:
    """The synsets on the ImageNet classes' hypernym paths, and how classes roll up."""

    def __init__(self, categories: Iterable[Category]):
        self.categories = {c.wnid: c for c in categories}
        self.wnids = sorted(self.categories)  # the columns of ``scores``
        self.column = {wnid: i for i, wnid in enumerate(self.wnids)}
        self.classes = [""] * CLASSES
        self.children: dict[str, list[str]] = {wnid: [] for wnid in self.wnids}
        for c in self.categories.values():
            if c.class_index is not None:
                self.classes[c.class_index] = c.wnid
            for parent in c.parents:
                self.children[parent].append(c.wnid)
        if not all(self.classes):
            raise ValueError("the hierarchy does not name all 1,000 ImageNet classes")
        self.depth: dict[str, int] = {}
        for wnid in self.wnids:
            self._depth(wnid)
        # Every (category, class below it) pair, grouped by category in column order:
        # a category's score is the sum of its group, one gather and one reduceat for a
        # whole batch (about 12,000 pairs; a dense 1000 x 1860 product measured 13 times slower).
        pairs = sorted((self.column[a], i) for i, wnid in enumerate(self.classes) for a in self.ancestors(wnid))
        self._sources = np.array([i for _, i in pairs])
        columns = np.array([j for j, _ in pairs])
        self._starts = np.flatnonzero(np.r_[True, columns[1:] != columns[:-1]])
        if len(self._starts) != len(self.wnids):
            raise ValueError("a category in the hierarchy has no ImageNet class below it")
        self._words = [(c, _words(c)) for c in self.categories.values()]

    def _depth(self, wnid: str) -> int:
        """Steps from ``entity`` along first parents (the path ``parent_wnid`` follows)."""
        if wnid not in self.depth:
            parents = self.categories[wnid].parents
            self.depth[wnid] = self._depth(parents[0]) + 1 if parents else 0
        return self.depth[wnid]

    def parent(self, wnid: str) -> str | None:
        parents = self.categories[wnid].parents
        return parents[0] if parents else None

    def ancestors(self, wnid: str) -> set[str]:
        """``wnid`` and every category above it, along all paths."""
        seen, todo = set(), [wnid]
        while todo:
            current = todo.pop()
            if current not in seen:
                seen.add(current)
                todo.extend(self.categories[current].parents)
        return seen

    def paths(self, wnid: str) -> list[list[str]]:
        """Every path from ``entity`` down to ``wnid``, the first-parent path first."""
        parents = self.categories[wnid].parents
        if not parents:
            return [[wnid]]
        return [path + [wnid] for parent in parents for path in self.paths(parent)]

    def descendant_classes(self, wnid: str) -> list[str]:
        """The ImageNet classes at or below ``wnid``, in class order."""
        j = self.column[wnid]
        end = self._starts[j + 1] if j + 1 < len(self._starts) else len(self._sources)
        return [self.classes[i] for i in sorted(self._sources[self._starts[j]:end])]

    def scores(self, probs: np.ndarray) -> np.ndarray:
        """(n, 1000) class probabilities -> (n, categories) scores, columns as ``wnids``.
        The probabilities are first rounded to float16, as they are stored."""
        gathered = quantise(np.atleast_2d(probs)).astype(np.float64)[:, self._sources]
        return np.add.reduceat(gathered, self._starts, axis=1)

    def above(self, probs: np.ndarray, threshold: float) -> list[list[tuple[str, float]]]:
        """Per image, every (wnid, score) with score >= threshold, best first."""
        result = []
        for row in self.scores(probs):
            keep = np.flatnonzero(row >= threshold)
            keep = keep[np.argsort(-row[keep], kind="stable")]
            result.append([(self.wnids[j], float(row[j])) for j in keep])
        return result

    def search(self, query: str) -> list[tuple[Category, str]]:
        """Categories with a word matching ``query``, best match first, with the word.

        Any lemma WordNet has for a synset counts ("domestic dog", "canine",
        "automobile", "car"), and the ImageNet label. Ranked: the whole word, then a
        word starting with the query, then the query as a whole word inside one
        ("dog" in "hunting dog"), then anywhere inside; ties by depth, shallow first.
        """
        q = normalise(query)
        if not q:
            return []
        pattern = re.compile(rf"\b{re.escape(q)}\b")
        found = []
        for category, words in self._words:
            best = None
            for word in words:
                if word == q:
                    rank = 0
                elif word.startswith(q):
                    rank = 1
                elif pattern.search(word):
                    rank = 2
                elif q in word:
                    rank = 3
                else:
                    continue
                if best is None or rank < best[0]:
                    best = (rank, word)
            if best is not None:
                found.append((best[0], self.depth[category.wnid], category.wnid, category, best[1]))
        found.sort(key=lambda f: f[:3])
        return [(category, word) for *_, category, word in found]

    def resolve(self, value: str) -> list[str]:
        """A wnid, or the categories that have ``value`` as one of their words exactly."""
        value = value.strip()
        if WNID.fullmatch(value):
            return [value] if value in self.categories else []
        q = normalise(value)
        return [c.wnid for c, words in self._words if q in words]


def normalise(text: str) -> str:
    return " ".join(text.replace("_", " ").replace("-", " ").lower().split())


def _words(category: Category) -> set[str]:
    return {normalise(w) for w in (*category.lemmas, category.name)}


@cache
def hierarchy() -> Hierarchy:
    """The shipped hierarchy, read once per process."""
    text = resources.files("collection.data").joinpath(DATA_FILE).read_text(encoding="utf-8")
    return Hierarchy(parse(text))


def parse(text: str) -> Iterator[Category]:
    lines = text.splitlines()
    for line in lines[1:]:  # after the header
        wnid, index, name, lemmas, parents, gloss = line.split("\t")
        yield Category(
            wnid, name, tuple(lemmas.split("; ")), tuple(parents.split()), gloss,
            int(index) if index else None,
        )


# --- the stored distribution ---------------------------------------------------------


def quantise(probs: np.ndarray) -> np.ndarray:
    return np.asarray(probs, np.float32).astype("<f2").astype(np.float32)


def encode(probs: np.ndarray) -> bytes:
    """The 1,000 class probabilities as a 2,000-byte little-endian float16 BLOB."""
    return np.asarray(probs, np.float32).astype("<f2").tobytes()


def decode(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, "<f2").astype(np.float32)


# --- reads and writes of the category tables ----------------------------------------


def threshold(conn: sqlite3.Connection) -> float:
    row = conn.execute("select value from collection_meta where key = ?", [THRESHOLD_KEY]).fetchone()
    return float(row[0]) if row else DEFAULT_THRESHOLD


def fill_categories(conn: sqlite3.Connection) -> None:
    """Insert or refresh the ``categories`` and ``category_parents`` rows from the
    shipped hierarchy; image counts are left as they are."""
    h = hierarchy()
    conn.executemany(
        "insert into categories (wnid, name, parent_wnid, depth, class_index, lemmas, gloss) "
        "values (?, ?, ?, ?, ?, ?, ?) on conflict(wnid) do update set name = excluded.name, "
        "parent_wnid = excluded.parent_wnid, depth = excluded.depth, "
        "class_index = excluded.class_index, lemmas = excluded.lemmas, gloss = excluded.gloss",
        [
            (c.wnid, c.name, h.parent(c.wnid), h.depth[c.wnid], c.class_index, "; ".join(c.lemmas), c.gloss)
            for c in h.categories.values()
        ],
    )
    conn.executemany(
        "insert or ignore into category_parents (wnid, parent_wnid) values (?, ?)",
        [(c.wnid, p) for c in h.categories.values() for p in c.parents],
    )


def save(conn: sqlite3.Connection, image_ids: list[int], probs: np.ndarray, at: float) -> None:
    """Store each image's distribution and its categories scoring at least ``at``,
    replacing what it had."""
    rows = hierarchy().above(probs, at)
    conn.executemany(
        "insert into distributions (image_id, probs) values (?, ?) "
        "on conflict(image_id) do update set probs = excluded.probs",
        [(image_id, encode(p)) for image_id, p in zip(image_ids, probs)],
    )
    _replace(conn, image_ids, rows)


def _replace(conn: sqlite3.Connection, image_ids: list[int], rows: list[list[tuple[str, float]]]) -> None:
    """Make the images' rows these, writing only what differs: a recompute at the same
    threshold writes nothing, and each row written costs a count trigger."""
    old = {
        (image_id, wnid): score
        for image_id, wnid, score in conn.execute(
            "select image_id, wnid, score from image_categories "
            "where image_id in (select value from json_each(?))",
            [json.dumps(image_ids)],
        )
    }
    new = {(image_id, wnid): score for image_id, found in zip(image_ids, rows) for wnid, score in found}
    conn.executemany(
        "delete from image_categories where image_id = ? and wnid = ?", [key for key in old if key not in new]
    )
    conn.executemany(
        "insert into image_categories (image_id, wnid, score) values (?, ?, ?) "
        "on conflict (image_id, wnid) do update set score = excluded.score",
        [(*key, score) for key, score in new.items() if old.get(key) != score],
    )


def clear(conn: sqlite3.Connection, image_id: int) -> None:
    """Content embedded without a distribution: what the image had no longer applies."""
    conn.execute("delete from image_categories where image_id = ?", [image_id])
    conn.execute("delete from distributions where image_id = ?", [image_id])


def copy(conn: sqlite3.Connection, source_id: int, image_id: int) -> None:
    """A second file with the source's content gets the source's distribution and categories."""
    clear(conn, image_id)
    conn.execute(
        "insert into distributions (image_id, probs) select ?, probs from distributions where image_id = ?",
        [image_id, source_id],
    )
    conn.execute(
        "insert into image_categories (image_id, wnid, score) "
        "select ?, wnid, score from image_categories where image_id = ?",
        [image_id, source_id],
    )


def recompute(
    db: sqlite_utils.Database, at: float, progress: Callable[[int], None] | None = None
) -> int:
    """Recompute every stored image's categories from its stored distribution at
    threshold ``at``, one transaction per chunk (so the watcher and Datasette carry
    on meanwhile); returns how many images."""
    h = hierarchy()
    done, after = 0, -1
    while True:
        chunk = db.execute(
            "select image_id, probs from distributions where image_id > ? order by image_id limit ?",
            [after, RECOMPUTE_CHUNK],
        ).fetchall()
        if not chunk:
            return done
        ids = [row[0] for row in chunk]
        probs = np.stack([decode(row[1]) for row in chunk])
        with db.atomic():
            _replace(db.conn, ids, h.above(probs, at))
        done += len(ids)
        after = ids[-1]
        if progress:
            progress(len(ids))


def without_distribution(conn: sqlite3.Connection, after: int, limit: int) -> list[tuple[int, str, str]]:
    """Up to ``limit`` live images after id ``after`` with a vector but no stored
    distribution: (id, path, sha256), by id."""
    return conn.execute(
        "select images.id, images.path, images.sha256 from images "
        "join vectors on vectors.image_id = images.id "
        "where images.deleted_at is null and images.id > ? "
        "and not exists (select 1 from distributions d where d.image_id = images.id) "
        "order by images.id limit ?",
        [after, limit],
    ).fetchall()


def count_without_distribution(conn: sqlite3.Connection) -> int:
    return conn.execute(
        "select count(*) from images join vectors on vectors.image_id = images.id "
        "where images.deleted_at is null "
        "and not exists (select 1 from distributions d where d.image_id = images.id)"
    ).fetchone()[0]


def reembed(
    db: sqlite_utils.Database, model, at: float, progress: Callable[[int], None] | None = None
) -> tuple[int, int]:
    """Run ``model`` again over the live images stored without a distribution (added
    before categories existed), a batch per transaction, and store their distribution
    and categories; vectors and labels stay as they are. A file that has gone or
    changed since it was added is skipped: the watcher or `collection add` embeds it
    again. Returns (images done, images skipped)."""
    from . import files, images

    done = skipped = 0
    after = -1
    while rows := without_distribution(db.conn, after, model.batch_size):
        after = rows[-1][0]
        ids, pixels = [], []
        for image_id, path, sha256 in rows:
            try:
                data, _ = files.read(path, [os.path.realpath(os.path.dirname(path))])
                if images.sha256_bytes(data) != sha256:
                    skipped += 1
                    continue
                decoded = images.decode(path, data, model.min_side, sha256)
            except (files.Unreadable, images.ImageError):
                skipped += 1
                continue
            pixels.append(model.prepare(decoded.image))
            ids.append(image_id)
        if ids:
            _, probs = model.embed_batch(pixels)
            with db.atomic():
                save(db.conn, ids, probs, at)
            done += len(ids)
        if progress:
            progress(len(rows))
    return done, skipped


# --- what the Datasette plugin shows (datasette_plugins/labels_plugin.py) -------------

TOP_IMAGES = "select ic.image_id, ic.score from image_categories ic join images i on i.id = ic.image_id " \
    "where ic.wnid = ? and i.deleted_at is null order by ic.score desc, ic.image_id desc limit ? offset ?"


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    """Live images under each category that has any."""
    return dict(conn.execute("select wnid, images from categories where images > 0"))


def top_images(conn: sqlite3.Connection, wnid: str, limit: int, offset: int = 0) -> list[dict]:
    """A category's live images, highest score first (read from the (wnid, score) index)."""
    rows = conn.execute(TOP_IMAGES, [wnid, limit, offset]).fetchall()
    return [{"id": image_id, "score": round(score, 4)} for image_id, score in rows]


def live_ids(conn: sqlite3.Connection, wnid: str) -> list[int]:
    """Every live image in a category, in index order (for the map's highlight)."""
    return [row[0] for row in conn.execute(
        "select ic.image_id from image_categories ic join images i on i.id = ic.image_id "
        "where ic.wnid = ? and i.deleted_at is null", [wnid]
    )]


def summary(category: Category, counted: dict[str, int]) -> dict:
    h = hierarchy()
    return {
        "wnid": category.wnid,
        "name": category.name,
        "lemmas": list(category.lemmas),
        "gloss": category.gloss,
        "parents": list(category.parents),
        "depth": h.depth[category.wnid],
        "class_index": category.class_index,
        "images": counted.get(category.wnid, 0),
    }


def tree(conn: sqlite3.Connection, thumbnails: int) -> dict:
    """The categories that have images, nested from ``entity``, each with its count and
    its best ``thumbnails`` image ids. A category with two parents is under both."""
    h = hierarchy()
    counted = counts(conn)
    thumbs = {wnid: [r["id"] for r in top_images(conn, wnid, thumbnails)] for wnid in counted}

    def node(wnid: str) -> dict:
        kids = sorted(
            (k for k in h.children[wnid] if k in counted), key=lambda k: (-counted[k], h.categories[k].name)
        )
        return {
            **summary(h.categories[wnid], counted),
            "thumbnails": thumbs[wnid],
            "children": [node(k) for k in kids],
        }

    return node(ROOT) if ROOT in counted else {}


def page(conn: sqlite3.Connection, wnid: str, limit: int, offset: int, thumbnails: int) -> dict:
    """One category: where it sits (every path from entity), its children with counts
    and thumbnails, and a page of its best images."""
    h = hierarchy()
    counted = counts(conn)
    names = lambda path: [{"wnid": w, "name": h.categories[w].name} for w in path]  # noqa: E731
    kids = sorted(h.children[wnid], key=lambda k: (-counted.get(k, 0), h.categories[k].name))
    return {
        **summary(h.categories[wnid], counted),
        "paths": [names(path) for path in h.paths(wnid)],
        "children": [
            {**summary(h.categories[k], counted), "thumbnails": [r["id"] for r in top_images(conn, k, thumbnails)]}
            for k in kids if counted.get(k)
        ],
        "empty_children": sum(1 for k in kids if not counted.get(k)),
        "top": top_images(conn, wnid, limit, offset),
        "limit": limit,
        "offset": offset,
    }


def search_results(conn: sqlite3.Connection, query: str, limit: int, thumbnails: int) -> list[dict]:
    """Categories matching a word (``Hierarchy.search``), those with images first."""
    counted = counts(conn)
    found = hierarchy().search(query)
    found.sort(key=lambda f: counted.get(f[0].wnid, 0) == 0)  # stable: match order kept within each
    return [
        {
            **summary(category, counted),
            "matched": word,
            "thumbnails": [r["id"] for r in top_images(conn, category.wnid, thumbnails)],
        }
        for category, word in found[:limit]
    ]


FACET_PARAM = "_category_wnids"  # a JSON array of the wnids a facet query counts


def facet_sql(inner_sql: str, column: str) -> str:
    """Images among the rows of ``inner_sql`` (a table view's query, its image id in
    ``column``) in each category of :_category_wnids, read from the (wnid, score) index."""
    return (
        f"select wnid, count(*) from image_categories "
        f"where wnid in (select value from json_each(:{FACET_PARAM})) "
        f"and image_id in (select [{column}] from ({inner_sql})) group by wnid"
    )


# The unfiltered images table: the live counts kept by triggers, plus the deleted images
# (their rows are in the table too), found from the deleted_at index. CROSS JOIN keeps
# that order: the deleted images are few, a category's images may be most of them.
ALL_IMAGES_FACET_SQL = (
    "select c.wnid, c.images + (select count(*) from images i cross join image_categories ic "
    "on ic.image_id = i.id where i.deleted_at is not null and ic.wnid = c.wnid) "
    f"from categories c where c.wnid in (select value from json_each(:{FACET_PARAM}))"
)


def filter_sql(column: str, params: list[str]) -> str:
    """A where clause keeping rows whose image id ``column`` is in one of the categories
    named by ``params`` (placeholders); read from the (wnid, score) index."""
    named = ", ".join(f":{p}" for p in params)
    return f"[{column}] in (select image_id from image_categories where wnid in ({named}))"
