"""Streaming shards through a webdataset pipeline, with exact mid-epoch resume.

    loader = make_stream_loader(run_dir / "shard", "train", 32, rank=r, world_size=w, seed=0, num_workers=2)
    for batch in loader:                 # ImageBatch(images, labels, keys), as the indexed reader
        ...
    state = loader.state_dict()          # {"epoch", "consumed": {shard: samples}, "next_worker", "workers"}

The shards of a split may be our own (files next to the manifest) or an `index`ed webdataset set
(local paths, `pipe:` commands, http(s) URLs named in the manifest). Per epoch e:

1. Shard order: a permutation of the split's shards seeded by (seed, e), the same on every rank.
2. Node split: rank r takes every world_size-th shard of that order (ranks never overlap and
   together cover the split; ranks may hold a few samples more or fewer than each other).
3. Worker split: DataLoader worker slot s takes every num_workers-th shard of the rank's list.
4. Each shard is read through urls.read_shard_samples (bounded retries) into webdataset samples;
   the samples listed as corrupt in the manifest are dropped, the rest permuted by a generator
   seeded by (seed, e, shard), decoded, augmented seeded by (seed, e, sample index), and batched
   inside the worker. The shard's sha256 and sample count are checked against the manifest when
   its stream ends.

The pipeline is webdataset's DataPipeline with webdataset's stages (tar expansion, grouping into
samples, map, batched) around ours; the WebDataset class itself is not used because its opener
(gopen) is fixed: it cannot retry a shard and continue after the last delivered sample, nor pass
a CA bundle to curl (pipeline/data/urls.py), nor skip a resumed shard's consumed head.

Resume: every batch carries, for each shard it took samples from, how many of that shard's
(permuted) samples are consumed, and the worker slot it came from. The state records both; a
resumed epoch skips finished shards without opening them, drops the consumed head of the
partly read ones, and rotates the worker slots so that the DataLoader's round robin (which
always starts at its worker 0) continues with the slot that was next. Resuming therefore needs
the same num_workers (checked) and world size.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, get_worker_info

from ..runtime.errors import StageError
from .image_batch import ImageBatch, augment_pixels, image_batch
from .manifest import ShardIntegrityError, load_manifest, verify_shards
from .shards import IMAGE_EXTENSION
from .urls import FetchOptions, fetch_options, read_shard_samples


@dataclass(frozen=True)
class StreamShard:
    position: int         # place in the manifest's list of this split's shards
    url: str              # path or URL the stream is read from
    count: int            # usable samples (after the listed corrupt ones)
    sha256: str
    first_index: int      # index of its first sample in the split (manifest order): seeds augmentation
    skip: frozenset       # keys of samples listed as corrupt


def split_shards(manifest: dict, root, split: str) -> list[StreamShard]:
    shards, first = [], 0
    for position, entry in enumerate(manifest["splits"][split]["shards"]):
        url = entry.get("url") or str(root / entry["name"])
        shards.append(StreamShard(position, url, entry["count"], entry["sha256"], first,
                                  frozenset(entry.get("skip", ()))))
        first += entry["count"]
    return shards


def sample_keys(manifest: dict) -> tuple[str, str]:
    """(image member, label member) of the manifest's shards."""
    source = manifest.get("webdataset_source", {})
    if source.get("mode") == "index":  # the input shards themselves, with their own member names
        return source["image_key"], source["label_key"]
    return IMAGE_EXTENSION[manifest["image_encoding"]], "cls"


def webdataset_label(sample: dict, label_key: str) -> int:
    """The integer label of a webdataset sample: member `cls`-like text, or 'json.FIELD'."""
    member, _, field = label_key.partition(".") if label_key.startswith("json.") else (label_key, "", "")
    if member not in sample:
        raise KeyError(f"no '{member}' member")
    if field:
        return int(json.loads(sample[member])[field])
    return int(sample[member].decode("ascii").strip())


