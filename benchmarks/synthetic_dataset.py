"""Benchmark: render the embedded synthetic dataset (default 20k images at 64 px) on one core.

    python benchmarks/synthetic_dataset.py [--num 20000] [--resolution 64] [--grid out.png]
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.data import synthetic  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=20000)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--num-classes", type=int, default=12)
    parser.add_argument("--grid", default="", help="also save an 8x8 contact sheet of the first images here")
    args = parser.parse_args()

    start = time.perf_counter()
    images, labels = synthetic.render(0, "train", np.arange(args.num), args.resolution, args.num_classes)
    elapsed = time.perf_counter() - start
    print(f"{args.num} images at {args.resolution}px in {elapsed:.2f} s ({args.num / elapsed:.0f} images/s, one core)")
    if args.grid:
        n = min(64, args.num)
        side = args.resolution
        sheet = np.zeros((8 * side, 8 * side, 3), dtype=np.uint8)
        for i in range(n):
            sheet[(i // 8) * side:(i // 8 + 1) * side, (i % 8) * side:(i % 8 + 1) * side] = images[i]
        Image.fromarray(sheet).save(args.grid)
        print(f"contact sheet: {args.grid}")


if __name__ == "__main__":
    main()
