"""Serve the collection with Datasette: the plugins and metadata it needs, and the
blocking work the plugins run off the event loop (page data, reading image files).

Nothing here imports TensorFlow: the plugins import this module.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import os
import shutil
import sqlite3
import sys
from pathlib import Path

import datasette_plugins

from . import files
from .search import MAX_K  # the one cap on k (CLI, SQL functions, pages)

PLUGINS_DIR = Path(datasette_plugins.__file__).resolve().parent
# metadata.yml names the database "collection"; a --db of another name gets the same block.
METADATA_DATABASE = "collection"
# Facet suggestions group every column of the page's rows, each up to a time limit: at a
# million images that is a second of timed-out scans on every table page. The facets
# worth having are in metadata.yml.
SETTINGS = {"suggest_facets": False}

MEDIA_TYPES = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "GIF": "image/gif",
    "WEBP": "image/webp",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
}


class Refused(Exception):
    """A request the plugin answers with an error; the message says why, for a person."""


def find_metadata() -> Path | None:
    """metadata.yml beside the package (the project is installed editable), else in the
    current folder; None when neither has one."""
    for folder in (PLUGINS_DIR.parent, Path.cwd()):
        candidate = folder / "metadata.yml"
        if candidate.is_file():
            return candidate
    return None


def load_metadata(path: str | Path | None, database: str) -> dict:
    """The metadata file, with its collection block under the name Datasette gives ``database``."""
    from datasette.utils import parse_metadata

    if path is None:
        return {}
    metadata = parse_metadata(Path(path).read_text())
    databases = metadata.get("databases") or {}
    if database not in databases and METADATA_DATABASE in databases:
        databases[database] = databases.pop(METADATA_DATABASE)
    return metadata


def plugin_modules() -> list[str]:
    """The collection's Datasette plugins: the package (it carries templates/ and static/)
    and every ``*_plugin.py`` module in it, as pyproject.toml's entry points list them."""
    return ["datasette_plugins"] + sorted(
        f"datasette_plugins.{path.stem}" for path in PLUGINS_DIR.glob("*_plugin.py")
    )


def register_plugins() -> None:
    """Register the plugins that Datasette's entry points have not: an installed project
    has them all already; a checkout run without installing (PYTHONPATH) needs this."""
    from datasette.plugins import pm

    for name in plugin_modules():
        module = importlib.import_module(name)
        if not pm.is_registered(module):
            pm.register(module, name=name)


def open_datasette(db_path: str | Path, metadata_path: str | Path | None = None, **kwargs):
    """A Datasette for one collection database, with the plugins and the metadata."""
    from datasette.app import Datasette

    register_plugins()
    return Datasette(
        [str(db_path)],
        metadata=load_metadata(metadata_path, Path(db_path).stem),
        settings={**SETTINGS, **kwargs.pop("settings", {})},
        **kwargs,
    )


def run(
    db_path: str | Path, host: str, port: int, metadata_path: str | Path | None, access_log: bool = False
) -> None:
    """Start Datasette the way `datasette serve` does, and block until stopped. Without
    ``access_log`` only start-up and errors are logged: a page of thumbnails is dozens of
    requests, and their lines would bury the watcher's status line under `collection start`."""
    import asyncio

    import uvicorn

    # DATASETTE_SECRET as `datasette serve` reads it: signed cookies outlive a restart.
    ds = open_datasette(db_path, metadata_path, secret=os.environ.get("DATASETTE_SECRET"))
    asyncio.run(ds.invoke_startup())
    uvicorn.run(ds.app(), host=host, port=port, log_level="info", lifespan="on", access_log=access_log)


def cli_command() -> str:
    """How a person runs `collection` from the folder they started it in: the bare name
    when it is on their PATH, else the path of the one beside this Python (`make run`'s
    .venv/bin/collection), so every hint a page gives is a command that works."""
    here = Path(sys.executable).parent / "collection"
    on_path = shutil.which("collection")
    if on_path and (not here.exists() or Path(on_path).resolve() == here.resolve()):
        return "collection"
    if not here.exists():
        return f"{Path(sys.executable).name} -m collection"
    try:
        return str(here.relative_to(Path.cwd()))
    except ValueError:
        return str(here)


# --- request parameters -------------------------------------------------------------


def parse_k(value: str | None, default: int = 10) -> int:
    if value in (None, ""):
        return default
    try:
        k = int(value)
    except ValueError:
        raise Refused(f"k must be a whole number from 1 to {MAX_K}, not {value!r}") from None
    if not 1 <= k <= MAX_K:
        raise Refused(f"k must be a whole number from 1 to {MAX_K}, not {value!r}")
    return k


