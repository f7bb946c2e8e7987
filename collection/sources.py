"""Where a backfill's files come from: a folder on this machine (and every node, on a
shared filesystem), or any filesystem ``pyarrow.fs`` opens from a URI (``s3://``,
``gs://``, ``hdfs://``, ``abfs://``; ``file://`` is a folder).

A source lists its image files with their size and mtime (the key a rerun skips by)
and reads one file's bytes. A folder's files are read through ``files.read``, as
``collection add`` reads them: regular files only, a symlink only when its target is
inside the folder, within the byte limit. A remote file is read only up to the byte
limit and must still have the size it was listed with.

A remote file's path is its URI (``s3://bucket/photos/a.jpg``): that is what the
shards and the collection record, and what a task reopens it by.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from . import files
from .ingest import IGNORE, ignored, iter_files, wanted


class SourceError(Exception):
    """The source cannot be opened; the message says why."""


def is_uri(source: str | Path) -> bool:
    return "://" in str(source)


@dataclass(frozen=True)
class Source:
    """A folder (``uri`` None) or a folder on a ``pyarrow.fs`` filesystem (``uri`` given)."""

    root: str  # the local folder, absolute; or the path on the URI's filesystem
    uri: str | None = None  # as given, when the files are not on this machine's filesystem
    limits: files.Limits = files.Limits()  # bytes a file may hold, pixels its header may claim

    @classmethod
    def of(cls, source: str | Path, limits: files.Limits = files.Limits()) -> Source:
        text = str(source)
        if not is_uri(text):
            if not os.path.isdir(text):
                raise SourceError(f"{text} is not a folder")
            return cls(os.path.abspath(text), None, limits)
        filesystem, root = _open(text)
        import pyarrow.fs as pafs

        if isinstance(filesystem, pafs.LocalFileSystem):  # file://: a folder after all
            return cls.of(root, limits)
        info = filesystem.get_file_info(root)
        if info.type != pafs.FileType.Directory:
            raise SourceError(f"{text} is not a folder ({info.type.name.lower()})")
        return cls(root.rstrip("/"), text, limits)

    @property
    def prefix(self) -> str:
        """What goes before a filesystem path to make a file's URI (``s3://``)."""
        return self.uri.split("://", 1)[0] + "://"

    def states(self) -> Iterator[tuple[str, int, float]]:
        """(path, size, mtime) of every image file below the root, as ``add -r`` finds them."""
        if self.uri is None:
            for path in iter_files([self.root], recursive=True):
                try:
                    stat = os.stat(path)
                except OSError:  # gone since listed: nothing to embed, nothing to record
                    continue
                yield path, stat.st_size, stat.st_mtime
            return
        yield from self._remote_states()

    def _remote_states(self) -> Iterator[tuple[str, int, float]]:
        """One folder at a time (memory bounded by the largest folder, not the bucket),
        skipping what ``add`` skips: hidden and temporary files, NAS thumbnail folders."""
        import pyarrow.fs as pafs

        filesystem, _ = _open(self.uri)
        folders = [self.root]
        while folders:
            folder = folders.pop()
            try:
                infos = filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
            except OSError:  # gone or forbidden since listed: nothing below it to embed
                continue
            below = []
            for info in sorted(infos, key=lambda i: i.path):
                relative = os.path.relpath(info.path, self.root)
                if info.type == pafs.FileType.Directory:
                    if not ignored(relative, IGNORE):
                        below.append(info.path)
                elif info.type == pafs.FileType.File and wanted(relative, IGNORE):
                    yield self.prefix + info.path, info.size, _seconds(info.mtime_ns)
            folders.extend(reversed(below))  # depth first, in name order

    def read(self, path: str, size: int) -> bytes:
        """The bytes of the file at ``path`` (as listed, with ``size``), or files.Unreadable."""
        if self.uri is None:
            data, _ = files.read(path, [os.path.realpath(self.root)], self.limits.max_bytes)
            return data
        limit = self.limits.max_bytes
        if size > limit:
            raise files.TooBig(f"{size:,} bytes, over the limit of {limit:,} (--max-bytes)")
        filesystem, _ = _open(self.uri)
        try:
            with filesystem.open_input_stream(path[len(self.prefix):]) as stream:
                data = stream.read(limit + 1)
        except OSError as e:  # pyarrow's not-found, permission and network errors are OSErrors
            raise files.Unreadable(f"cannot read file: {e}", transient=not isinstance(e, FileNotFoundError)) from None
        if len(data) > limit:
            raise files.TooBig(f"grew past the limit of {limit:,} bytes while being read", transient=True)
        if len(data) != size:
            raise files.Unreadable("changed since it was listed", transient=True)
        return data


def _seconds(ns: int | None) -> float:
    """Nanoseconds as ``os.stat``'s float ``st_mtime`` rounds them (a file's key must match)."""
    return 0.0 if ns is None else ns // 10**9 + (ns % 10**9) * 1e-9


@lru_cache(maxsize=8)
def _open(uri: str):
    """The filesystem of ``uri`` and the path on it; one per process and URI (a client
    to S3 or GCS is slow to make)."""
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError, ImportError) as e:  # unknown scheme, bad URI, no credentials
        raise SourceError(f"cannot open {uri}: {e}") from None

