"""What may be read: one regular file inside a folder, within a byte limit, read once.

Every path that leads to bytes goes through ``read``: `collection add`, the
watcher's events and scans, and serving a full-size image. A file is read only
when its real path (symlinks resolved) stays inside one of the allowed folders,
it is a regular file (not a FIFO, device or socket: checked on the open
descriptor, which O_NONBLOCK keeps a FIFO from blocking), and it holds no more
than the byte limit; at most the limit + 1 bytes are ever read. The pixel limit
is checked by images.decode on the header, before anything is decoded.

File names that are not valid UTF-8 (Linux allows any bytes) reach Python as
str with lone surrogates (os.fsdecode), which SQLite cannot store; ``display``
turns them into text with the bad bytes escaped (``bad_\\xff.jpg``), the form
the failures table and every message use.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

# Defaults, overridden by --max-bytes / --max-pixels or the environment. 200 MB holds
# any camera's JPEG or raw-sized TIFF; 120 million pixels passes 100-megapixel
# medium-format photos and refuses a header claiming a memory-eating size.
MAX_BYTES = int(os.environ.get("COLLECTION_MAX_BYTES", 200_000_000))
MAX_PIXELS = int(os.environ.get("COLLECTION_MAX_PIXELS", 120_000_000))

_CHUNK = 1 << 20
_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}


@dataclass(frozen=True)
class Limits:
    """How big a file, and how many pixels its header may claim, before it is refused."""

    max_bytes: int = MAX_BYTES
    max_pixels: int = MAX_PIXELS


class Unreadable(Exception):
    """A file that is not read; the message says why, for a person. ``transient``: the
    cause can go away without the file changing (permissions, a file still being
    written), so it is worth trying again later."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class TooBig(Unreadable):
    """More bytes than the limit (a file that has grown, for a caller that knows its size)."""


def display(path: str) -> str:
    """``path`` as text SQLite can store and a terminal can show: bytes that are not
    UTF-8 are escaped as ``\\xNN``. Valid names come back unchanged."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", "backslashreplace")


def name_problem(path: str) -> str | None:
    """Why a file cannot be stored by its name, or None when it can."""
    if display(path) == path:
        return None
    return "file name is not valid UTF-8: rename it (e.g. with convmv) to add it"


def inside(real: str, folders: Iterable[str]) -> bool:
    """Whether the resolved path ``real`` is one of ``folders`` (resolved) or below one."""
    return any(real == f or real.startswith(os.path.join(f, "")) for f in folders)


def read(path: str, folders: Iterable[str] | None, max_bytes: int = MAX_BYTES) -> tuple[bytes, os.stat_result]:
    """The bytes of the regular file at ``path`` and its stat, or Unreadable.

    ``folders``: the resolved folders the file's real path must stay inside (None: any,
    for a file a person names on the command line to compare, not to add).
    """
    real = os.path.realpath(path)
    if folders is not None and not inside(real, folders):
        raise Unreadable(f"a link to {display(real)}, outside the folder: not followed")
    try:
        fd = os.open(real, _FLAGS)
    except OSError as e:
        # Gone, or a symlink swapped in after the check: final. Anything else (permissions) can pass.
        transient = e.errno not in (errno.ENOENT, errno.ELOOP)
        raise Unreadable(f"cannot read file: {e.strerror or e}", transient=transient) from None
    try:
        before = os.fstat(fd)
        kind = _KINDS.get(stat.S_IFMT(before.st_mode))
        if kind or not stat.S_ISREG(before.st_mode):
            raise Unreadable(f"not a regular file ({kind or 'special file'}): not read")
        if before.st_size > max_bytes:
            raise TooBig(f"{before.st_size:,} bytes, over the limit of {max_bytes:,} (--max-bytes)")
        chunks, got, want = [], 0, max_bytes + 1
        while got < want:
            chunk = os.read(fd, min(_CHUNK, want - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got > max_bytes:
            raise TooBig(f"grew past the limit of {max_bytes:,} bytes while being read", transient=True)
        after = os.fstat(fd)
    except OSError as e:
        raise Unreadable(f"cannot read file: {e.strerror or e}", transient=True) from None
    finally:
        os.close(fd)
    if got != after.st_size or (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
        raise Unreadable("changed while being read", transient=True)
    return b"".join(chunks), after
