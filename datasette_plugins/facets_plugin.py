"""Datasette plugin: the label facet and the label filter, on indexes at any size.

Datasette's own ``array`` facet unpacks the JSON ``labels`` of every row, and its
``labels__arraycontains`` filter does the same; at 100,000 images the first times out
and the second takes seconds. Here:

- the ``label`` facet type (metadata: ``- label: labels``) reads ``label_counts``, kept
  current by triggers (store.m009), for the unfiltered images table, and
  ``facet_counts`` (store.m015) for a page filtered by one label; on another filtered
  page it counts the labels of just the rows the filters leave, through the labels table;
- the ``counted`` facet type (``- counted: format``) is Datasette's column facet read
  from ``facet_counts`` on those same two pages, and Datasette's own SQL on the others;
- ``?_label=NAME`` (repeatable: images with every one) filters through the
  ``labels(label, image_id)`` index; the facet's links use it.

It also sets every Datasette connection up for a large file (store.tune), since
Datasette opens its own. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import json
import re

from datasette import hookimpl
from datasette.database import QueryInterrupted
from datasette.facets import ColumnFacet, Facet
from datasette.filters import FilterArguments
from datasette.utils import escape_sqlite, path_with_added_args, path_with_removed_args

from collection import store

LABEL_ARG = "_label"
# A filtered page counts its labels only when the filter leaves at most this many images.
FILTERED_COUNT_MAX = 20_000
# The tables whose rows are images with their top-5 labels in ``labels`` (by id), and the
# label_counts column that counts the images each one shows.
IMAGE_TABLES = {"images": "images", "live_images": "live"}

# Counts per label over the images the page's filters leave; {rows} is the page's SQL.
_FILTERED_COUNTS = (
    "select l.label as value, count(distinct l.image_id) as count from labels l "
    "where l.image_id in (select id from ({rows})) "
    "group by l.label order by count desc, value limit :_facet_limit"
)


@hookimpl
def prepare_connection(conn):
    store.tune(conn)


@hookimpl
def register_facet_classes():
    return [LabelFacet, CountedFacet]


@hookimpl
def filters_from_request(request, database, table, datasette):
    async def inner():
        names = request.args.getlist(LABEL_ARG)
        if not names or not await _lists_images(datasette, database, table):
            return None
        params = {f"_label_{i}": name for i, name in enumerate(names)}
        return FilterArguments(
            [f"id in (select image_id from labels where label = :{key})" for key in params],
            params,
            [f'label is "{name}"' for name in names],
        )

    return inner


def _narrowing_args(request) -> list[str]:
    """The request's filters other than ``_label``: column=value, _where, _search, _category (#17) ..."""
    return [
        key for key in request.args
        if not key.startswith("_") or re.match(r"_(where|search|filter|category)", key)
    ]


def _kept_label(facet: Facet) -> str | None:
    """Whose counts ``facet_counts`` keeps for the facet's page: every image's
    (store.EVERY_IMAGE) on a table label_counts counts shown whole, one label's on such a
    table filtered by that label alone; None when the page's rows have to be counted."""
    if facet.table not in IMAGE_TABLES:
        return None
    if not facet.params and facet.sql.rstrip().endswith(f" from {escape_sqlite(facet.table)}"):
        return store.EVERY_IMAGE
    names = facet.request.args.getlist(LABEL_ARG)
    if len(names) == 1 and not _narrowing_args(facet.request):
        return names[0]
    return None


async def _kept_counts(facet: Facet, label: str, name: str, limit: int) -> list[tuple]:
    """Values and counts of facet ``name`` over ``label``'s images, commonest first."""
    column = IMAGE_TABLES[facet.table]
    result = await facet.ds.execute(
        facet.database,
        f"select value, {column} from facet_counts where label = :label and facet = :facet "
        f"and {column} > 0 order by {column} desc, value limit :limit",
        {"label": label, "facet": name, "limit": limit},
    )
    return [(row[0], row[1]) for row in result.rows]


async def _lists_images(datasette, database: str, table: str | None) -> bool:
    """Whether ``table`` has one row per image keyed by ``id`` (images, or a view of it)."""
    if table is None:
        return False
    if table in IMAGE_TABLES:
        return True
    columns = await datasette.get_database(database).table_columns(table)
    return "id" in columns and "labels" in columns


