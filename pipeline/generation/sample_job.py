"""Drawing the sample stage's images: its plan of chunks, the class of each sample, the batches
that fill a chunk, the preview grid and the manifest.

Chunk j holds samples [j * chunk_size, (j + 1) * chunk_size). Sample i has class i mod num_classes
(class-conditional priors: every class gets floor(N / C) samples and the first N mod C classes one
more; unconditional priors: the start token, label -1) and draws all its randomness from a
generator seeded by (seed, i). Batches never cross a chunk and start at its first sample, so a
chunk's bytes do not depend on the launch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..runner.artifacts import PRIOR_WEIGHTS, TOKENIZER_WEIGHTS, load_prior, load_tokenizer
from ..runner.units import Unit
from ..runtime.io import sha256_file, sha256_json
from . import sample_codes
from .decode import decode_to_uint8, save_uint8_grid
from .sample_files import read_sample_chunk
from .sampling import SamplingOptions

GRID_COLUMNS = 8


def sampling_options(sc) -> SamplingOptions:
    return SamplingOptions(temperature=sc.temperature, top_k=list(sc.top_k), top_p=list(sc.top_p),
                           position_temperature=sc.position_temperature, position_top_k=sc.position_top_k,
                           position_top_p=sc.position_top_p, cfg_scale=sc.cfg_scale, cfg_schedule=sc.cfg_schedule)


def sample_label(i: int, num_classes: int) -> int:
    """The class of sample i: round-robin, so every prefix of the plan is as balanced as it can be."""
    return i % num_classes if num_classes else -1


@dataclass
class SampleJob:
    prior: torch.nn.Module
    tokenizer: torch.nn.Module
    opts: SamplingOptions
    plan: list[Unit]
    plan_id: str
    num_samples: int
    num_classes: int
    resolution: int
    batch_size: int
    seed: int
    grid_classes: int
    fingerprints: dict

    @classmethod
    def create(cls, tok_dir: Path, prior_dir: Path, cfg, device: torch.device) -> "SampleJob":
        """`tok_dir`, `prior_dir`: the exported tokenizer's and prior's folders; `cfg`: the whole Config."""
        sc = cfg.sample
        tokenizer = load_tokenizer(tok_dir, device)
        prior = load_prior(prior_dir, device)
        if device.type == "cuda":
            prior = prior.to(torch.bfloat16)  # GPU sampling in bf16 (CPU: fp32, the reproducible reference)
        N, size = sc.num_samples, sc.chunk_size
        plan = [Unit("samples", j, lo, min(N, lo + size), f"chunks/chunk-{j:06d}.tar")
                for j, lo in enumerate(range(0, N, size))]
        opts = sampling_options(sc)
        fingerprints = {"prior_sha256": sha256_file(prior_dir / PRIOR_WEIGHTS),
                        "tokenizer_sha256": sha256_file(tok_dir / TOKENIZER_WEIGHTS)}
        plan_id = sha256_json({**fingerprints, "seed": cfg.seed, "sampling": vars(opts),
                               "batch_size": sc.batch_size, "device": device.type})
        return cls(prior, tokenizer, opts, plan, plan_id, N, prior.num_classes, tokenizer.resolution, sc.batch_size,
                   cfg.seed, sc.grid_classes, fingerprints)

    @torch.no_grad()
    def rows(self, unit: Unit, bar):
        """(index, image, label) of one chunk, drawn in batches that start at the chunk's first sample."""
        for lo in range(unit.start, unit.stop, self.batch_size):
            indices = list(range(lo, min(unit.stop, lo + self.batch_size)))
            labels = [sample_label(i, self.num_classes) for i in indices]
            label_t = torch.tensor(labels) if self.num_classes else None
            codes = sample_codes(self.prior, label_t, indices, self.seed, self.opts)
            images = decode_to_uint8(self.tokenizer, codes, batch_size=len(indices)).numpy()
            yield from zip(indices, images, labels)
            bar.update(len(indices))

    def write_grid(self, path: Path, chunks: list[Path]) -> None:
        """GRID_COLUMNS samples for each of the first grid_classes classes, one class per row."""
        rows = min(self.grid_classes, self.num_classes) if self.num_classes else 1
        wanted = {}
        for chunk in chunks:
            for _index, image, label in read_sample_chunk(chunk):
                key = label if self.num_classes else 0
                if key < rows and len(wanted.setdefault(key, [])) < GRID_COLUMNS:
                    wanted[key].append(image)
            if len(wanted) == rows and all(len(v) == GRID_COLUMNS for v in wanted.values()):
                break
        images = [img for key in sorted(wanted) for img in wanted[key]]
        save_uint8_grid(torch.from_numpy(np.stack(images)), path, nrow=GRID_COLUMNS)

    def build_manifest(self, sidecars: list[dict]) -> dict:
        """Content only (no times or hosts): an interrupted and an uninterrupted run give the same bytes."""
        per_class = [0] * self.num_classes
        for i in range(self.num_samples):
            if self.num_classes:
                per_class[sample_label(i, self.num_classes)] += 1
        return {"num_samples": self.num_samples, "num_classes": self.num_classes, "resolution": self.resolution,
                "seed": self.seed, "sampling": vars(self.opts), "batch_size": self.batch_size, "per_class": per_class,
                **self.fingerprints,
                "chunks": [{"name": s["name"], "start": s["start"], "stop": s["stop"], "sha256": s["sha256"],
                            "bytes": s["bytes"]} for s in sidecars]}
