"""Reading code shards for the prior: a StreamingDataset over one split's code units.

    loader = make_code_loader(run_dir / "precompute_codes", "train", batch_size=per_rank_batch, seed=cfg.seed)
    for batch in loader:            # dict of tensors, see collate_codes
        ...
    state = loader.state_dict()     # exact mid-epoch position; a new loader + load_state_dict resumes

Order: mosaicml-streaming shuffles over `num_canonical_nodes` canonical nodes (fixed to 1 here,
recorded in the state) and then splits each global batch among the ranks. With the canonical
node count and the global batch (per-rank batch x ranks) fixed, the sequence of global batches is
the same for any number of ranks, and a checkpoint taken on N ranks resumes on M ranks.
Rank/world come from torchrun's RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE (or an
initialised process group). Streaming keeps per-dataset shared memory keyed by the unit folders:
two live datasets over the same folders in one process are refused by streaming.

Integrity: every unit listed in RUN_DIR/precompute_codes/manifest.json is checked against its
sha256 on open (cached by size + mtime, as for the image shards); a mismatch names the unit.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..runtime.io import read_json
from .manifest import ShardIntegrityError, verify_shards

NUM_CANONICAL_NODES = 1
_INT_COLUMNS = ("label", "index", "view", "length")


def load_code_manifest(codes_dir: str | os.PathLike) -> tuple[dict, Path]:
    """(manifest, folder) of a precompute_codes output; ShardIntegrityError when it is missing."""
    root = Path(codes_dir)
    path = root / "manifest.json"
    if not path.is_file():
        raise ShardIntegrityError(f"no code manifest at {path}; run the precompute_codes stage first")
    return read_json(path), root


def _make_dataset_class():
    from streaming import StreamingDataset

    class CodeDataset(StreamingDataset):
        """StreamingDataset whose samples are dicts of tensors (codes as int64, latents fp16)."""

        def get_item(self, sample_id: int, retry: int = 7) -> dict:
            return sample_to_tensors(super().get_item(sample_id, retry))

    return CodeDataset


def sample_to_tensors(sample: dict) -> dict:
    out = {}
    for name, value in sample.items():
        if name in _INT_COLUMNS:
            out[name] = int(value)
        elif isinstance(value, np.ndarray):
            # int16 codes become int64 (embedding indices); fp16 latents stay fp16 (half the memory)
            out[name] = torch.from_numpy(value.astype(np.int64) if value.dtype.kind in "iu" else value.copy())
        else:
            out[name] = value
    return out


def make_code_dataset(codes_dir: str | os.PathLike, split: str, *, batch_size: int, seed: int = 0,
                      shuffle: bool = True, verify: bool = True, **streaming_kwargs):
    """A CodeDataset over one split (one Stream per code unit). `batch_size` is per rank."""
    from streaming import Stream

    manifest, root = load_code_manifest(codes_dir)
    if split not in manifest["splits"]:
        raise ShardIntegrityError(f"split {split!r} is not in {root}/manifest.json (has {sorted(manifest['splits'])})")
    if verify:
        verify_shards(manifest, root, splits=(split,), stage="precompute_codes")
    shards = [s for s in manifest["splits"][split]["shards"] if s["count"] > 0]
    streams = [Stream(local=str(root / s["name"])) for s in shards]
    streaming_kwargs.setdefault("num_canonical_nodes", NUM_CANONICAL_NODES)
    dataset = _make_dataset_class()(streams=streams, remote=None, shuffle=shuffle, shuffle_seed=seed,
                                    batch_size=batch_size, **streaming_kwargs)
    dataset.code_manifest = manifest
    return dataset


def collate_codes(samples: list[dict], pad_to: int | None = None) -> dict:
    """Stack a batch. DQ sequences are right-padded (with 0) to the longest in the batch (or
    `pad_to`); `mask` is True on real tokens. Ints become int64 tensors; strings stay lists."""
    out: dict = {}
    for name in samples[0]:
        values = [s[name] for s in samples]
        if name.endswith("_L"):
            L = max(v.numel() for v in values) if pad_to is None else pad_to
            padded = torch.zeros(len(values), L, dtype=torch.long)
            for b, v in enumerate(values):
                padded[b, :v.numel()] = v
            out[name] = padded
        elif torch.is_tensor(values[0]):
            out[name] = torch.stack(values)
        elif isinstance(values[0], int):
            out[name] = torch.tensor(values, dtype=torch.long)
        else:
            out[name] = values
    if "positions_L" in out:
        lengths = torch.tensor([s["positions_L"].numel() for s in samples])
        out["mask_L"] = torch.arange(out["positions_L"].shape[1])[None] < lengths[:, None]
    return out


def make_code_loader(codes_dir: str | os.PathLike, split: str, batch_size: int, *, seed: int = 0,
                     shuffle: bool = True, num_workers: int = 0, drop_last: bool = True, pad_to: int | None = None,
                     verify: bool = True, **streaming_kwargs):
    """A resumable StreamingDataLoader over one split of the code shards; `batch_size` is per rank.

    Batches: RQ {"codes_HWD" (B,H,W,D) int64, "label", "index", "view" (B,), "key", ["latent_CHW" fp16]};
    DQ {"positions_L", "contents_L", "granularity_L", "mask_L" (B,L), "length", "granularity_map_HcWc", ...}.
    """
    from functools import partial

    from streaming import StreamingDataLoader

    dataset = make_code_dataset(codes_dir, split, batch_size=batch_size, seed=seed, shuffle=shuffle, verify=verify,
                                **streaming_kwargs)
    return StreamingDataLoader(dataset, batch_size=batch_size, num_workers=num_workers, drop_last=drop_last,
                               collate_fn=partial(collate_codes, pad_to=pad_to))