class ShardStream(torch.utils.data.IterableDataset):
    """One epoch of one rank, from a resume state; iterated in the main process or in DataLoader workers."""

    def __init__(self, shards: list[StreamShard], *, resolution: int, image_key: str, label_key: str, rank: int,
                 world_size: int, seed: int, shuffle: bool, batch_size: int, drop_last: bool, random_crop: bool,
                 hflip: bool, fetch: FetchOptions):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.shards, self.resolution, self.image_key, self.label_key = shards, resolution, image_key, label_key
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.batch_size, self.drop_last, self.random_crop, self.hflip = batch_size, drop_last, random_crop, hflip
        self.fetch = fetch
        # Set by the loader before each iteration (forked into the workers with the dataset).
        self.epoch, self.consumed, self.rotation, self.num_slots = 0, {}, 0, 1

    # ----- which shards, in which order (the node and worker splitters) -------------------------
    def epoch_order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.shards)))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.shards), generator=generator).tolist()

    def split_by_rank(self, src):
        for i, item in enumerate(src):
            if i % self.world_size == self.rank:
                yield item

    def worker_slot(self) -> int:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return (worker + self.rotation) % self.num_slots

    def split_by_worker(self, src):
        slot = self.worker_slot()
        for i, item in enumerate(src):
            if i % self.num_slots == slot:
                yield item

    # ----- samples of one shard --------------------------------------------------------------
    def shard_samples(self, src):
        """(shard, place in the shard's order this epoch, index among its usable samples as stored, sample)
        for every sample still to be read."""
        for item in src:
            shard = self.shards[item["shard"]]
            done = self.consumed.get(shard.position, 0)
            if done >= shard.count:
                continue  # finished before the checkpoint: not even opened
            yield from self._read_one(shard, done)

    def _read_one(self, shard: StreamShard, done: int):
        digest: list = []
        stream = read_shard_samples(shard.url, self.fetch, digest=digest)
        if self.shuffle:  # the whole shard first: its order is a seeded permutation of its samples
            samples = [s for s in stream if s["__key__"] not in shard.skip]
            self._check(shard, len(samples), digest)
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_033 + shard.position)
            order = torch.randperm(len(samples), generator=generator).tolist()
            for rank_in_shard, i in enumerate(order[done:], start=done):
                yield shard, rank_in_shard, i, samples[i]
            return
        i = -1
        for sample in stream:
            if sample["__key__"] in shard.skip:
                continue
            i += 1
            if i >= done:
                yield shard, i, i, sample
        self._check(shard, i + 1, digest)

    def _check(self, shard: StreamShard, count: int, digest: list) -> None:
        if count != shard.count:
            raise ShardIntegrityError(f"shard {shard.url} holds {count} usable samples, the manifest says "
                                      f"{shard.count}: it changed since the shard stage; rerun it with --force")
        if digest and digest[0][0] != shard.sha256:
            raise ShardIntegrityError(f"shard {shard.url} does not match the manifest (sha256 {digest[0][0][:12]}... "
                                      f"!= {shard.sha256[:12]}...): it changed since the shard stage; rerun it "
                                      f"with --force")

    # ----- decode, augment, batch ---------------------------------------------------------------
    def decode(self, item):
        shard, rank_in_shard, i, sample = item
        key = sample["__key__"]
        try:
            with Image.open(io.BytesIO(sample[self.image_key])) as image:
                pixels = np.array(image.convert("RGB"))
            label = webdataset_label(sample, self.label_key)
        except Exception as err:  # noqa: BLE001 -- not listed as corrupt by the shard stage: the shard changed
            raise ShardIntegrityError(f"shard {shard.url}: sample {key} cannot be decoded ({type(err).__name__}: "
                                      f"{err}) though the shard stage read it; rerun it with --force") from err
        if pixels.shape[:2] != (self.resolution, self.resolution):
            raise ShardIntegrityError(f"shard {shard.url}: sample {key} is {pixels.shape[1]}x{pixels.shape[0]}, "
                                      f"the manifest says {self.resolution} px")
        if self.random_crop or self.hflip:
            pixels = augment_pixels(pixels, self.resolution, self.seed, self.epoch, shard.first_index + i,
                                    self.random_crop, self.hflip)
        tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
        return tensor, label, key, shard.position, rank_in_shard + 1

    def collate(self, samples):
        images, labels, keys, positions, consumed = zip(*samples)
        progress = {}
        for position, n in zip(positions, consumed):
            progress[position] = n  # in order: the last entry of a shard is its furthest point
        batch = image_batch(images, labels, keys)
        return batch, progress, self.worker_slot()

    def pipeline(self):
        import webdataset as wds

        shard_list = [{"url": self.shards[p].url, "shard": p} for p in self.epoch_order(self.epoch)]
        return wds.DataPipeline(
            lambda: iter(shard_list),  # (a bare list would be taken as a list of stages)
            self.split_by_rank,       # nodesplitter
            self.split_by_worker,     # workersplitter
            self.shard_samples,       # open with retries + tar -> samples (webdataset) + order + resume offset
            wds.map(self.decode),
            wds.batched(self.batch_size, collation_fn=self.collate, partial=not self.drop_last),
        )

    def __iter__(self):
        return iter(self.pipeline())


