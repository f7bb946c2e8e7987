"""Decoding beside a thread that runs Python: what the GIL costs a decoding thread.

    .venv/bin/python bench/gil.py

In `collection add` the decoding threads share the process with the writer and the
upkeep, which run Python (SQLite writes, the duplicates' decisions). Each time a
decoding thread comes back from C code that let go of the GIL (Pillow hands its
decoder 64 kB at a time by default) it must win the GIL back, which can take up to
the switch interval (5 ms) while another thread runs Python. This measures, per
format of bench/ingest.py's corpus, the decoding thread's files/s alone and beside a
thread that does nothing but Python, with Pillow's default 64 kB and with
images.DECODE_BLOCK, and how many calls the decoder gets per file.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ingest import build_corpus  # bench/ingest.py, beside this script
from machine import cpu_flags

from collection import images
from collection.models import get_model


def decoder_calls(path: Path, data: bytes, min_side: int) -> int:
    """How many times Pillow calls the decoder for this file, as images.decode opens it."""
    calls = 0
    original = Image._getdecoder

    class Counting:
        def __init__(self, decoder):
            self._decoder = decoder

        def __getattr__(self, name):
            return getattr(self._decoder, name)

        def decode(self, buffer):
            nonlocal calls
            calls += 1
            return self._decoder.decode(buffer)

    Image._getdecoder = lambda *a, **k: Counting(original(*a, **k))
    try:
        images.decode(path, data, min_side)
    finally:
        Image._getdecoder = original
    return calls


def rate(files: list[tuple[Path, bytes]], min_side: int, seconds: float, busy: bool) -> float:
    """Files/s decoded (read from memory, hash, decode at reduced size, fit, thumbnail),
    with or without a thread beside that only runs Python."""
    model = get_model("efficientnet_lite0")  # not built: prepare() needs no weights
    stop = threading.Event()

    def python_only():
        while not stop.is_set():
            pass

    spinner = threading.Thread(target=python_only) if busy else None
    if spinner:
        spinner.start()
    done, start = 0, time.perf_counter()
    try:
        while time.perf_counter() - start < seconds:
            path, data = files[done % len(files)]
            images.sha256_bytes(data)
            decoded = images.decode(path, data, min_side)
            model.prepare(decoded.image)
            images.thumbnail(decoded.image)
            done += 1
    finally:
        stop.set()
        if spinner:
            spinner.join()
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200, help="files in bench/ingest.py's corpus")
    parser.add_argument("--per-format", type=int, default=10, help="files of each format decoded in turn")
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    args = parser.parse_args()

    corpus = build_corpus(args.count)
    min_side = get_model("efficientnet_lite0").min_side
    by_format: dict[str, list[tuple[Path, bytes]]] = {}
    for path in sorted(corpus.iterdir()):
        by_format.setdefault(path.suffix.lower(), []).append((path, path.read_bytes()))
    print(f"corpus: {corpus}; machine: CPU flags: {cpu_flags()}; switch interval {sys.getswitchinterval() * 1000:.0f} ms")
    print(f"command: {' '.join(sys.argv)}\n")
    print("| format | decoder block | decoder calls per file | files/s alone | files/s beside Python | beside / alone |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    chosen = images.DECODE_BLOCK
    for fmt, files in sorted(by_format.items()):
        files = files[: args.per_format]
        for label, block in (("64 kB (Pillow's)", 65536), (f"{chosen // 2**20} MiB (DECODE_BLOCK)", chosen)):
            images.DECODE_BLOCK = block
            calls = sum(decoder_calls(p, d, min_side) for p, d in files) / len(files)
            alone = rate(files, min_side, args.seconds, busy=False)
            beside = rate(files, min_side, args.seconds, busy=True)
            print(f"| {fmt[1:].upper()} | {label} | {calls:.1f} | {alone:.1f} | {beside:.1f} | {beside / alone:.2f} |", flush=True)
    images.DECODE_BLOCK = chosen


if __name__ == "__main__":
    main()
