"""A seeded corpus of hostile files, for tests/test_abuse.py and bench/abuse.py.

Every kind of input issue #12 found trouble with: truncated and bit-flipped images,
headers claiming huge sizes, a sparse file far over the byte limit, empty and
random files, unreadable modes, symlinks out of the folder (a secret, /etc/passwd,
/dev/zero, /proc/self/environ) and dangling ones, FIFOs, folders named like images,
and names that are not UTF-8. A few good images are mixed in.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# Files outside the folder that symlinks in the corpus point at; nothing may open them.
SYSTEM_TARGETS = ("/etc/passwd", "/dev/zero", "/proc/self/environ")
FORMATS = (("JPEG", ".jpg"), ("PNG", ".png"), ("GIF", ".gif"), ("WEBP", ".webp"), ("TIFF", ".tif"), ("BMP", ".bmp"))
KINDS = (
    "truncated", "bitflip", "bitflip", "bomb_png", "bomb_jpeg", "empty", "random", "mode000",
    "symlink_out", "symlink_dangling", "fifo", "nonutf8", "folder", "good",
)


@dataclass
class Corpus:
    files: list[tuple[bytes, str]]  # (path as bytes, kind)
    outside: Path  # the folder of secrets the symlinks lead to

    def of_kind(self, *kinds: str) -> list[str]:
        return [os.fsdecode(p) for p, k in self.files if k in kinds]

    def forbidden(self) -> list[str]:
        """Real paths outside the folder that no process may open."""
        return [str(self.outside.resolve()), *SYSTEM_TARGETS]


def image_bytes(rng: np.random.Generator, fmt: str, size: tuple[int, int]) -> bytes:
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([rng.uniform(0, 255) + rng.uniform(-2, 2) * x + rng.uniform(-2, 2) * y for _ in range(3)], -1)
    arr = np.clip(arr + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr, "RGB").save(out, fmt)
    return out.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (a decompression bomb)."""
    out = io.BytesIO()
    Image.new("L", (1, 1)).save(out, "PNG")
    data = bytearray(out.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def jpeg_claiming(jpeg: bytes, width: int, height: int) -> bytes:
    """A JPEG whose frame header (SOF0) claims another size."""
    data = bytearray(jpeg)
    at = data.find(b"\xff\xc0")
    if at >= 0:
        data[at + 5 : at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def make_corpus(folder: Path, outside: Path, n: int, seed: int = 12, sparse_bytes: int = 300_000_000) -> Corpus:
    """``n`` hostile files in ``folder`` (kinds in turn, contents seeded); secrets in ``outside``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    secret = outside / "secret.jpg"
    secret.write_bytes(image_bytes(rng, "JPEG", (64, 48)))  # an image: only the folder check stops it
    files: list[tuple[bytes, str]] = []
    base = os.fsencode(folder)
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        fmt, ext = FORMATS[int(rng.integers(len(FORMATS)))]
        path = os.path.join(base, f"{kind}_{i:04}{ext}".encode())
        good = image_bytes(rng, fmt, (int(rng.integers(16, 200)), int(rng.integers(16, 200))))
        if kind == "truncated":
            _write(path, good[: int(rng.integers(1, len(good)))])
        elif kind == "bitflip":
            data = bytearray(good)
            for at in rng.integers(0, len(data), int(rng.integers(1, 20))):
                data[at] ^= 1 << int(rng.integers(8))
            _write(path, bytes(data))
        elif kind == "bomb_png":
            path = os.path.join(base, f"{kind}_{i:04}.png".encode())
            claims = [(1, 178_000_000), (40_000, 40_000), (2**31 - 1, 2), (65_535, 65_535)]
            _write(path, png_claiming(*claims[i % len(claims)]))
        elif kind == "bomb_jpeg":
            path = os.path.join(base, f"{kind}_{i:04}.jpg".encode())
            jpeg = image_bytes(rng, "JPEG", (32, 32))
            if i % 3 == 0:  # a sparse file far over the byte limit, with a JPEG header
                _write(path, jpeg)
                os.truncate(path, sparse_bytes)
            else:
                _write(path, jpeg_claiming(jpeg, 65_000, 65_000))
        elif kind == "empty":
            _write(path, b"")
        elif kind == "random":
            _write(path, rng.bytes(int(rng.integers(1, 5000))))
        elif kind == "mode000":
            _write(path, good)
            os.chmod(path, 0)
        elif kind == "symlink_out":
            targets = [str(secret), *SYSTEM_TARGETS]
            os.symlink(targets[i % len(targets)], path)
        elif kind == "symlink_dangling":
            os.symlink(os.path.join(os.fsencode(outside), b"missing.jpg"), path)
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "nonutf8":
            path = os.path.join(base, b"bad_\xff\xfe_%04d" % i + ext.encode())
            _write(path, good)
        elif kind == "folder":
            os.mkdir(path)
        else:
            _write(path, good)
        files.append((path, kind))
    return Corpus(files, outside)


def _write(path: bytes, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def run_audited() -> None:
    """``python tests/hostile.py ARGS``: the `collection` command with ARGS, recording into
    the JSON file $AUDIT_OUT every open (sys.addaudithook "open") of a path whose real
    path is one of $FORBIDDEN (os.pathsep-separated) or below one."""
    import atexit
    import json
    import sys

    forbidden = [os.path.realpath(p) for p in os.environ["FORBIDDEN"].split(os.pathsep)]
    opened: list[str] = []

    def hook(event: str, args: tuple) -> None:
        if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        real = os.path.realpath(os.fsdecode(args[0]))
        if any(real == f or real.startswith(f + os.sep) for f in forbidden):
            opened.append(os.fsencode(real).decode("utf-8", "backslashreplace"))

    def save() -> None:
        Path(os.environ["AUDIT_OUT"]).write_text(json.dumps(opened))

    atexit.register(save)
    sys.addaudithook(hook)
    from collection.cli import cli

    cli(sys.argv[1:], prog_name="collection")


if __name__ == "__main__":
    run_audited()
