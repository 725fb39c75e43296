"""The readers a trainer is handed by its stage: one factory per kind of input, bound to the files
of the stage that wrote them, so a trainer never looks into another stage's folder itself.

    ImageLoaders   the image shards of a shard manifest (tokenizer training)
    CodeLoaders    the code shards of precompute_codes (prior training)

Each builds a fresh loader per call, with the per-rank batch size the trainer computed.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..runtime.dist import DistEnv


@dataclass
class ImageLoaders:
    """Readers over a shard manifest: train (shuffled, epochs follow each other), calibration and val."""
    manifest: Path
    env: DistEnv
    seed: int
    num_workers: int
    random_crop: bool
    hflip: bool
    reader: str = "indexed"   # data.reader; a manifest of shard URLs is always streamed

    def train(self, batch_size: int):
        from .reader import make_image_loader

        return make_image_loader(self.manifest, "train", batch_size, rank=self.env.rank,
                                 world_size=self.env.world_size, seed=self.seed, shuffle=True, drop_last=True,
                                 num_workers=self.num_workers, random_crop=self.random_crop, hflip=self.hflip,
                                 reader=self.reader)

    def calibration(self, batch_size: int):
        """The first train images in stored order, identical on every rank (same threshold everywhere)."""
        from .reader import make_image_loader

        return make_image_loader(self.manifest, "train", batch_size, rank=0, world_size=1, seed=self.seed,
                                 shuffle=False, num_workers=self.num_workers, reader=self.reader)

    def val(self, batch_size: int):
        from .reader import make_image_loader

        return make_image_loader(self.manifest, "val", batch_size, rank=self.env.rank,
                                 world_size=self.env.world_size, seed=self.seed, shuffle=False, drop_last=False,
                                 num_workers=self.num_workers, reader=self.reader)


@dataclass
class CodeLoaders:
    """Readers over precompute_codes' shards (mosaicml-streaming; ranks come from the environment)."""
    codes_dir: Path
    seed: int

    def train(self, batch_size: int):
        from .code_reader import make_code_loader

        return make_code_loader(self.codes_dir, "train", batch_size, seed=self.seed)

    def val(self, batch_size: int):
        """One pass in stored order; release it with `close_loader` before opening the next one."""
        from .code_reader import make_code_loader

        return make_code_loader(self.codes_dir, "val", batch_size, seed=self.seed, shuffle=False, drop_last=False)


def close_loader(loader) -> None:
    """Release a finished StreamingDataLoader's dataset (its shared memory) before the next one:
    streaming refuses two live datasets over the same folders in one process."""
    dataset = getattr(loader, "dataset", None)
    for name in ("_shutdown", "close"):
        fn = getattr(dataset, name, None)
        if callable(fn):
            try:
                fn()
            except Exception:  # noqa: BLE001 - best effort
                pass
            return
