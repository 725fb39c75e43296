"""What both shard readers (reader.py: random access; stream_reader.py: streaming) yield, and the
augmentation they share, so that either reader gives the same sample the same crop and flip."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


class ImageBatch(NamedTuple):
    images: torch.Tensor     # (B, 3, H, W) float32 in [-1, 1]
    labels: torch.Tensor     # (B,) int64
    keys: list[str]          # sample keys, e.g. "train_00001234"


def image_batch(images: list[torch.Tensor], labels: list[int], keys: list[str]) -> ImageBatch:
    return ImageBatch(torch.stack(images), torch.tensor(labels, dtype=torch.int64), list(keys))


def augment_pixels(pixels: np.ndarray, resolution: int, seed: int, epoch: int, index: int, random_crop: bool,
                   hflip: bool) -> np.ndarray:
    """Random crop / flip of sample `index` in `epoch`, seeded by (seed, epoch, index) alone."""
    rng = np.random.default_rng([seed, epoch, index, 0xA06])
    if random_crop:
        # Reflect-pad by 1/8 of the side, then crop back at a random offset (a small translation).
        pad = max(1, resolution // 8)
        padded = np.pad(pixels, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
        top, left = rng.integers(0, 2 * pad + 1, size=2)
        pixels = padded[top:top + resolution, left:left + resolution]
    if hflip and rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return pixels