class StreamingImageLoader:
    """Iterating runs the rest of the current epoch; `state_dict()` records the exact position."""

    def __init__(self, stream: ShardStream, *, num_workers: int = 0, epoch: int = 0):
        self.stream, self.num_workers = stream, num_workers
        self.batch_size = stream.batch_size
        self.epoch, self.consumed, self.next_worker = epoch, {}, 0

    @property
    def num_slots(self) -> int:
        return max(1, self.num_workers)

    def __len__(self) -> int:
        """Batches in one full epoch on this rank, at most (per worker, as the batches are cut there)."""
        order = self.stream.epoch_order(self.epoch)[self.stream.rank::self.stream.world_size]
        per_slot = [sum(self.stream.shards[p].count for p in order[s::self.num_slots]) for s in range(self.num_slots)]
        cut = (lambda n: n // self.batch_size) if self.stream.drop_last else (lambda n: -(-n // self.batch_size))
        return sum(cut(n) for n in per_slot)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": {str(k): v for k, v in sorted(self.consumed.items())},
                "next_worker": self.next_worker, "workers": self.num_slots}

    def load_state_dict(self, state: dict) -> None:
        if "consumed" not in state:
            raise ValueError("this reader state was saved by the indexed reader (data.reader=indexed); resume with "
                             "the same data.reader")
        if int(state["workers"]) != self.num_slots:
            raise ValueError(f"the stream reader's state was saved with {state['workers']} worker slot(s); resume "
                             f"with data.num_workers giving {state['workers']} (now {self.num_slots})")
        self.epoch, self.next_worker = int(state["epoch"]), int(state["next_worker"])
        self.consumed = {int(k): int(v) for k, v in state["consumed"].items()}

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.consumed, self.next_worker = epoch, {}, 0

    def __iter__(self):
        epoch = self.epoch
        stream = self.stream
        stream.epoch, stream.consumed = epoch, dict(self.consumed)
        stream.rotation, stream.num_slots = self.next_worker, self.num_slots
        if self.num_workers:
            batches = DataLoader(stream, batch_size=None, num_workers=self.num_workers, collate_fn=_as_is)
        else:
            batches = iter(stream)
        fresh, delivered = not self.consumed, 0
        for batch, progress, slot in batches:
            self.consumed.update(progress)
            self.next_worker = (slot + 1) % self.num_slots
            delivered += 1
            yield batch
        if fresh and not delivered and stream.drop_last:  # endless training (drop_last) would wait forever
            raise StageError(f"rank {stream.rank} of {stream.world_size} got no full batch of "
                             f"{self.batch_size} in epoch {epoch}: the split has {len(stream.shards)} shard(s) for "
                             f"{stream.world_size} rank(s) x {self.num_slots} worker slot(s); use fewer ranks or "
                             f"workers, or smaller shards")
        self.epoch, self.consumed, self.next_worker = epoch + 1, {}, 0


def _as_is(item):
    return item  # batches are cut and collated inside the workers


def make_stream_loader(manifest_or_shard_dir: str | os.PathLike, split: str, batch_size: int, *, rank: int = 0,
                       world_size: int = 1, seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                       num_workers: int = 0, random_crop: bool = False, hflip: bool = False, epoch: int = 0,
                       fetch: FetchOptions | None = None) -> StreamingImageLoader:
    """A resumable webdataset-pipeline loader over one split of a manifest; our own shards are verified
    on open, every shard (ours or indexed URLs) again by its stream's sha256 as it is read."""
    manifest, root = load_manifest(manifest_or_shard_dir)
    if split not in manifest["splits"]:
        raise ShardIntegrityError(f"split {split!r} is not in {root}/manifest.json (has {sorted(manifest['splits'])})")
    if manifest["format"] != "webdataset":
        raise ShardIntegrityError(f"data.reader=stream reads tar shards; {root}/manifest.json lists "
                                  f"{manifest['format']} shards (use data.reader=indexed)")
    verify_shards(manifest, root, splits=(split,))
    image_key, label_key = sample_keys(manifest)
    stream = ShardStream(split_shards(manifest, root, split), resolution=manifest["resolution"], image_key=image_key,
                         label_key=label_key, rank=rank, world_size=world_size, seed=seed, shuffle=shuffle,
                         batch_size=batch_size, drop_last=drop_last, random_crop=random_crop, hflip=hflip,
                         fetch=fetch or fetch_options())
    return StreamingImageLoader(stream, num_workers=num_workers, epoch=epoch)


def shard_batches(manifest_or_shard_dir: str | os.PathLike, split: str, position: int, batch_size: int, *,
                  fetch: FetchOptions | None = None) -> Iterator[ImageBatch]:
    """Shard `position` of `split` read front to back (stored order, no augmentation) in batches of
    `batch_size`, checked against the manifest at its end: how stages that encode every image once
    per shard (precompute_codes) read shards indexed by URL, which offer no random access."""
    manifest, root = load_manifest(manifest_or_shard_dir)
    image_key, label_key = sample_keys(manifest)
    shard = split_shards(manifest, root, split)[position]
    stream = ShardStream([shard], resolution=manifest["resolution"], image_key=image_key, label_key=label_key,
                         rank=0, world_size=1, seed=0, shuffle=False, batch_size=batch_size, drop_last=False,
                         random_crop=False, hflip=False, fetch=fetch or fetch_options())
    for batch, _, _ in stream:
        yield batch
