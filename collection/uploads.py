"""Read a search request's form from an ASGI body, bounded in memory.

The search page posts ``multipart/form-data`` (an ``image`` file, or ``image_id`` and
``box``); an API client may also post ``application/x-www-form-urlencoded`` fields.
The body is read message by message and refused (413) as soon as it passes the limit,
or before a byte is read when its Content-Length already does: a 2 GB upload never
sits in memory. Nothing here decodes the image; the embedding server does that.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from .embedder import EmbedError

FORM_SLACK = 64 * 1024  # bytes of a body beyond the image: boundaries, headers, the other fields
FIELD_MAX = 4096  # bytes of a field that is not a file (csrftoken, k, box, ...)
# What a file field may say it is: an image, or nothing in particular (curl -F for a
# file without a known extension). The embedding server checks what it really is.
FILE_TYPES = ("image/", "application/octet-stream")


class Rejected(EmbedError):
    """A request refused before any embedding; ``status`` is the HTTP status."""


@dataclass
class Part:
    name: str
    data: bytes
    filename: str | None = None  # set for a file field
    content_type: str | None = None

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


def too_big(size: int | None, limit: int) -> Rejected:
    said = f"{size:,} bytes, " if size is not None else ""
    return Rejected(413, f"the upload is {said}over the limit of {limit:,} bytes (COLLECTION_UPLOAD_MAX_BYTES)")


async def read_body(receive, headers: dict[str, str], limit: int, file_limit: int | None = None) -> bytes:
    """The request body, or Rejected(413) once it passes ``limit`` bytes (the message
    names ``file_limit``, the limit a person set, when the body is a form around a file)."""
    declared = headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big(int(declared), file_limit or limit)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Rejected(400, "the client went away before sending the whole upload")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_big(None, file_limit or limit)  # read no further: the rest of the body is never held
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def read_form(receive, headers: dict[str, str], max_file_bytes: int) -> dict[str, Part]:
    """The form's fields by name (the first of each name), from a body of at most
    ``max_file_bytes`` plus FORM_SLACK. Rejected: 413 too big, 415 not a form or a file
    field that is not an image, 400 a malformed form or an oversized plain field."""
    content_type, options = parse_options_header(headers.get("content-type", ""))
    content_type = content_type.decode("latin-1").lower()
    if content_type not in ("multipart/form-data", "application/x-www-form-urlencoded"):
        raise Rejected(
            415,
            f"send the image as multipart/form-data with a field named image, not {content_type or 'no content type'}",
        )
    if content_type == "multipart/form-data" and not options.get(b"boundary"):
        raise Rejected(400, "a multipart/form-data body needs a boundary in its Content-Type")
    if content_type == "application/x-www-form-urlencoded":
        try:
            body = await read_body(receive, headers, FIELD_MAX * 4)
        except Rejected as e:
            if e.status != 413:
                raise
            raise Rejected(413, "a form without a file is at most a few kilobytes: send the image as multipart/form-data") from None
        fields = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        form: dict[str, Part] = {}
        for name, value in fields:
            form.setdefault(name, Part(name, value.encode()))
        return form
    body = await read_body(receive, headers, max_file_bytes + FORM_SLACK, max_file_bytes)
    form = parse_multipart(body, options[b"boundary"])
    for part in form.values():
        if part.filename is None and len(part.data) > FIELD_MAX:
            raise Rejected(400, f"the form field {part.name!r} is over {FIELD_MAX:,} bytes")
        if part.filename is not None and part.content_type and not part.content_type.startswith(FILE_TYPES):
            raise Rejected(415, f"{part.name!r} is {part.content_type}, not an image")
        if part.filename is not None and len(part.data) > max_file_bytes:
            raise too_big(len(part.data), max_file_bytes)
    return form


def parse_multipart(body: bytes, boundary: bytes) -> dict[str, Part]:
    """The parts of a multipart/form-data body already in memory (bounded by the caller)."""
    parts: dict[str, Part] = {}
    state = {"headers": {}, "field": b"", "chunks": []}

    def on_part_begin():
        state["headers"], state["chunks"] = {}, []

    def on_header_field(data, start, end):
        state["field"] = data[start:end].lower()

    def on_header_value(data, start, end):
        state["headers"][state["field"]] = state["headers"].get(state["field"], b"") + data[start:end]

    def on_part_data(data, start, end):
        state["chunks"].append(data[start:end])

    def on_part_end():
        _, disposition = parse_options_header(state["headers"].get(b"content-disposition", b""))
        name = disposition.get(b"name")
        if name is None:
            return
        filename = disposition.get(b"filename")
        kind = state["headers"].get(b"content-type")
        part = Part(
            name.decode("utf-8", "replace"),
            b"".join(state["chunks"]),
            filename.decode("utf-8", "replace") if filename is not None else None,
            kind.decode("latin-1").strip().lower() if kind else None,
        )
        parts.setdefault(part.name, part)

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as e:
        raise Rejected(400, f"the multipart/form-data body is malformed: {e}") from None
    return parts
