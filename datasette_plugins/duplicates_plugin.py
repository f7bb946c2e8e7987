"""Datasette plugin for reviewing duplicates: the page ``/-/duplicates``, its data
``/-/duplicates.json``, and decisions (keep, not a duplicate, ignore group) posted
from the page.

Thin on purpose: the groups and the decisions' SQL are in ``collection.duplicates``.
Reading needs what the images table needs; recording a decision needs the
``review-duplicates`` permission, which only the root actor (``datasette --root``)
has unless the plugin's ``allow`` block grants it to others. Decisions are rows in
``duplicate_decisions``: nothing here deletes or moves a file.
"""

from __future__ import annotations

from datasette import Response, hookimpl
from datasette.utils import actor_matches_allow
from datasette.utils.asgi import BadRequest, Forbidden

from collection import duplicates
from datasette_plugins.collection_plugin import collection_db, collection_name

PERMISSION = "review-duplicates"
PAGE_GROUPS = 20
SHOWN_MEMBERS = 60  # a huge look-alike group shows its first members and a count
LABELS = {"keep": "keep this one", "not_duplicate": "not a duplicate", "ignore": "ignore group", "clear": "undo"}


@hookimpl
def permission_allowed(datasette, actor, action):
    if action != PERMISSION:
        return None
    if actor and actor.get("id") == "root":
        return True
    allow = (datasette.plugin_config("duplicates") or {}).get("allow")
    return actor_matches_allow(actor, allow) if allow is not None else None


@hookimpl
def register_routes():
    return [
        (r"^/-/duplicates$", duplicates_page),
        (r"^/-/duplicates\.json$", duplicates_json),
    ]


@hookimpl
def menu_links(datasette):
    async def inner():
        if await collection_name(datasette) is None:
            return []
        return [{"href": datasette.urls.path("/-/duplicates"), "label": "Duplicates"}]

    return inner


def _int(value: str | None, name: str, default: int = 0) -> int:
    if value in (None, ""):
        return default
    if not value.isdigit() or len(value) > 18:
        raise BadRequest(f"{name} must be a whole number, not {value!r}")
    return int(value)


def _tier(value: str | None) -> str:
    tier = value or "near"
    if tier not in duplicates.TIERS:
        raise BadRequest(f"tier must be one of {', '.join(duplicates.TIERS)}, not {tier!r}")
    return tier


async def _page(datasette, request) -> tuple[object, dict]:
    db = await collection_db(datasette, request)
    tier = _tier(request.args.get("tier"))
    after = _int(request.args.get("after"), "after")
    ignored = request.args.get("ignored") == "1"

    def read(conn):
        ids = duplicates.group_ids(conn, tier, after, PAGE_GROUPS + 1, ignored)
        more = len(ids) > PAGE_GROUPS
        ids = ids[:PAGE_GROUPS]
        return {
            "tier": tier,
            "counts": duplicates.group_counts(conn),
            "groups": duplicates.groups(conn, tier, ids),
            "after": after,
            "next_after": ids[-1] if more else None,
            "ignored": ignored,
        }

    page = await db.execute_fn(read)
    urls = datasette.urls
    for group in page["groups"]:
        group["shown"] = group["members"][:SHOWN_MEMBERS]
        for m in group["members"]:
            m["thumbnail_url"] = urls.path(f"/-/thumbnail/{m['image_id']}.jpg")
            m["image_url"] = urls.path(f"/-/image/{m['image_id']}")
            m["row_url"] = urls.row(db.name, "images", str(m["image_id"]))
    return db, page


async def duplicates_json(datasette, request):
    _, page = await _page(datasette, request)
    for group in page["groups"]:
        del group["shown"]
    return Response.json(page)


async def duplicates_page(datasette, request):
    if request.method == "POST":
        return await _decide(datasette, request)
    db, page = await _page(datasette, request)
    can_decide = await datasette.permission_allowed(request.actor, PERMISSION, default=False)
    return Response.html(
        await datasette.render_template(
            "duplicates.html",
            {
                **page,
                "tiers": duplicates.TIERS,
                "thresholds": duplicates.thresholds(await db.execute_fn(_model)),
                "can_decide": can_decide,
                "labels": LABELS,
                "page_url": datasette.urls.path("/-/duplicates"),
                "json_url": datasette.urls.path("/-/duplicates.json"),
                "permission": PERMISSION,
                "shown_members": SHOWN_MEMBERS,
            },
            request=request,
        )
    )


def _model(conn) -> str | None:
    row = conn.execute("select value from collection_meta where key = 'model'").fetchone()
    return row[0] if row else None


async def _decide(datasette, request):
    """A decision from the page's form; never from an anonymous actor."""
    db = await collection_db(datasette, request)
    if not await datasette.permission_allowed(request.actor, PERMISSION, default=False):
        raise Forbidden(f"Recording decisions needs the {PERMISSION} permission (sign in, e.g. datasette --root)")
    form = await request.post_vars()
    tier = _tier(form.get("tier"))
    group_id = _int(form.get("group_id"), "group_id")
    image_id = _int(form.get("image_id"), "image_id") if form.get("image_id") else None
    decision = form.get("decision") or ""
    actor = request.actor.get("id") if request.actor else None

    def write(conn):
        with conn:
            duplicates.decide(conn, tier, group_id, image_id, decision, actor)

    try:
        await db.execute_write_fn(write)
    except duplicates.DuplicatesError as e:
        datasette.add_message(request, str(e), datasette.ERROR)
    else:
        what = f"image {image_id}" if image_id is not None else f"group {group_id}"
        datasette.add_message(request, f"Recorded: {LABELS.get(decision, decision)} ({what})", datasette.INFO)
    back = f"?tier={tier}" + (f"&after={_int(form.get('after'), 'after')}" if form.get("after") else "")
    back += "&ignored=1" if form.get("ignored") == "1" else ""
    return Response.redirect(datasette.urls.path("/-/duplicates") + back + f"#group-{group_id}")
