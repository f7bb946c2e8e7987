"""Datasette plugin for labels at every level (collection/categories.py): the tree page
``/-/labels`` and a page per category ``/-/labels/<wnid>`` (both also as ``.json``),
word search ``/-/labels/search.json?q=``, a category's image ids for the map
``/-/labels/<wnid>/ids.json``, a ``?_category=`` filter and a ``category`` facet for
every table with image ids.

Thin on purpose: the hierarchy and the queries are in ``collection.categories``, and
nothing here imports TensorFlow. The collection database, its permission checks and
the templates folder come from the collection plugin beside this one. Requests name
categories by wnid (``n`` and eight digits) or by a word; no part of a request reaches
the filesystem.
"""

from __future__ import annotations

import json
import re

from datasette import Response, hookimpl
from datasette.facets import Facet
from datasette.filters import FilterArguments
from datasette.database import QueryInterrupted
from datasette.utils import path_with_removed_args, path_with_replaced_args
from datasette.utils.asgi import NotFound

from collection import categories
from datasette_plugins.collection_plugin import collection_db, collection_name

WNID = r"(?P<wnid>n[0-9]{8})"
THUMBNAILS = 4  # per category in the tree and in lists
PAGE_SIZE = 60  # images on a category's page
MAX_LIMIT = 1000
MAX_QUERY = 200  # characters of a search


@hookimpl
def register_routes():
    return [
        (r"^/-/labels(?P<format>\.json)?$", labels_tree),
        (r"^/-/labels/search\.json$", labels_search),
        (rf"^/-/labels/{WNID}(?P<format>\.json)?$", category_page),
        (rf"^/-/labels/{WNID}/ids\.json$", category_ids),
    ]


@hookimpl
def menu_links(datasette):
    async def inner():
        if await collection_name(datasette) is None:
            return []
        return [{"href": datasette.urls.path("/-/labels"), "label": "Labels at every level"}]

    return inner


async def _db(datasette, request):
    db = await collection_db(datasette, request)
    if not await db.table_exists("image_categories"):
        raise NotFound("This collection has no categories yet: open it with `collection serve` to upgrade it")
    return db


def _int(request, name: str, default: int, high: int) -> int:
    value = request.args.get(name, "")
    return min(max(int(value), 0), high) if value.isdigit() else default


def _json(data) -> Response:
    return Response(
        json.dumps(data, separators=(",", ":")),
        content_type="application/json; charset=utf-8",
        headers={"Cache-Control": "no-cache"},
    )


async def _html(datasette, request, db, context: dict) -> Response:
    return Response.html(
        await datasette.render_template(
            "labels.html",
            {
                "database": db.name,
                "links": {
                    "labels": datasette.urls.path("/-/labels"),
                    "thumbnail": datasette.urls.path("/-/thumbnail/"),
                    "similar": datasette.urls.path("/-/similar/"),
                    "images": datasette.urls.table(db.name, "images"),
                    "sql": datasette.urls.database(db.name),
                },
                **context,
            },
            request=request,
        )
    )


async def labels_tree(datasette, request):
    db = await _db(datasette, request)
    query = request.args.get("q", "")[:MAX_QUERY]
    tree = await db.execute_fn(lambda conn: categories.tree(conn, THUMBNAILS))
    found = (
        await db.execute_fn(lambda conn: categories.search_results(conn, query, 50, THUMBNAILS))
        if query.strip() else []
    )
    if request.url_vars.get("format"):
        return _json({"tree": tree, **({"q": query, "results": found} if query else {})})
    # The best match's images, on the page itself: a word search shows pictures at once.
    best = found[0] if found and found[0]["images"] else None
    if best:
        best["top"] = await db.execute_fn(lambda conn: categories.top_images(conn, best["wnid"], PAGE_SIZE))
    threshold = await db.execute_fn(categories.threshold)
    return await _html(
        datasette, request, db, {"tree": tree, "q": query, "found": found, "best": best, "threshold": threshold}
    )


async def labels_search(datasette, request):
    db = await _db(datasette, request)
    query = request.args.get("q", "")[:MAX_QUERY]
    limit = _int(request, "limit", 20, 100)
    found = await db.execute_fn(lambda conn: categories.search_results(conn, query, limit, THUMBNAILS))
    return _json({"q": query, "results": found})


async def category_page(datasette, request):
    db = await _db(datasette, request)
    wnid = request.url_vars["wnid"]
    if wnid not in categories.hierarchy().categories:
        raise NotFound(f"{wnid} is not a category above the ImageNet classes")
    limit = _int(request, "limit", PAGE_SIZE, MAX_LIMIT)
    offset = _int(request, "offset", 0, 10**9)
    data = await db.execute_fn(lambda conn: categories.page(conn, wnid, limit, offset, THUMBNAILS))
    if request.url_vars.get("format"):
        return _json(data)
    return await _html(datasette, request, db, {"category": data, "q": ""})


