"""Datasette plugin for a collection: thumbnails in cells, full-size images, similar-image
pages and the similarity SQL functions.

Thin on purpose: the logic lives in ``collection.serve`` and ``collection.index``, and
nothing here imports TensorFlow. Requests name images by id only; no part of a request
path ever reaches the filesystem.
"""

from __future__ import annotations

import asyncio
import weakref
from pathlib import Path

from datasette import Response, hookimpl
from datasette.utils.asgi import BadRequest, NotFound
from jinja2 import ChoiceLoader, FileSystemLoader
from markupsafe import Markup

from collection import serve
from collection.index import open_index, register_functions

TEMPLATES = Path(__file__).resolve().parent / "templates"
ID = r"(?P<id>[0-9]{1,18})"  # at most 18 digits: always fits SQLite's 64-bit integer
ID_COLUMNS = {"image_id", "match_id"}  # in the collection's tables and in query results

CSS = """
.collection-cell { display: flex; flex-direction: column; align-items: flex-start; gap: 0.25em; }
.collection-path-cell { min-width: 12em; max-width: 24em; }
.collection-thumb { max-width: 128px; max-height: 96px; border-radius: 3px; display: block; }
.collection-path { overflow-wrap: anywhere; font-size: 0.9em; }
.collection-similar { white-space: nowrap; font-size: 0.85em; }
.collection-hero { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
.collection-hero img { max-width: 256px; max-height: 256px; border-radius: 4px; }
.collection-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr));
  gap: 1em; padding: 0; margin: 1em 0; list-style: none; }
.collection-grid figure { margin: 0; padding: 0.5em; border: 1px solid #ddd; border-radius: 4px;
  background: #fafafa; }
.collection-grid img { width: 100%; height: 150px; object-fit: contain; display: block; }
.collection-grid figcaption { font-size: 0.85em; margin-top: 0.4em; overflow-wrap: anywhere; }
.collection-score { font-weight: bold; font-variant-numeric: tabular-nums; }
.collection-status { color: #555; font-size: 0.9em; }
.collection-form { margin: 1em 0; display: flex; flex-wrap: wrap; gap: 1em; align-items: center; }
.collection-form label { width: auto; font-weight: normal; }
.collection-form input[type=number] { width: 5em; }
"""

# Which database of a Datasette instance is the collection, once found.
_collections: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


async def collection_name(datasette) -> str | None:
    """The configured database, else the first one with the collection's tables."""
    if datasette not in _collections:
        name = (datasette.plugin_config("collection") or {}).get("database")
        if name is None:
            for candidate, db in datasette.databases.items():
                if db.path and all(
                    [await db.table_exists(t) for t in ("images", "vectors", "thumbnails")]
                ):
                    name = candidate
                    break
        _collections[datasette] = name  # None too: render_cell asks once per cell
    return _collections[datasette]


async def collection_db(datasette, request):
    """The collection database, after the permission checks its images table would get."""
    name = await collection_name(datasette)
    if name is None or name not in datasette.databases:
        raise NotFound("This Datasette has no collection database")
    await datasette.ensure_permissions(
        request.actor,
        [("view-table", (name, "images")), ("view-database", name), "view-instance"],
    )
    return datasette.get_database(name)


# --- hooks ---------------------------------------------------------------------------


@hookimpl
def prepare_connection(conn, database, datasette):
    db = datasette.databases.get(database)
    has_vectors = conn.execute(
        "select 1 from sqlite_master where type = 'table' and name = 'vectors'"
    ).fetchone()
    if db is not None and db.path and has_vectors:
        register_functions(conn, db.path)


@hookimpl
def prepare_jinja2_environment(env):
    # A --plugins-dir plugin gets no templates folder of its own; add ours after the
    # existing ones, so a --template-dir can still override collection_*.html.
    env.loader = ChoiceLoader([env.loader, FileSystemLoader(str(TEMPLATES))])


@hookimpl
def startup(datasette):
    # Datasette 0.65's default error handler asks rich (which keras installs) to print
    # the exception being handled; for a plain 404 there is none, rich raises, and every
    # unknown URL becomes a 500. Without rich the handler renders the proper 404 page.
    import datasette.handle_exception as default_handler

    default_handler.rich = None


@hookimpl
def extra_css_urls(datasette):
    return [datasette.urls.path("/-/collection.css")]


@hookimpl
def register_routes():
    return [
        (r"^/-/collection\.css$", css),
        (rf"^/-/thumbnail/{ID}\.jpg$", thumbnail),
        (rf"^/-/image/{ID}$", image),
        (rf"^/-/similar/{ID}(?P<format>\.json)?$", similar),
        # Anything else under these prefixes: a 404 that says how images are addressed.
        (r"^/-/(?:thumbnail|image|similar)/(?P<rest>.*)$", not_an_image),
    ]