class LabelFacet(Facet):
    """How many images carry each label, commonest first; a value's link filters by it."""

    type = "label"

    async def suggest(self):
        return []  # configured in metadata.yml, never guessed

    async def facet_results(self):
        results, timed_out = [], []
        if not await _lists_images(self.ds, self.database, self.table):
            return results, timed_out
        size = self.get_facet_size()
        selected = set(self.request.args.getlist(LABEL_ARG))
        for source_and_config in self.get_configs():
            config = source_and_config["config"]
            name = config.get("column") or config["simple"]
            try:
                if await self._too_many_to_count():
                    raise QueryInterrupted(None, self.sql, self.params)
                rows = await self._counts(size + 1)
            except QueryInterrupted:
                timed_out.append(name)
                continue
            results.append(
                {
                    "name": name,
                    "type": self.type,
                    "hideable": source_and_config["source"] != "metadata",
                    "toggle_url": self.ds.urls.path(
                        path_with_removed_args(self.request, {"_facet_label": name})
                    ),
                    "results": [self._value(value, count, value in selected) for value, count in rows[:size]],
                    "truncated": len(rows) > size,
                }
            )
        return results, timed_out

    async def _counts(self, limit: int) -> list[tuple[str, int]]:
        kept = _kept_label(self)
        if kept == store.EVERY_IMAGE:
            column = IMAGE_TABLES[self.table]
            sql = (
                f"select label, {column} from label_counts where {column} > 0 "
                f"order by {column} desc, label limit :_facet_limit"
            )
            params = {"_facet_limit": limit}
        elif kept is not None:
            return await _kept_counts(self, kept, "labels", limit)
        else:
            sql = _FILTERED_COUNTS.format(rows=self.sql)
            params = {**dict(self.params), "_facet_limit": limit}
        result = await self.ds.execute(
            self.database,
            sql,
            params,
            truncate=False,
            custom_time_limit=self.ds.setting("facet_time_limit_ms"),
        )
        return [(row[0], row[1]) for row in result.rows]

    async def _too_many_to_count(self) -> bool:
        """A page filtered by two labels or more alone, whose rarest label is on more than
        FILTERED_COUNT_MAX images: counting their labels would only run into the time limit
        (3.2 s for 41,417 images at 1,000,000), so it is reported as timed out at once.
        (One label alone is read from facet_counts.)"""
        names = self.request.args.getlist(LABEL_ARG)
        if len(names) < 2 or _narrowing_args(self.request):
            return False
        result = await self.ds.execute(
            self.database,
            "select min(images) from label_counts where label in (select value from json_each(:names))",
            {"names": json.dumps(names)},
        )
        fewest = result.rows[0][0]
        return fewest is not None and fewest > FILTERED_COUNT_MAX

    def _value(self, value: str, count: int, selected: bool) -> dict:
        change = path_with_removed_args if selected else path_with_added_args
        return {
            "value": value,
            "label": value,
            "count": count,
            "toggle_url": self.ds.absolute_url(
                self.request, self.ds.urls.path(change(self.request, {LABEL_ARG: value}))
            ),
            "selected": selected,
        }


class CountedFacet(ColumnFacet):
    """Datasette's column facet (metadata: ``- counted: format``), read from the counts
    store.m015 keeps where it has them: the whole images table, or the images of one label.
    At a million images grouping a label's rows took 90-430 ms a column; this is one index
    range. Other pages count their rows with Datasette's own SQL and time limit."""

    type = "counted"

    async def suggest(self):
        return []

    async def facet_results(self):
        label = _kept_label(self)
        if label is None:
            results, timed_out = await super().facet_results()
            return [{**result, "type": "column"} for result in results], timed_out
        size = self.get_facet_size()
        results = []
        for source_and_config in self.get_configs():
            config = source_and_config["config"]
            column = config.get("column") or config["simple"]
            rows = await _kept_counts(self, label, column, size + 1)
            results.append(
                {
                    "name": column,
                    "type": "column",
                    "hideable": source_and_config["source"] != "metadata",
                    "toggle_url": self.ds.urls.path(path_with_removed_args(self.request, {"_facet": column})),
                    "results": [
                        {
                            "value": value,
                            "label": value,
                            "count": count,
                            "toggle_url": self.ds.absolute_url(
                                self.request, self.ds.urls.path(path_with_added_args(self.request, {column: value}))
                            ),
                            "selected": False,  # a column=value filter is not a page counted here
                        }
                        for value, count in rows[:size]
                    ],
                    "truncated": len(rows) > size,
                }
            )
        return results, []
