"""Inception features of a shard split, computed once per run and shared by the stages that need
them: the score stage (its default reference) and train_tokenizer's rFID (reconstructions of the
val split against the val split).

The cache lives in RUN_DIR/inception/ and is keyed by the shard manifest's hash, the split, how
many images (the first N in manifest order; all of them by default) and the Inception weights,
so a cache made by one stage is reused by the other, and never when any of those differ.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..generation.decode import to_uint8
from ..runtime.errors import StageError
from ..runtime.io import atomic_write_json, read_json, sha256_file
from .inception import inception_features
from .scoring import reference_from_npz, save_reference

FOLDER = "inception"  # RUN_DIR/inception/reference-<split>[-first<N>].npz + .json (its key)


def split_images(manifest: str | Path, split: str, count: int, batch: int) -> Iterator[torch.Tensor]:
    """The first `count` images of the split in manifest order, unaugmented, as (B, 3, H, W) batches.
    Read through the stage loaders, so shards indexed by URL (streamed, no random access) work too."""
    from ..data.reader import make_image_loader

    seen = 0
    for images, *_ in make_image_loader(manifest, split, batch, shuffle=False, drop_last=False):
        if seen >= count:
            break
        images = images[: count - seen]
        seen += images.shape[0]
        yield images


def original_blocks(manifest: str | Path, split: str, count: int, batch: int) -> Iterator[np.ndarray]:
    """The first `count` images of the split as (B, H, W, 3) uint8 blocks (exactly the shard pixels)."""
    for images in split_images(manifest, split, count, batch):
        yield to_uint8(images).numpy()


@torch.no_grad()
def reconstruction_blocks(tokenizer, manifest: str | Path, split: str, count: int, batch: int,
                          device: torch.device) -> Iterator[np.ndarray]:
    """encode -> decode of the first `count` images, rounded to uint8 as a saved PNG would be."""
    for images in split_images(manifest, split, count, batch):
        yield to_uint8(tokenizer.decode(tokenizer.encode(images.to(device)))).numpy()


def split_size(manifest: str | Path, split: str) -> int:
    from ..data.manifest import load_manifest

    data, _ = load_manifest(manifest)
    if split not in data["splits"]:
        raise StageError(f"split {split!r} is not in {manifest} (has {sorted(data['splits'])})")
    return sum(int(s["count"]) for s in data["splits"][split]["shards"])


def split_reference(run_dir: str | Path, manifest: str | Path, split: str, extractor, source: str, *,
                    batch: int = 50, count: int | None = None, need_features: bool = True,
                    logger: logging.Logger | None = None) -> dict:
    """Reference statistics (mu, sigma, features) of the first `count` images of `split` (all when
    None or larger than the split), read from the run's cache or computed and cached (atomically)."""
    logger = logger or logging.getLogger("tessera")
    total = split_size(manifest, split)
    count = total if count is None else min(count, total)
    partial = count < total
    cache = Path(run_dir) / FOLDER / (f"reference-{split}-first{count}.npz" if partial else f"reference-{split}.npz")
    key = {"shard_manifest_sha256": sha256_file(manifest), "split": split, "images": count, "inception": source}
    key_path = cache.with_suffix(".json")
    try:
        cached = cache.is_file() and read_json(key_path) == key
    except (OSError, ValueError):  # a missing or torn key file: recompute
        cached = False
    if cached:
        logger.info("reference statistics: cached %s", cache)
        return reference_from_npz(cache, extractor, batch=batch, need_features=need_features)
    features = inception_features(extractor, original_blocks(manifest, split, count, batch), total=count,
                                  desc=f"reference ({split})")
    cache.parent.mkdir(parents=True, exist_ok=True)
    ref = save_reference(cache, features["2048"], f"shards:{split}" + (f"[:{count}]" if partial else ""))
    atomic_write_json(key_path, key)  # after the data: a key never vouches for a file not yet written
    return ref


def reconstruction_fid(tokenizer, run_dir: str | Path, manifest: str | Path, extractor, source: str, *,
                       split: str = "val", max_images: int, batch: int = 50, device: torch.device,
                       logger: logging.Logger | None = None) -> dict:
    """rFID: the tokenizer's reconstructions of the first `max_images` images of `split` against
    those same originals (FID's formula through pipeline.evaluation.scoring, so it matches the score stage).
    Named rfid_uncalibrated when the Inception weights are not the real ones."""
    from .inception import UNCALIBRATED
    from .scoring import compute_metrics

    count = min(max_images, split_size(manifest, split))
    reference = split_reference(run_dir, manifest, split, extractor, source, batch=batch, count=count,
                                need_features=False, logger=logger)
    was_training = tokenizer.training
    tokenizer.eval()
    try:
        blocks = reconstruction_blocks(tokenizer, manifest, split, count, batch, device)
        features = inception_features(extractor, blocks, total=count, desc="rFID reconstructions")
    finally:
        tokenizer.train(was_training)
    fid = compute_metrics(features, reference, ["fid"], source=source)
    name = "rfid_uncalibrated" if source == UNCALIBRATED else "rfid"
    return {name: next(iter(fid.values())), "rfid_images": count}