async def category_ids(datasette, request):
    db = await _db(datasette, request)
    wnid = request.url_vars["wnid"]
    if wnid not in categories.hierarchy().categories:
        raise NotFound(f"{wnid} is not a category above the ImageNet classes")
    return _json({"wnid": wnid, "ids": await db.execute_fn(lambda conn: categories.live_ids(conn, wnid))})


# --- ?_category= on any table with image ids, and the category facet ------------------


async def _id_column(datasette, database: str, table: str) -> str | None:
    """The column holding image ids: ``id`` in images, ``image_id`` elsewhere."""
    if database != await collection_name(datasette):
        return None
    db = datasette.get_database(database)
    if not await db.table_exists("image_categories"):
        return None
    if table == "images":
        return "id"
    return "image_id" if "image_id" in await db.table_columns(table) else None


@hookimpl
def filters_from_request(request, database, table, datasette):
    values = request.args.getlist("_category")
    if not values or not table:
        return None

    async def inner():
        column = await _id_column(datasette, database, table)
        if column is None:
            return None
        h = categories.hierarchy()
        clauses, params, descriptions = [], {}, []
        for n, value in enumerate(values):
            wnids = h.resolve(value[:MAX_QUERY])
            names = [f"{h.categories[w].name} ({w})" for w in wnids]
            keys = [f"category_{n}_{k}" for k in range(len(wnids))]
            params.update(zip(keys, wnids))
            clauses.append(categories.filter_sql(column, keys) if keys else "0")
            descriptions.append(
                f"in category {' or '.join(names)}" if names else f"in category {value!r}, which WordNet does not know"
            )
        return FilterArguments(clauses, params, descriptions)

    return inner


@hookimpl
def register_facet_classes():
    return [CategoryFacet]


class CategoryFacet(Facet):
    """``?_facet_category=<image id column>``: counts per category that roll up ("dog"
    counts every breed). Shows the children of the ``?_category=`` in force, or of
    the first category where the rows branch; each toggles that category's filter."""

    type = "category"

    async def suggest(self):
        return []

    async def facet_results(self):
        results, timed_out = [], []
        h = categories.hierarchy()
        chosen = [v for k, v in self.get_querystring_pairs() if k == "_category"]
        resolved = h.resolve(chosen[-1]) if chosen else []
        for source_and_config in self.get_configs():
            config = source_and_config["config"]
            column = config.get("column") or config["simple"]
            # The whole images table: counts kept current by triggers, not a pass over it.
            whole = self.table == "images" and re.search(r"\bfrom images\s*$", self.sql)
            sql = categories.ALL_IMAGES_FACET_SQL if whole else categories.facet_sql(self.sql, column)
            focus = resolved[0] if len(resolved) == 1 else categories.ROOT
            wanted = [categories.ROOT, focus]  # every image with categories is under the root
            counted: dict[str, int] = {}
            try:
                # Walk down while every row sits in one child: "entity > physical entity > object" says nothing.
                while True:
                    kids = h.children[focus]
                    rows = await self.ds.execute(
                        self.database,
                        sql,
                        {**(self.params or {}), categories.FACET_PARAM: json.dumps(wanted + kids)},
                        truncate=False,
                        custom_time_limit=self.ds.setting("facet_time_limit_ms"),
                    )
                    counted.update((row[0], row[1]) for row in rows.rows)
                    kids = [k for k in kids if counted.get(k)]
                    if len(kids) == 1 and counted[kids[0]] == counted.get(focus):
                        focus, wanted = kids[0], []
                    else:
                        break
            except QueryInterrupted:
                timed_out.append(column)
                continue
            kids.sort(key=lambda k: (-counted[k], h.categories[k].name))
            size = self.get_facet_size()
            values = [
                {  # the categories in force, first: every image shown is in them; a click removes one
                    "value": value,
                    "label": ", ".join(h.categories[w].name for w in h.resolve(value)) or value,
                    "count": counted.get(categories.ROOT, 0),
                    "toggle_url": self.ds.absolute_url(
                        self.request, path_with_removed_args(self.request, {"_category": value})
                    ),
                    "selected": True,
                }
                for value in chosen
            ]
            values += [
                {
                    "value": wnid,
                    "label": h.categories[wnid].name,
                    "count": counted[wnid],
                    "toggle_url": self.ds.absolute_url(
                        self.request, path_with_replaced_args(self.request, {"_category": wnid})
                    ),
                    "selected": False,
                }
                for wnid in kids[:size]
            ]
            results.append({
                "name": "category",
                "focus": {"wnid": focus, "name": h.categories[focus].name},
                "type": self.type,
                "results": values,
                "hideable": source_and_config["source"] != "metadata",
                "toggle_url": self.ds.urls.path(path_with_removed_args(self.request, {"_facet_category": column})),
                "truncated": len(kids) > size,
            })
        return results, timed_out
