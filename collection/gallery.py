"""The reads behind the gallery (live images, newest first, filtered, a page at a time)
and the image page (one image, deleted or not, with its labels, categories and place on
the map).

Pages use keyset pagination on the images' id, which grows as images are added:
``?before=<id>`` asks for the page below an id, so a page at a million images reads
one page of rows from an index, never an OFFSET's worth. Filtered by a category, the
page is its images best score first, read from image_categories' (wnid, score) index;
the keyset is then the last (score, id): ``?below=<score>&before=<id>``. Run through
Datasette's ``Database.execute_fn``; nothing here imports TensorFlow.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, fields

from collection import categories

PAGE_SIZE = 48
OPTIONS_TTL = 60.0  # seconds the filter menus (formats, cameras, years) are reused
IMAGE_CATEGORY_DEPTH = 5  # the image page leaves out entity .. living thing: true of nearly every photo
_COLUMNS = ("id", "path", "top_label", "top_score", "labels", "format", "camera", "taken_at", "width", "height")


class BadFilter(ValueError):
    """A gallery parameter that cannot be used; the message says why, for a person."""


@dataclass(frozen=True)
class Filters:
    """What the gallery is narrowed to; every field optional."""

    label: str | None = None
    category: str | None = None  # a wnid or a word WordNet knows ("dog", "canine", "automobile")
    format: str | None = None
    camera: str | None = None
    year: int | None = None
    place: bool = False  # only images with a GPS position

    @classmethod
    def from_args(cls, args) -> Filters:
        """From a request's query string, refusing what cannot be a filter value."""
        text = {name: (args.get(name) or "").strip() or None for name in ("label", "category", "format", "camera")}
        for name, value in text.items():
            if value is not None and len(value) > 200:
                raise BadFilter(f"{name} is too long")
        year = args.get("year") or None
        if year is not None:
            if not (year.isascii() and year.isdigit() and len(year) == 4):
                raise BadFilter(f"year must be four digits, not {year!r}")
            year = int(year)
        return cls(**text, year=year, place=args.get("place") in ("1", "yes", "on"))

    def query(self, **changes) -> dict[str, str]:
        """These filters (with ``changes``) as query-string parameters, empty ones left out."""
        values = {f.name: getattr(self, f.name) for f in fields(self)} | changes
        return {
            name: ("1" if value is True else str(value))
            for name, value in values.items()
            if value not in (None, False, "")
        }

    @property
    def active(self) -> bool:
        return bool(self.query())


def find_category(value: str) -> categories.Category | None:
    """A wnid, else the best category for a word by the labels plugin's search: an exact
    lemma first ("dog" is every breed), then the shallowest partial match."""
    h = categories.hierarchy()
    if categories.WNID.fullmatch(value):
        return h.categories.get(value)
    found = h.search(value)
    return found[0][0] if found else None


def parse_below(value: str | None) -> float | None:
    """The score half of a category page's keyset."""
    if value in (None, ""):
        return None
    try:
        score = float(value)
    except ValueError:
        score = math.nan
    if not (math.isfinite(score) and score >= 0.0):  # a rolled-up float16 sum may pass 1 a little
        raise BadFilter(f"below must be a score, a number from 0, not {value!r}")
    return score


def parse_before(value: str | None) -> int | None:
    if value in (None, ""):
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= 18):
        raise BadFilter(f"before must be an image id, not {value!r}")
    return int(value)


def page(
    conn: sqlite3.Connection, filters: Filters, before: int | None, size: int = PAGE_SIZE,
    below: float | None = None,
) -> dict:
    """One page of live images, newest first (a category's: best score first), and the
    keyset the next page starts below."""
    category = find_category(filters.category) if filters.category is not None else None
    if filters.category is not None and category is None:
        return {"images": [], "before": None, "below": None, "category": None}
    # With a label the query is driven from labels: its (label, image_id) index yields
    # the label's images newest first. An image carrying a label twice (ImageNet has
    # two "crane"s) would come twice, hence the grouping (in index order, no sort).
    # With a category it is driven from image_categories' (wnid, score) index, which
    # holds image_id too, so (score, image_id) descending is its order: no sort either.
    where, params = ["1"], {"size": size + 1}
    if category is not None:
        key, order, group = "ic.image_id", "ic.score desc, ic.image_id desc", ""
        source = "image_categories ic join live_images i on i.id = ic.image_id"
        where.append("ic.wnid = :wnid")
        params["wnid"] = category.wnid
        if before is not None:
            where.append("(ic.score, ic.image_id) < (:below, :before)")
            params.update(before=before, below=math.inf if below is None else below)
    else:
        key = "i.id" if filters.label is None else "l.image_id"
        order, group = f"{key} desc", "" if filters.label is None else f"group by {key} "
        source = "live_images i" if filters.label is None else "labels l join live_images i on i.id = l.image_id"
        if before is not None:
            where.append(f"{key} < :before")
            params["before"] = before
    for column, value in (("format", filters.format), ("camera", filters.camera), ("taken_year", filters.year)):
        if value is not None:
            where.append(f"i.{column} = :{column}")
            params[column] = value
    if filters.place:
        where.append("i.latitude is not null and i.longitude is not null")
    if filters.label is not None:
        # Beside a category, the label's images are looked up by its index, not walked.
        where.append("l.label = :label" if category is None else
                     "i.id in (select image_id from labels where label = :label)")
        params["label"] = filters.label
    columns = ", ".join(f"i.{c}" for c in _COLUMNS) + (", ic.score as category_score" if category else "")
    sql = f"select {columns} from {source} where {' and '.join(where)} {group}order by {order} limit :size"
    rows = [_card(row) for row in _dicts(conn.execute(sql, params))]
    more = len(rows) > size
    rows = rows[:size]
    last = rows[-1] if more else None
    return {
        "images": rows,
        "before": last["id"] if last else None,
        "below": last["category_score"] if last and category else None,
        "category": category,
    }


