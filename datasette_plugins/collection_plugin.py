"""Datasette plugin for a collection: the home page's links, the gallery, image pages,
live status, thumbnails in cells, full-size images, similar-image pages and the
similarity SQL functions.

Thin on purpose: the logic lives in ``collection.serve``, ``collection.gallery``,
``collection.live`` and ``collection.index``, and nothing here imports TensorFlow.
Requests name images by id only; no part of a request path ever reaches the filesystem.
Templates and static files are Datasette's own plugin folders (``templates/`` and
``static/`` beside this package), found through the entry points in pyproject.toml.
"""

from __future__ import annotations

import asyncio
import json
import time
import weakref
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlencode

from datasette import Response, hookimpl
from datasette.utils.asgi import BadRequest, NotFound
from markupsafe import Markup

from collection import gallery, live, projection, serve
from collection.search import one_blas_thread
from collection.index import open_index, register_functions

STATIC = Path(__file__).resolve().parent / "static"
ID = r"(?P<id>[0-9]{1,18})"  # at most 18 digits: always fits SQLite's 64-bit integer
ID_COLUMNS = {"image_id", "match_id"}  # in the collection's tables and in query results
IMAGE_TABLES = ("images", "live_images")
SIMILAR_STRIP = 12  # neighbours on an image page
# Formats a browser shows; an image page previews others by their thumbnail.
WEB_FORMATS = {"JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP"}
# The tables the home page lists, in this order, before any others: the ones a person
# browsing a collection opens (the rest stay one click away on the database page).
HOME_TABLES = ("live_images", "images", "labels", "matches", "failures", "ingest_log")
# Left off the home page even without metadata.yml (plain `datasette collection.db`).
BOOKKEEPING = {"_sqlite_migrations", "vector_changes", "projection_next"}


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
    if hasattr(datasette, "ensure_permissions"):  # Datasette 0.65
        await datasette.ensure_permissions(
            request.actor,
            [("view-table", (name, "images")), ("view-database", name), "view-instance"],
        )
    else:  # Datasette 1.0 alphas: one check, which takes the database and instance into account
        from datasette.resources import TableResource

        await datasette.ensure_permission(
            action="view-table", resource=TableResource(name, "images"), actor=request.actor
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
def startup(datasette):
    # Datasette 0.65's default error handler asks rich (which keras installs) to print
    # the exception being handled; for a plain 404 there is none, rich raises, and every
    # unknown URL becomes a 500. Without rich the handler renders the proper 404 page.
    import datasette.handle_exception as default_handler

    default_handler.rich = None
    one_blas_thread()  # similar-image queries are small products: fastest on one thread


def static_url(datasette, file: str) -> str:
    """The URL Datasette serves ``static/<file>`` at: /-/static-plugins/<name>/, where the
    name is the distribution's when installed and the package's when run from a checkout."""
    from datasette.plugins import get_plugins  # not at import: Datasette imports us from there

    for plugin in get_plugins():
        if plugin["static_path"] and Path(plugin["static_path"]) == STATIC:
            return datasette.urls.static_plugins(plugin["name"], file)
    raise LookupError(f"no plugin serves {STATIC}")


@hookimpl
def extra_css_urls(datasette):
    return [static_url(datasette, "collection.css")]


@hookimpl
def extra_js_urls(datasette):
    return [{"url": static_url(datasette, "collection.js"), "module": False}]


@hookimpl
def menu_links(datasette):
    async def inner():
        if await collection_name(datasette) is None:
            return []
        return [
            {"href": datasette.urls.path(path), "label": label}
            for path, label in (("/-/gallery", "Gallery"), ("/-/status", "Watcher status"))
        ]

    return inner


@hookimpl
def extra_template_vars(template, datasette):
    if template != "index.html":
        return None

    async def inner():
        name = await collection_name(datasette)
        if name is None:
            return {}
        db = datasette.get_database(name)
        tables = set(await db.table_names()) | set(await db.view_names())
        hidden = set(await db.hidden_table_names()) | BOOKKEEPING
        hidden |= {t for t in tables if t.startswith("sqlite_")}
        return {
            "collection": {
                "name": name,
                "pages": home_pages(datasette),
                "tables": [
                    {"name": t, "url": datasette.urls.table(name, t)}
                    for t in HOME_TABLES
                    if t in tables and t not in hidden
                ],
                "more": sorted(tables - hidden - set(HOME_TABLES)),
            }
        }

    return inner


def home_pages(datasette) -> list[dict]:
    """The collection's own pages, as the home page leads with them."""
    from datasette.plugins import pm

    urls = datasette.urls
    pages = [
        ("Gallery", "/-/gallery", "every image, newest first, by label, format, camera, year or place"),
        ("Map", "/-/map", "the collection laid out by similarity"),
    ]
    installed = {p.__name__ for p in pm.get_plugins()}
    if "datasette_plugins.duplicates_plugin" in installed:
        pages.append(("Duplicates", "/-/duplicates", "exact and near-identical copies, to review"))
    if "datasette_plugins.labels_plugin" in installed:
        pages.append(("Labels", "/-/labels", "the labels and the WordNet categories above them"))
    if "datasette_plugins.search_plugin" in installed:
        pages.append(("Search by example", "/-/search", "drop, paste or choose a picture; or a region of one"))
    pages += [
        ("Search by label", "/-/gallery#search", "images the model gave a label"),
        ("Watcher status", "/-/status", "what the watcher is doing now, and how current the index and map are"),
    ]
    return [{"label": label, "href": urls.path(path), "about": about} for label, path, about in pages]


@hookimpl
def register_routes():
    return [
        (r"^/-/gallery$", gallery_page),
        (rf"^/-/gallery/{ID}$", image_page),
        (r"^/-/status(?P<format>\.json)?$", status),
        (rf"^/-/thumbnail/{ID}\.jpg$", thumbnail),
        (rf"^/-/image/{ID}$", image),
        (rf"^/-/similar/{ID}(?P<format>\.json)?$", similar),
        # Anything else under these prefixes: a 404 that says how images are addressed.
        (r"^/-/(?:thumbnail|image|similar|gallery)/(?P<rest>.*)$", not_an_image),
    ]


@hookimpl
def render_cell(row, value, column, table, database, datasette):
    async def inner():
        if database != await collection_name(datasette):
            return None
        urls = datasette.urls
        if table in IMAGE_TABLES:
            return _images_cell(urls, row, column, value)
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


async def gallery_page(datasette, request):
    db = await collection_db(datasette, request)
    try:
        filters = gallery.Filters.from_args(request.args)
        before = gallery.parse_before(request.args.get("before"))
        below = gallery.parse_below(request.args.get("below"))
    except gallery.BadFilter as e:
        raise BadRequest(str(e)) from None
    if filters.category is not None and not await db.table_exists("image_categories"):
        raise BadRequest("This collection has no categories yet: open it with `collection serve` to upgrade it")

    found = await db.execute_fn(lambda conn: gallery.page(conn, filters, before, below=below))
    options = gallery.options(db.path)
    urls = datasette.urls

    def link(**changes) -> str:
        return urls.path("/-/gallery") + _query(filters.query(**changes))

    for card in found["images"]:
        card["page_url"] = urls.path(f"/-/gallery/{card['id']}")
        card["thumbnail_url"] = urls.path(f"/-/thumbnail/{card['id']}.jpg")
        card["label_urls"] = [(label, link(label=label)) for label in card["labels"][:3]]
    return Response.html(
        await datasette.render_template(
            "collection_gallery.html",
            {
                **found,
                "filters": filters,
                "options": options,
                "chips": [(label, n, link(label=label)) for label, n in gallery.label_chips(found["images"])],
                "clear": {
                    name: link(**{name: None}) for name in ("label", "category", "format", "camera", "year", "place")
                },
                "category_url": urls.path(f"/-/labels/{found['category'].wnid}") if found["category"] else None,
                "next_url": link(before=found["before"], below=found["below"]) if found["before"] else None,
                "first_url": link() if before is not None else None,
                "database": db.name,
                "table_url": urls.table(db.name, "live_images"),
            },
            request=request,
        )
    )


async def image_page(datasette, request):
    db = await collection_db(datasette, request)
    image_id = int(request.url_vars["id"])

    def query(conn):
        row = gallery.image(conn, image_id)
        if row is None or row["deleted_at"] is not None:
            return row, []
        neighbours = open_index(db.path).similar(image_id, k=SIMILAR_STRIP)
        known = gallery.names(conn, [n for n, _ in neighbours])
        return row, [{**known[n], "score": score} for n, score in neighbours if n in known]

    row, similar_rows = await db.execute_fn(query)
    if row is None:
        raise NotFound(f"No image {image_id} in the collection")
    urls = datasette.urls
    for other in similar_rows:
        other["page_url"] = urls.path(f"/-/gallery/{other['id']}")
        other["thumbnail_url"] = urls.path(f"/-/thumbnail/{other['id']}.jpg")
    deleted = row["deleted_at"] is not None
    full = urls.path(f"/-/image/{image_id}")
    return Response.html(
        await datasette.render_template(
            "collection_image.html",
            {
                "image": row,
                "deleted": deleted,
                "similar": similar_rows,
                "preview_url": full if (row["format"] or "").upper() in WEB_FORMATS else urls.path(f"/-/thumbnail/{image_id}.jpg"),
                "full_url": full,
                "similar_url": urls.path(f"/-/similar/{image_id}"),
                "map_url": urls.path("/-/map"),
                "row_url": urls.row(db.name, "images", str(image_id)),
                "gallery_url": urls.path("/-/gallery"),
                "label_url": lambda label: urls.path("/-/gallery") + _query({"label": label}),
                "category_url": lambda wnid: urls.path("/-/gallery") + _query({"category": wnid}),
                "size": _bytes(row["size"]),
                "modified": _when(row["mtime"]),
                "added": _stamp(row["added_at"]),
                "updated": _stamp(row["updated_at"]),
                "deleted_on": _stamp(row["deleted_at"]),
                "database": db.name,
            },
            request=request,
        )
    )


async def status(datasette, request):
    db = await collection_db(datasette, request)

    def query(conn):
        return serve.collection_totals(conn), serve.index_status(open_index(db.path).status())

    totals, index = await db.execute_fn(query)
    state = {
        "watcher": live.read(db.path),
        "collection": totals,
        "index": index,
        "map": await db.execute_fn(projection.summary),
        "at": time.time(),
    }
    if request.url_vars.get("format"):
        return Response.json(state)
    return Response.html(
        await datasette.render_template(
            "collection_status.html",
            {
                **state,
                "json_url": datasette.urls.path("/-/status.json"),
                "failures_url": datasette.urls.table(db.name, "failures"),
                "cli": serve.cli_command(),
                "db_file": Path(db.path).name,
                "database": db.name,
            },
            request=request,
        )
    )


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
        row = await db.execute_fn(lambda conn: gallery.image(conn, image_id))
        if row is None:
            raise NotFound(f"No image {image_id} in the collection") from None
        # A deleted image (an old link, a bookmark): its page says so and keeps its history.
        page_url = datasette.urls.path(f"/-/gallery/{image_id}")
        if request.url_vars.get("format"):
            return Response.json(
                {"error": f"The file of image {image_id} was deleted on {row['deleted_at']}; "
                          "it has no similar images", "image_url": page_url, "deleted_at": row["deleted_at"]},
                status=404,
            )
        return Response.redirect(page_url)
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
        '<a href="{}" title="Image {}"><img class="collection-thumb" src="{}" alt="image {}" '
        'loading="lazy"></a>'
    ).format(urls.path(f"/-/gallery/{image_id}"), image_id, urls.path(f"/-/thumbnail/{image_id}.jpg"), image_id)


