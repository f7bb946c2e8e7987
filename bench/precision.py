"""Does a runtime or precision give the same answers as TensorFlow fp32?

    .venv/bin/python bench/precision.py --count 200

Runs the real-weights model (efficientnet_lite0; inception_v3 too when its
ImageNet weights are on disk) over the benchmark corpus made from real photos,
with each runtime at each precision, and prints a table against TensorFlow fp32:
top-1 label agreement, the mean overlap of each image's 10 nearest neighbours,
and the lowest cosine between an image's two vectors. A precision may become a
default only where both of the first two clear the bar (>= 0.99 and >= 0.95);
`collection models` prints these figures (collection/runtimes.py AGREEMENT).
bench/ingest.py measures the same beside its speed table, for the precisions it runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import build_corpus, run_agreement  # noqa: E402  (the same corpus and measure)
from machine import cpu_flags  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--models", default="efficientnet_lite0")
    parser.add_argument("--runtimes", default="tensorflow,openvino")
    parser.add_argument("--precisions", default="fp32,bf16")
    args = parser.parse_args()
    files = sorted(build_corpus(args.count).iterdir())
    print(f"{len(files)} files from real photos; CPU flags: {cpu_flags()}; command: {' '.join(sys.argv)}\n")
    print("| model | runtime | precision | top-1 agreement | mean overlap of 10 NN | min cosine |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    configs = [(r, p) for p in args.precisions.split(",") for r in args.runtimes.split(",")]
    for name in args.models.split(","):
        for config, a in run_agreement(name, files, configs).items():
            runtime, precision = config.split(" ")
            print(f"| {name} | {runtime} | {precision} | {a['top1']:.3f} | {a['overlap']:.3f} | {a['min_cos']:.5f} |")


if __name__ == "__main__":
    main()