@hookimpl
def render_cell(row, value, column, table, database, datasette):
    async def inner():
        if database != await collection_name(datasette):
            return None
        urls = datasette.urls
        if table == "images" and column == "path":
            image_id = _get(row, "id")
            return None if image_id is None else _image_cell(urls, image_id, value)
        if table == "images" and column == "id":  # the row page; tables show it as the link
            return Markup('{} <a class="collection-similar" href="{}">similar images</a>').format(
                value, urls.path(f"/-/similar/{value}")
            )
        if table == "thumbnails" and column == "jpeg":
            image_id = _get(row, "image_id")
            return None if image_id is None else _thumb(urls, image_id)
        if table == "vectors" and column == "vector" and isinstance(value, bytes):
            return Markup("<em>{:,}-dimension float32 vector</em>").format(len(value) // 4)
        if column in ID_COLUMNS and table in (None, "labels", "matches", "thumbnails"):
            image_id = _as_id(value)
            if image_id is not None:
                return _id_cell(datasette, database, image_id)
        return None

    return inner


# --- routes ----------------------------------------------------------------------------


async def css():
    return Response(CSS, content_type="text/css; charset=utf-8")


async def not_an_image(request):
    raise NotFound("Images are addressed by their numeric id, as in /-/similar/1")


async def thumbnail(datasette, request):
    db = await collection_db(datasette, request)
    image_id = int(request.url_vars["id"])
    jpeg = await db.execute_fn(lambda conn: serve.thumbnail(conn, image_id))
    if jpeg is None:
        raise NotFound(f"No thumbnail for image {image_id}")
    return Response(
        jpeg,
        content_type="image/jpeg",
        headers={"Cache-Control": "max-age=60", "X-Content-Type-Options": "nosniff"},
    )


async def image(datasette, request):
    db = await collection_db(datasette, request)
    image_id = int(request.url_vars["id"])
    row = await db.execute_fn(lambda conn: serve.live_image(conn, image_id))
    if row is None:
        raise NotFound(f"No image {image_id}")
    try:
        data = await asyncio.to_thread(serve.read_image_file, row)
    except serve.Refused as e:
        raise NotFound(f"Image {image_id} cannot be shown: {e}") from None
    headers = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'"}
    media_type = serve.media_type(row["format"])
    if media_type is None:  # not something a browser shows: offer it as a download
        media_type = "application/octet-stream"
        headers["Content-Disposition"] = "attachment"
    return Response(data, content_type=media_type, headers=headers)


async def similar(datasette, request):
    db = await collection_db(datasette, request)
    image_id = int(request.url_vars["id"])
    try:
        k = serve.parse_k(request.args.get("k"))
        min_score = serve.parse_min_score(request.args.get("min_score"))
    except serve.Refused as e:
        raise BadRequest(str(e)) from None

    def query(conn):
        searcher = open_index(db.path)
        neighbours = searcher.similar(image_id, k=k, min_score=min_score)
        status = searcher.status()
        return {**serve.similar_page(conn, image_id, neighbours), "index": serve.index_status(status)}

    try:
        page = await db.execute_fn(query)
    except KeyError:
        raise NotFound(f"No image {image_id} in the collection") from None
    page.update(k=k, min_score=min_score)
    urls = datasette.urls
    for row in (page["image"], *page["similar"]):
        row["thumbnail_url"] = urls.path(f"/-/thumbnail/{row['id']}.jpg")
        row["image_url"] = urls.path(f"/-/image/{row['id']}")
        row["similar_url"] = urls.path(f"/-/similar/{row['id']}")
        row["row_url"] = urls.row(db.name, "images", str(row["id"]))
    if request.url_vars.get("format"):
        return Response.json(page)
    return Response.html(
        await datasette.render_template(
            "collection_similar.html",
            {**page, "database": db.name, "json_url": urls.path(f"/-/similar/{image_id}.json")},
            request=request,
        )
    )


# --- cells -----------------------------------------------------------------------------


def _get(row, key) -> int | None:
    try:
        return _as_id(row[key])
    except (IndexError, KeyError):
        return None


def _as_id(value) -> int | None:
    if isinstance(value, dict):  # a foreign key Datasette has expanded to {"value", "label"}
        value = value.get("value")
    return value if isinstance(value, int) else None


def _thumb(urls, image_id: int) -> Markup:
    return Markup(
        '<a href="{}" title="Full size"><img class="collection-thumb" src="{}" alt="image {}" '
        'loading="lazy"></a>'
    ).format(urls.path(f"/-/image/{image_id}"), urls.path(f"/-/thumbnail/{image_id}.jpg"), image_id)


def _image_cell(urls, image_id: int, path: str) -> Markup:
    return Markup(
        '<div class="collection-cell collection-path-cell">{}<span class="collection-path">{}</span>'
        '<a class="collection-similar" href="{}">similar images</a></div>'
    ).format(_thumb(urls, image_id), path, urls.path(f"/-/similar/{image_id}"))


def _id_cell(datasette, database: str, image_id: int) -> Markup:
    urls = datasette.urls
    return Markup(
        '<div class="collection-cell">{}<a href="{}">{}</a>'
        '<a class="collection-similar" href="{}">similar images</a></div>'
    ).format(
        _thumb(urls, image_id),
        urls.row(database, "images", str(image_id)),
        image_id,
        urls.path(f"/-/similar/{image_id}"),
    )
