"""Datasette plugin for search by example: ``/-/search``, a page to drop, paste or
choose an image (or to show a region of one of the collection's images), and
``/-/search.json``, the same search for programs.

Thin on purpose, and light: the image is embedded by ``collection.embedder``, which
hands it to the watcher daemon or an on-demand worker over the collection's Unix
socket, so this process never imports TensorFlow and never decodes an upload. The
form is read by ``collection.uploads`` (bounded in memory, 413 while reading), the
neighbours come from the collection's similarity index, and the rows from
``collection.serve``. The region search (``image_id`` and ``box``) reads the image's
file only through ``serve.read_image_file``, the same guarded read as /-/image/<id>.

CSRF: the page's form carries Datasette's ``csrftoken`` field, and the check is the
one asgi-csrf makes, done here: a request that carries cookies (a browser's) must present
the token of its ``ds_csrftoken`` cookie, in the form or the ``x-csrftoken`` header, or it
is refused 403 before anything is embedded; one without cookies (curl, a script) or with
``Authorization: Bearer`` is not asked for one, as asgi-csrf does not ask. Why not leave
it to asgi-csrf: version 0.11 cannot read a multipart body with python-multipart 0.0.26
or later (``FormParser`` lost ``FileClass``: simonw/asgi-csrf#38, open), so every upload
from a browser would be a 500; and a python-multipart before 0.0.26 has CVE-2026-40347.
So ``skip_csrf`` hands these two paths, and only these, to the check here.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from dataclasses import dataclass
from urllib.parse import urlencode

from datasette import Response, hookimpl

from collection import embedder, serve, uploads
from collection.embedder import EmbedError
from collection.files import MAX_BYTES as FILE_MAX_BYTES
from collection.search import open_index
from collection.uploads import Rejected
from datasette_plugins.collection_plugin import collection_db, collection_name, static_url

DEFAULT_K = 12  # a grid of 2 to 6 rows across
EMBED_TIMEOUT = 60.0  # seconds for an answer, a worker's model loading included
IMAGE_ID = re.compile(r"[0-9]{1,18}")
SEARCH_PATH = re.compile(r"/-/search(\.json)?")


@dataclass
class Query:
    """What to search for: uploaded bytes or a collection image, maybe a region of it."""

    k: int
    min_score: float
    data: bytes | None = None
    filename: str | None = None
    image_id: int | None = None
    box: list[str] | None = None  # left, top, right, bottom as sent; checked by the embedder


@hookimpl
def register_routes():
    return [(r"^/-/search(?P<format>\.json)?$", search)]


@hookimpl
def skip_csrf(datasette, scope):
    """This plugin checks the token of its own POSTs: see the module's docstring."""
    path = scope.get("path", "")
    base = datasette.setting("base_url").rstrip("/")
    return scope.get("type") == "http" and path.startswith(base) and SEARCH_PATH.fullmatch(path[len(base):]) is not None


@hookimpl
def menu_links(datasette):
    async def inner():
        if await collection_name(datasette) is None:
            return []
        return [{"href": datasette.urls.path("/-/search"), "label": "Search by example image"}]

    return inner


@hookimpl
def extra_template_vars(template, datasette):
    """The search page and the image page (its region select) load search.js."""
    if template not in ("collection_search.html", "collection_image.html"):
        return None
    return {"search_js": static_url(datasette, "search.js"), "search_url": datasette.urls.path("/-/search")}


async def search(datasette, request):
    as_json = bool(request.url_vars.get("format"))
    db = await collection_db(datasette, request)
    limit = embedder.upload_max_bytes()
    k, min_score = DEFAULT_K, 0.0
    try:
        query = await read_query(request, limit)
        k, min_score = query.k, query.min_score
        if query.data is None and query.image_id is None:
            if as_json:
                raise Rejected(400, "POST a multipart/form-data field named image, or give image_id (and box)")
            return await render(datasette, request, db, {"k": k, "min_score": min_score})
        found = await run(datasette, db, query)
    except EmbedError as e:  # Rejected too: refused before embedding
        if as_json:
            return Response.json({"ok": False, "status": e.status, "error": e.message}, status=e.status)
        error = {"status": e.status, "message": e.message}
        return await render(datasette, request, db, {"k": k, "min_score": min_score, "error": error}, e.status)
    if as_json:
        return Response.json(found)
    return await render(datasette, request, db, found)


async def read_query(request, limit: int) -> Query:
    """The request's search, from a POSTed form or the query string (a bare GET: no image)."""
    form: dict[str, uploads.Part] = {}
    if request.method == "POST":
        form = await uploads.read_form(request.receive, request.headers, limit)
        check_csrf(request, form)
    elif request.method != "GET":
        raise Rejected(405, f"{request.method} is not a search: GET the page, POST an image")

    def field(name: str) -> str | None:
        part = form.get(name)
        if part is not None and part.filename is None:
            return part.text.strip()
        return request.args.get(name)

    try:
        k = serve.parse_k(field("k"), DEFAULT_K)
        min_score = serve.parse_min_score(field("min_score"))
    except serve.Refused as e:
        raise Rejected(400, str(e)) from None
    box = field("box") or None
    query = Query(k, min_score, box=box.split(",") if box else None)
    upload = form.get("image")
    if upload is not None and upload.filename is None:
        raise Rejected(400, "the field image must be a file (multipart/form-data), not text")
    if upload is not None and (upload.data or upload.filename):  # a form sent with no file chosen has neither
        query.data, query.filename = upload.data, upload.filename or None
        return query
    image_id = field("image_id")
    if image_id:
        if not IMAGE_ID.fullmatch(image_id):
            raise Rejected(400, f"image_id must be an image's number, not {image_id[:40]!r}")
        query.image_id = int(image_id)
        return query
    if request.method == "POST" or box:
        raise Rejected(400, "no image: choose, drop or paste one (the form field image), or give image_id")
    return query  # a bare GET: the page, with its form


