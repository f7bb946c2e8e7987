"""Datasette plugin for the collection map: the page ``/-/map``, its data ``/-/map.json``
and the thumbnail sprite atlases ``/-/map/atlas/<n>.jpg``.

Thin on purpose: the work is in ``collection.projection``, and nothing here imports
TensorFlow. The collection database, its permission checks and the templates folder
(map.html) come from the collection plugin beside this one. Requests name atlases by
number only; no part of a request path reaches the filesystem.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

from datasette import Response, hookimpl
from datasette.utils.asgi import BadRequest, NotFound

from collection import projection, serve
from datasette_plugins.collection_plugin import collection_db, collection_name, static_url

ATLAS_CACHE = 256  # atlases kept in memory: about 30 MB, every atlas of a 50k-image map
_atlases: OrderedDict[tuple, bytes] = OrderedDict()


@hookimpl
def register_routes():
    return [
        (r"^/-/map$", map_page),
        (r"^/-/map\.json$", map_json),
        (r"^/-/map/atlas/(?P<n>[0-9]{1,6})\.jpg$", atlas),
        (r"^/-/map/image/(?P<id>[0-9]{1,18})\.json$", card),
        # Anything else below /-/map/: a 404 that names the map's own routes.
        (r"^/-/map/(?P<rest>.*)$", not_on_the_map),
    ]


@hookimpl
def menu_links(datasette):
    async def inner():
        if await collection_name(datasette) is None:
            return []
        return [{"href": datasette.urls.path("/-/map"), "label": "Collection map"}]

    return inner


async def not_on_the_map():
    raise NotFound("Atlases are addressed by number, as in /-/map/atlas/0.jpg")


async def map_page(datasette, request):
    db = await collection_db(datasette, request)
    state = await db.execute_fn(projection.summary)
    urls = datasette.urls
    config = {
        "data": urls.path("/-/map.json"),
        "atlas": urls.path("/-/map/atlas/"),
        "card": urls.path("/-/map/image/"),
        "thumbnail": urls.path("/-/thumbnail/"),
        "similar": urls.path("/-/similar/"),
        # the highlight box also takes a category word (labels plugin; 404 without categories)
        "category_search": urls.path("/-/labels/search.json"),
        "category_ids": urls.path("/-/labels/"),
    }
    return Response.html(
        await datasette.render_template(
            "map.html",
            {
                "state": state,
                "config": config,
                "database": db.name,
                "db_file": Path(db.path).name if db.path else db.name,
                "cli": serve.cli_command(),
                "map_js": static_url(datasette, "map.js"),
                "auto_map_min": projection.AUTO_MAP_MIN,
            },
            request=request,
        )
    )


async def map_json(datasette, request):
    db = await collection_db(datasette, request)
    box = _box(request.args.get("box"))
    data = await db.execute_fn(lambda conn: projection.map_data(conn, box))
    # Compact separators: at 50k images the spaces alone would be half a megabyte.
    return Response(
        json.dumps(data, separators=(",", ":")),
        content_type="application/json; charset=utf-8",
        headers={"Cache-Control": "no-cache"},
    )


def _box(value: str | None) -> tuple[float, float, float, float] | None:
    """?box=x0,y0,x1,y1 in map units, or None for the whole map."""
    if value is None:
        return None
    try:
        x0, y0, x1, y1 = (float(part) for part in value.split(","))
    except ValueError:
        raise BadRequest("box is four numbers: x0,y0,x1,y1") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x0 > x1 or y0 > y1:
        raise BadRequest("box is x0,y0,x1,y1 with x0 <= x1 and y0 <= y1")
    return x0, y0, x1, y1


async def card(datasette, request):
    """The hover card's details of one image: file name, labels, dates."""
    db = await collection_db(datasette, request)
    image_id = int(request.url_vars["id"])
    data = await db.execute_fn(lambda conn: projection.map_card(conn, image_id))
    if data is None:
        raise NotFound(f"No image {image_id} on the map")
    return Response.json(data)


async def atlas(datasette, request):
    db = await collection_db(datasette, request)
    n = int(request.url_vars["n"])
    key = await db.execute_fn(lambda conn: projection.atlas_key(conn, n))
    if key is None:
        raise NotFound(f"No atlas {n} on the map")
    cache_key = (db.path, n, key)
    jpeg = _atlases.get(cache_key)
    if jpeg is None:
        jpeg = await db.execute_fn(lambda conn: projection.build_atlas(conn, n))
        if jpeg is None:
            raise NotFound(f"No atlas {n} on the map")
        _atlases[cache_key] = jpeg
        while len(_atlases) > ATLAS_CACHE:
            _atlases.popitem(last=False)
    _atlases.move_to_end(cache_key)
    # The page asks for ?v=<key>: that URL's content never changes, so it may be cached.
    versioned = request.args.get("v") == key
    return Response(
        jpeg,
        content_type="image/jpeg",
        headers={
            "Cache-Control": "max-age=86400" if versioned else "no-cache",
            "X-Content-Type-Options": "nosniff",
        },
    )