def _images_cell(urls, row, column: str, value) -> Markup | None:
    """The images table (and live_images) made readable: the thumbnail with its file name
    and labels beside it, hashes shortened, times and sizes for people."""
    image_id = _get(row, "id")
    if column == "path" and image_id is not None and isinstance(value, str):
        folder, _, name = value.rpartition("/")
        gone = _value(row, "deleted_at")
        return Markup(
            '<div class="collection-cell collection-path-cell">{}<span class="collection-path">'
            '<strong>{}</strong><br><small>{}/</small></span>{}{}</div>'
        ).format(
            Markup('<span class="collection-deleted">file deleted</span>') if gone else _thumb(urls, image_id),
            name,
            folder,
            _chips(urls, _value(row, "labels")),
            Markup("") if gone else Markup('<a class="collection-similar" href="{}">similar images</a>').format(
                urls.path(f"/-/similar/{image_id}")
            ),
        )
    if column == "id" and isinstance(value, int):  # the row page; tables show it as the link
        return Markup('{} <a class="collection-similar" href="{}">image page</a>').format(
            value, urls.path(f"/-/gallery/{value}")
        )
    if column == "labels" and isinstance(value, str):
        return _chips(urls, value)
    if column == "sha256" and isinstance(value, str) and len(value) > 12:
        return Markup('<code title="{}">{}…</code>').format(value, value[:12])
    if column == "mtime" and isinstance(value, (int, float)):
        return Markup('<span title="{}">{}</span>').format(value, _when(value))
    if column == "size" and isinstance(value, int):
        return Markup('<span title="{:,} bytes">{}</span>').format(value, _bytes(value))
    if column == "top_score" and isinstance(value, float):
        return Markup("{:.3f}").format(value)
    if column == "deleted_at" and value:
        return Markup('<span class="collection-deleted">deleted {}</span>').format(value)
    return None


def _chips(urls, labels_json) -> Markup:
    """A JSON array of labels as links to the gallery filtered by each."""
    try:
        labels = json.loads(labels_json) if isinstance(labels_json, str) else []
    except ValueError:
        return Markup("")
    if not isinstance(labels, list):
        return Markup("")
    return Markup('<span class="collection-chips">{}</span>').format(
        Markup("").join(
            Markup('<a class="collection-chip" href="{}">{}</a>').format(
                urls.path("/-/gallery") + _query({"label": str(label)}), str(label)
            )
            for label in labels[:5]
        )
    )


def _value(row, key):
    try:
        return row[key]
    except (IndexError, KeyError):
        return None


def _query(params: dict) -> str:
    return "?" + urlencode(params) if params else ""


def _when(unix) -> str | None:
    if not isinstance(unix, (int, float)):
        return None
    return datetime.fromtimestamp(unix, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _stamp(iso: str | None) -> str | None:
    """The store's UTC ISO stamps (2026-12-02T17:29:56+00:00) as _when writes times."""
    try:
        return _when(datetime.fromisoformat(iso).timestamp()) if iso else None
    except ValueError:
        return iso


def _bytes(n) -> str | None:
    if not isinstance(n, int):
        return None
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return None


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