def check_csrf(request, form: dict[str, uploads.Part]) -> None:
    """asgi-csrf's rule (skip_csrf takes it off these paths): a request with cookies
    presents its cookie's token, in the header or the form, unless it has a Bearer token."""
    headers = request.headers
    expected = request.scope.get("csrftoken")  # asgi-csrf's: the signed cookie's token, else a new one
    if expected is None:  # no asgi-csrf (Datasette 1.0 checks Sec-Fetch-Site before any view)
        return
    if not headers.get("cookie") or headers.get("authorization", "").startswith("Bearer "):
        return
    part = form.get("csrftoken")
    given = headers.get("x-csrftoken") or (part.text if part is not None and part.filename is None else "")
    if not given or not secrets.compare_digest(given.encode(), expected().encode()):  # bytes: any text compares
        raise Rejected(403, "the form's CSRF token is missing or out of date: reload the page and try again")


async def run(datasette, db, query: Query) -> dict:
    """Embed the query where the model lives, then search the collection with its vector."""
    max_bytes = None
    source = None
    if query.image_id is not None:
        row = await db.execute_fn(lambda conn: serve.live_image(conn, query.image_id))
        if row is None:
            raise Rejected(404, f"No image {query.image_id} in the collection")
        try:
            query.data = await asyncio.to_thread(serve.read_image_file, row)
        except serve.Refused as e:
            raise Rejected(404, f"Image {query.image_id} cannot be searched: {e}") from None
        max_bytes = FILE_MAX_BYTES  # a collection file: the ingest limit, not the upload limit
        source = {**row, "name": row["path"].rsplit("/", 1)[-1]}
    embedding = await asyncio.to_thread(
        embedder.embed, db.path, query.data, query.box, timeout=EMBED_TIMEOUT, max_bytes=max_bytes
    )

    def neighbours(conn):
        searcher = open_index(db.path)
        status = searcher.status()
        if status["model"] and status["model"] != embedding.model:
            raise Rejected(503, f"the embedding came from model {embedding.model}, "
                                f"but the collection holds {status['model']} vectors")
        extra = 1 if query.image_id is not None else 0  # the image itself is left out of its region's search
        try:
            found = searcher.similar_to_vector(embedding.vector, k=query.k + extra, min_score=query.min_score)
        except ValueError as e:
            raise Rejected(503, f"the embedding does not fit this collection: {e}") from None
        found = [(n, score) for n, score in found if n != query.image_id][: query.k]
        return serve.neighbour_rows(conn, found), serve.index_status(status)

    results, index = await db.execute_fn(neighbours)
    urls = datasette.urls
    for row in results:
        row["page_url"] = urls.path(f"/-/gallery/{row['id']}")
        row["thumbnail_url"] = urls.path(f"/-/thumbnail/{row['id']}.jpg")
        row["similar_url"] = urls.path(f"/-/similar/{row['id']}")
    found = {
        "labels": [{"label": label, "score": score} for label, score in embedding.labels],
        "results": results,
        "query": {"upload": query.filename or "(no name)"} if source is None else {
            "image_id": query.image_id, "box": [float(v) for v in query.box] if query.box else None,
        },
        "model": embedding.model,
        "via": embedding.via,
        "seconds": round(embedding.seconds, 3),
        "k": query.k,
        "min_score": query.min_score,
        "index": index,
    }
    if source is not None:
        found["source"] = {
            "id": source["id"], "name": source["name"], "path": source["path"],
            "page_url": urls.path(f"/-/gallery/{source['id']}"),
            "thumbnail_url": urls.path(f"/-/thumbnail/{source['id']}.jpg"),
        }
    return found


async def render(datasette, request, db, context: dict, status: int = 200) -> Response:
    urls = datasette.urls
    query = context.get("query") or {}
    box = query.get("box")
    context = {
        **context,
        "database": db.name,
        "action_url": urls.path("/-/search"),
        "json_url": urls.path("/-/search.json"),
        "absolute_json_url": datasette.absolute_url(request, urls.path("/-/search.json")),
        "gallery_url": urls.path("/-/gallery"),
        "label_url": lambda label: urls.path("/-/gallery") + "?" + urlencode({"label": label}),
        "limit": _megabytes(embedder.upload_max_bytes()),
        # the region as CSS percentages over the source image's thumbnail
        "box_style": (
            f"left: {box[0] * 100:.2f}%; top: {box[1] * 100:.2f}%; "
            f"width: {(box[2] - box[0]) * 100:.2f}%; height: {(box[3] - box[1]) * 100:.2f}%"
        ) if box else None,
    }
    return Response.html(await datasette.render_template("collection_search.html", context, request=request), status=status)


def _megabytes(n: int) -> str:
    return f"{n / 1e6:g} MB" if n >= 1_000_000 else f"{n:,} bytes"