def parse_min_score(value: str | None, default: float = 0.0) -> float:
    if value in (None, ""):
        return default
    try:
        score = float(value)
    except ValueError:
        score = math.nan
    if not -1.0 <= score <= 1.0:  # also refuses nan
        raise Refused(f"min_score must be a number from -1 to 1 (cosine), not {value!r}")
    return score


# --- reads, run through Database.execute_fn -----------------------------------------


def _dicts(cursor: sqlite3.Cursor) -> list[dict]:
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def live_image(conn: sqlite3.Connection, image_id: int) -> dict | None:
    """The images row for ``image_id`` unless it is missing or deleted."""
    rows = _dicts(
        conn.execute(
            "select id, path, sha256, size, mtime, width, height, format, taken_at, camera, "
            "top_label, top_score, added_at from images where id = ? and deleted_at is null",
            [image_id],
        )
    )
    return rows[0] if rows else None


def similar_page(conn: sqlite3.Connection, image_id: int, neighbours: list[tuple[int, float]]) -> dict:
    """The rows a similar page shows: the image, its labels, and its neighbours in order."""
    image = live_image(conn, image_id)
    if image is None:
        raise KeyError(image_id)
    labels = _dicts(
        conn.execute(
            "select rank, label, wnid, score from labels where image_id = ? order by rank",
            [image_id],
        )
    )
    image["name"] = os.path.basename(image["path"])
    return {"image": image, "labels": labels, "similar": neighbour_rows(conn, neighbours)}


def neighbour_rows(conn: sqlite3.Connection, neighbours: list[tuple[int, float]]) -> list[dict]:
    """The images rows of a search's ``(id, score)`` neighbours, in order, with their scores."""
    ids = [n for n, _ in neighbours]
    rows = {}
    if ids:
        marks = ",".join("?" * len(ids))
        for row in _dicts(
            conn.execute(
                f"select id, path, top_label, top_score from images "
                f"where deleted_at is null and id in ({marks})",
                ids,
            )
        ):
            row["name"] = os.path.basename(row["path"])
            rows[row["id"]] = row
    # a row deleted between the index query and this read is left out
    return [{**rows[n], "score": score} for n, score in neighbours if n in rows]


def collection_totals(conn: sqlite3.Connection) -> dict:
    """What the collection holds now, whoever added it: the status page shows these beside
    the watcher's own counters, so a restarted watcher's zeros never look like data lost."""
    one = lambda sql: conn.execute(sql).fetchone()[0]  # noqa: E731
    failure = _dicts(conn.execute("select path, error, at from failures order by at desc limit 1"))
    return {
        "images": one("select count(*) from images where deleted_at is null"),
        "deleted": one("select count(*) from images where deleted_at is not null"),
        "failures": one("select count(*) from failures"),
        "last_added": one("select max(added_at) from images"),
        "last_failure": failure[0] if failure else None,
    }


def index_status(status: dict) -> dict:
    """What a page says about the index; not where its file is on the server."""
    return {key: status.get(key) for key in ("model", "indexed", "unindexed", "built_at", "n_trees")}


def thumbnail(conn: sqlite3.Connection, image_id: int) -> bytes | None:
    row = conn.execute(
        "select jpeg from thumbnails join images on images.id = thumbnails.image_id "
        "where image_id = ? and deleted_at is null",
        [image_id],
    ).fetchone()
    return row[0] if row else None


# --- the full-size file -------------------------------------------------------------


def read_image_file(row: dict) -> bytes:
    """The bytes of the file an images row describes, and nothing else.

    Only the row's own path is opened (a request never names a file), through the
    same check as ingest (collection/files.py): the real path must stay inside the
    file's own folder (a symlink re-pointed outside it is not even opened), it must
    be a regular file, and no more than the recorded size is read. The bytes must
    then hash to the recorded sha256: a file replaced since it was added, whatever
    its size and mtime, is refused until it is added again.
    """
    path = row["path"]
    folder = os.path.realpath(os.path.dirname(path))
    if not os.path.lexists(path):
        raise Refused("the file is no longer there")
    try:
        data, _ = files.read(path, [folder], max_bytes=row["size"] or 0)
    except files.TooBig:
        raise Refused("the file has changed since it was added; add it again to view it") from None
    except files.Unreadable as e:
        raise Refused(f"not served: {e}") from None
    if hashlib.sha256(data).hexdigest() != row["sha256"]:
        raise Refused("the file has changed since it was added; add it again to view it")
    return data


def media_type(fmt: str | None) -> str | None:
    return MEDIA_TYPES.get((fmt or "").upper())
