"""Reading shards back: a random-access dataset over either format + a resumable loader.

    loader = make_image_loader(run_dir / "shard", "train", batch_size=32, rank=r, world_size=w, seed=cfg.seed)
    for batch in loader:                 # one epoch from the current position
        batch.images, batch.labels, batch.keys   # (B,3,H,W) float in [-1, 1], (B,) int64, list of str
    state = loader.state_dict()          # {"epoch", "samples_consumed"}; restore with load_state_dict

Order: epoch e is a permutation of the split drawn from a generator seeded by (seed, e), the
same on every rank; rank r takes every world_size-th entry, so ranks never overlap and together
cover the split. DataLoader workers receive whole batches from that list, so workers cannot
overlap either. Augmentations are seeded by (seed, epoch, sample index), not by worker state.
Resuming skips the `samples_consumed` first entries of this rank's list for that epoch.
"""
from __future__ import annotations

import io
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..runtime.cpus import capped_workers
from .image_batch import augment_pixels, image_batch
from .manifest import ShardIntegrityError, load_manifest, verify_shards
from .shards import IMAGE_EXTENSION
from .stream_reader import make_stream_loader

_LOG = logging.getLogger("tessera")


class _TarUnit:
    """One tar shard read by member offsets (built once per process from the tar headers).

    Hand-written because webdataset (1.0.2 as installed) only streams a tar from its start: the
    indexed reader's global per-sample permutation needs random access to any sample. Streaming
    through webdataset is data.reader=stream (pipeline/data/stream_reader.py)."""

    def __init__(self, path: Path, image_ext: str):
        self.path, self.image_ext = path, image_ext
        self._samples: list[tuple[str, dict[str, tuple[int, int]]]] | None = None
        self._fd: int | None = None

    def __len__(self) -> int:
        return len(self._index())

    def _index(self):
        if self._samples is None:
            by_key: dict[str, dict[str, tuple[int, int]]] = {}
            with tarfile.open(self.path, "r:") as tar:
                for member in tar:
                    if member.isfile():
                        key, _, ext = Path(member.name).name.partition(".")
                        by_key.setdefault(key, {})[ext] = (member.offset_data, member.size)
            self._samples = list(by_key.items())
        return self._samples

    def _read(self, offset: int, size: int) -> bytes:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        # pread keeps no shared file position, so DataLoader workers forked with this fd are safe.
        return os.pread(self._fd, size, offset)

    def get(self, i: int) -> tuple[str, int, bytes]:
        key, members = self._index()[i]
        label = int(self._read(*members["cls"]))
        return key, label, self._read(*members[self.image_ext])

    def __getstate__(self):
        return {**self.__dict__, "_fd": None}  # descriptors do not cross process boundaries


class _MdsUnit:
    """One MDS unit directory, read through streaming's LocalDataset."""

    def __init__(self, path: Path, image_ext: str):
        self.path, self.image_ext = path, image_ext
        self._dataset = None

    def _ds(self):
        if self._dataset is None:
            from streaming.base import LocalDataset

            self._dataset = LocalDataset(local=str(self.path))
        return self._dataset

    def __len__(self) -> int:
        return len(self._ds())

    def get(self, i: int) -> tuple[str, int, bytes]:
        sample = self._ds()[i]
        return sample["key"], int(sample["cls"]), sample[self.image_ext]

    def __getstate__(self):
        return {**self.__dict__, "_dataset": None}