def _card(row: dict) -> dict:
    row["name"] = os.path.basename(row["path"])
    try:
        row["labels"] = json.loads(row["labels"] or "[]")
    except ValueError:
        row["labels"] = []
    return row


_menus: dict[str, tuple[float, dict | None]] = {}  # db path -> (when it is due again, menus)
_menus_lock = threading.Lock()


def options(db_path: str) -> dict | None:
    """The values the format, camera and year menus offer, with counts of live images;
    None until they have first been counted.

    Counting groups every row (about 6 s at a million images), so it never runs on a
    request: a background thread counts, and the counts are reused until they are due
    again, after OPTIONS_TTL seconds or 50 times as long as counting took (a new camera
    shows within a minute in a small collection, within minutes in a million).
    """
    with _menus_lock:
        due, menus = _menus.get(db_path, (0.0, None))
        if time.monotonic() >= due:
            _menus[db_path] = (math.inf, menus)  # one count at a time
            threading.Thread(target=_count_menus, args=(db_path,), name="gallery-menus", daemon=True).start()
    return menus


def _count_menus(db_path: str) -> None:
    started = time.monotonic()
    menus = None
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        try:
            menus = {
                name: conn.execute(
                    f"select {column}, count(*) from live_images where {column} is not null "
                    f"group by {column} order by count(*) desc limit 100"
                ).fetchall()
                for name, column in (("format", "format"), ("camera", "camera"), ("year", "taken_year"))
            }
            menus["place"] = conn.execute(
                "select count(*) from live_images where latitude is not null"
            ).fetchone()[0]
        finally:
            conn.close()
    finally:  # a failed count is tried again when due, like a stale one
        took = time.monotonic() - started
        with _menus_lock:
            previous = _menus.get(db_path, (0.0, None))[1]
            _menus[db_path] = (time.monotonic() + max(OPTIONS_TTL, 50 * took), menus or previous)


def label_chips(images: list[dict], limit: int = 12) -> list[tuple[str, int]]:
    """The labels the page's images carry most, for one-click filters: counted on the
    page, so the chips cost nothing at a million images and say what is on screen."""
    counts: dict[str, int] = {}
    for image in images:
        for label in image["labels"]:
            counts[label] = counts.get(label, 0) + 1
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:limit]


def image(conn: sqlite3.Connection, image_id: int) -> dict | None:
    """One image row, deleted or not, with its labels and its place on the map (if any)."""
    rows = _dicts(
        conn.execute(
            "select id, path, sha256, size, mtime, width, height, format, taken_at, camera, "
            "latitude, longitude, added_at, updated_at, model, deleted_at from images where id = ?",
            [image_id],
        )
    )
    if not rows:
        return None
    row = rows[0]
    row["name"] = os.path.basename(row["path"])
    row["labels"] = _dicts(
        conn.execute(
            "select rank, label, wnid, score from labels where image_id = ? order by rank", [image_id]
        )
    )
    has_map = conn.execute(
        "select 1 from sqlite_master where type = 'table' and name = 'projection'"
    ).fetchone()
    place = has_map and conn.execute("select x, y from projection where image_id = ?", [image_id]).fetchone()
    row["map_xy"] = tuple(place) if place else None  # its place on the map, 0 to 1 each way
    row["categories"] = image_categories(conn, image_id)
    return row


def image_categories(conn: sqlite3.Connection, image_id: int) -> list[dict]:
    """The image's categories below the broadest few, most specific first (one seek on
    image_categories' primary key); none where the collection has no categories."""
    has_categories = conn.execute(
        "select 1 from sqlite_master where type = 'table' and name = 'image_categories'"
    ).fetchone()
    if not has_categories:
        return []
    h = categories.hierarchy()
    found = [
        {"wnid": wnid, "name": h.categories[wnid].name, "depth": h.depth[wnid], "score": score}
        for wnid, score in conn.execute("select wnid, score from image_categories where image_id = ?", [image_id])
        if wnid in h.categories and h.depth[wnid] >= IMAGE_CATEGORY_DEPTH
    ]
    return sorted(found, key=lambda c: (-c["depth"], -c["score"], c["name"]))


def names(conn: sqlite3.Connection, ids: list[int]) -> dict[int, dict]:
    """id -> live row (name, top label) for the given ids, looked up through json_each."""
    return {
        row["id"]: {**row, "name": os.path.basename(row["path"])}
        for row in _dicts(
            conn.execute(
                "select id, path, top_label from live_images "
                "where id in (select value from json_each(?))",
                [json.dumps(ids)],
            )
        )
    }


def _dicts(cursor: sqlite3.Cursor) -> list[dict]:
    columns = [d[0] for d in cursor.description]
    return [dict(zip(columns, row)) for row in cursor.fetchall()]
