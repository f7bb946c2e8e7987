"""Does bf16 give the same answers as fp32? Top-1 labels and 10 nearest neighbours.

    .venv/bin/python bench/precision.py --count 200

Runs the real-weights model (efficientnet_lite0; inception_v3 too when its
ImageNet weights are on disk) over the benchmark corpus made from real photos,
once at fp32 and once at bf16, and prints a table: top-1 label agreement and the
mean overlap of each image's 10 nearest neighbours. bf16 may become a default
only where both clear the bar (>= 0.99 and >= 0.95).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import build_corpus  # noqa: E402  (the same corpus as the ingest benchmark)

from collection import images  # noqa: E402
from collection.models import get_model  # noqa: E402


def embed_all(name: str, precision: str, files: list[Path]) -> tuple[np.ndarray, np.ndarray, float]:
    model = get_model(name, precision=precision).load()
    pixels = [model.prepare(images.decode(p, min_side=model.min_side).image) for p in files]
    start = time.perf_counter()
    vectors, probs = [], []
    for i in range(0, len(pixels), model.batch_size):
        v, p = model.embed_batch(pixels[i : i + model.batch_size])
        vectors.append(v)
        probs.append(p)
    rate = len(files) / (time.perf_counter() - start)
    return np.concatenate(vectors), np.concatenate(probs), rate


def neighbours(vectors: np.ndarray, k: int) -> np.ndarray:
    scores = vectors @ vectors.T
    np.fill_diagonal(scores, -np.inf)
    return np.argsort(-scores, axis=1)[:, :k]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--models", default="efficientnet_lite0")
    parser.add_argument("-k", type=int, default=10)
    args = parser.parse_args()
    files = sorted(build_corpus(args.count).iterdir())
    print(f"{len(files)} files from real photos; command: {' '.join(sys.argv)}\n")
    print("| model | top-1 agreement | mean overlap of 10 NN | fp32 images/s | bf16 images/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in args.models.split(","):
        v32, p32, r32 = embed_all(name, "fp32", files)
        v16, p16, r16 = embed_all(name, "bf16", files)
        top1 = float(np.mean(p32.argmax(1) == p16.argmax(1)))
        n32, n16 = neighbours(v32, args.k), neighbours(v16, args.k)
        overlap = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(n32, n16)]))
        print(f"| {name} | {top1:.3f} | {overlap:.3f} | {r32:.1f} | {r16:.1f} |")


if __name__ == "__main__":
    main()