class ShardedImageDataset(Dataset):
    """Random access to the samples of one split, in manifest (shard) order.

    `dataset[i]` gives (image tensor, label, key) without augmentation; `dataset[(i, epoch)]`
    applies the configured random crop / flip seeded by (seed, epoch, i).
    """

    def __init__(self, manifest_path: str | os.PathLike, split: str, *, seed: int = 0, random_crop: bool = False,
                 hflip: bool = False, verify: bool = True):
        manifest, root = load_manifest(manifest_path)
        if split not in manifest["splits"]:
            raise ShardIntegrityError(f"split {split!r} is not in {root}/manifest.json "
                                      f"(has {sorted(manifest['splits'])})")
        if indexes_urls(manifest):
            raise ShardIntegrityError(
                f"{root}/manifest.json indexes webdataset shards by URL (data.wds_mode=index), which can only be "
                f"streamed: read them with make_image_loader or stream_reader.shard_batches")
        if verify:
            verify_shards(manifest, root, splits=(split,))
        self.manifest, self.root, self.split = manifest, root, split
        self.seed, self.random_crop, self.hflip = seed, random_crop, hflip
        self.resolution = manifest["resolution"]
        self.class_names = manifest["class_names"]
        image_ext = IMAGE_EXTENSION[manifest["image_encoding"]]
        unit_type = _TarUnit if manifest["format"] == "webdataset" else _MdsUnit
        shards = manifest["splits"][split]["shards"]
        self._units = [unit_type(root / s["name"], image_ext) for s in shards]
        self._counts = [s["count"] for s in shards]
        self._offsets = np.cumsum([0] + self._counts)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def raw(self, index: int) -> tuple[str, int, bytes]:
        """(key, label, encoded image bytes) of sample `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for split {self.split!r} ({len(self)} samples)")
        unit_id = int(np.searchsorted(self._offsets, index, side="right")) - 1
        unit = self._units[unit_id]
        if len(unit) != self._counts[unit_id]:
            raise ShardIntegrityError(f"shard {unit.path} holds {len(unit)} samples, the manifest says "
                                      f"{self._counts[unit_id]}; rerun the shard stage with --force (it rewrites "
                                      f"only the shards that fail their check)")
        return unit.get(index - int(self._offsets[unit_id]))

    def __getitem__(self, item) -> tuple[torch.Tensor, int, str]:
        index, epoch = item if isinstance(item, tuple) else (item, None)
        key, label, data = self.raw(index)
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.array(image.convert("RGB"))  # a writable copy: torch refuses read-only arrays
        if epoch is not None and (self.random_crop or self.hflip):
            pixels = self._augment(pixels, index, epoch)
        tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        return tensor, label, key

    def _augment(self, pixels: np.ndarray, index: int, epoch: int) -> np.ndarray:
        return augment_pixels(pixels, self.resolution, self.seed, epoch, index, self.random_crop, self.hflip)


class EpochOrder:
    """Which sample indices a rank reads in an epoch (see the module docstring)."""

    def __init__(self, num_samples: int, *, rank: int, world_size: int, seed: int, shuffle: bool,
                 drop_last: bool, batch_size: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.shuffle, self.drop_last, self.batch_size = seed, shuffle, drop_last, batch_size

    def rank_indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.arange(self.num_samples)
        if self.drop_last:
            # Equal whole batches on every rank (what DDP needs); the tail of the permutation waits.
            step = self.world_size * self.batch_size
            order = order[: self.num_samples // step * step]
        return order[self.rank::self.world_size].tolist()


class ResumableImageLoader:
    """Iterating runs the rest of the current epoch; `state_dict()` records the exact position."""

    def __init__(self, dataset: ShardedImageDataset, order: EpochOrder, batch_size: int, *, num_workers: int = 0,
                 epoch: int = 0):
        self.dataset, self.order, self.batch_size, self.num_workers = dataset, order, batch_size, num_workers
        self.epoch, self.samples_consumed = epoch, 0

    def __len__(self) -> int:
        """Batches in one full epoch on this rank."""
        return -(-len(self.order.rank_indices(self.epoch)) // self.batch_size)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "samples_consumed": self.samples_consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.samples_consumed = int(state["epoch"]), int(state["samples_consumed"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.samples_consumed = epoch, 0

    def __iter__(self):
        epoch = self.epoch
        remaining = self.order.rank_indices(epoch)[self.samples_consumed:]
        batches = [[(i, epoch) for i in remaining[start:start + self.batch_size]]
                   for start in range(0, len(remaining), self.batch_size)]
        loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers,
                            collate_fn=_collate)
        for batch in loader:
            self.samples_consumed += len(batch.keys)
            yield batch
        self.epoch, self.samples_consumed = epoch + 1, 0


def _collate(samples):
    return image_batch(*zip(*samples))


def indexes_urls(manifest: dict) -> bool:
    """True for a manifest that indexes existing webdataset shards by URL (data.wds_mode=index):
    they can only be streamed, never read at random."""
    return any("url" in s for info in manifest["splits"].values() for s in info["shards"])


def make_image_loader(manifest_or_shard_dir: str | os.PathLike, split: str, batch_size: int, *, rank: int = 0,
                      world_size: int = 1, seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                      num_workers: int = 0, random_crop: bool = False, hflip: bool = False,
                      epoch: int = 0, reader: str = "indexed"):
    """A resumable loader over one split of a shard manifest (webdataset or MDS), verified on open.

    reader="indexed": random access, a global permutation per epoch (this module); "stream": the
    webdataset pipeline of pipeline.data.stream_reader, which is also used whatever `reader` says
    for a manifest that indexes shards by URL (they cannot be read at random).

    The indexed reader's batches do not depend on `num_workers`, so it is capped by the cores this
    rank may use; the stream reader splits shards among its workers, so there the worker count is
    part of the batch order and is kept as configured (same config, same batches on any machine)."""
    manifest, _ = load_manifest(manifest_or_shard_dir)
    if reader == "stream" or indexes_urls(manifest):
        return make_stream_loader(manifest_or_shard_dir, split, batch_size, rank=rank, world_size=world_size, seed=seed,
                                  shuffle=shuffle, drop_last=drop_last, num_workers=num_workers,
                                  random_crop=random_crop, hflip=hflip, epoch=epoch)
    dataset = ShardedImageDataset(manifest_or_shard_dir, split, seed=seed, random_crop=random_crop, hflip=hflip)
    order = EpochOrder(len(dataset), rank=rank, world_size=world_size, seed=seed, shuffle=shuffle,
                       drop_last=drop_last, batch_size=batch_size)
    return ResumableImageLoader(dataset, order, batch_size, num_workers=capped_workers(num_workers, _LOG),
                                epoch=epoch)
