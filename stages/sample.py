"""Stage `sample`: draw `sample.num_samples` images from the trained (or imported) prior.

1. Inputs: RUN_DIR/train_prior (prior.safetensors) and RUN_DIR/train_tokenizer (decoding).
2. Plan: chunk j holds samples [j * chunk_size, (j + 1) * chunk_size). Sample i has class
   i mod num_classes (class-conditional priors: every class gets floor(N / C) samples and the
   first N mod C classes one more; unconditional priors: the start token, label -1) and draws
   all its randomness from a generator seeded by (seed, i). Batches never cross a chunk and
   start at its first sample, so a chunk's bytes do not depend on the launch.
3. Work: worker w of W (array tasks x ranks) writes chunks w, w+W, ... as PNG tars
   (pipeline.runner.units); finished chunks are kept on a rerun, a partial one is redone.
4. Finish: the task that finds every chunk packs samples.npz (the ADM evaluator's format),
   draws grid.png (8 samples for each of the first classes) and writes manifest.json last.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.generation import sample_codes
from pipeline.generation.decode import decode_to_uint8, save_uint8_grid
from pipeline.generation.sample_files import pack_npz, read_sample_chunk, write_sample_chunk
from pipeline.generation.sampling import SamplingOptions
from pipeline.runner.artifacts import PRIOR_WEIGHTS, TOKENIZER_WEIGHTS, load_prior, load_tokenizer
from pipeline.runner.stage import StageContext, StageError, StageResult
from pipeline.runner.units import MANIFEST_NAME, Unit, items_and_rate, publish_unit, run_units
from pipeline.runtime.io import atomic_write_json, json_bytes, read_json, sha256_file, sha256_json

NAME = "sample"
INPUTS = {"train_tokenizer": ("tokenizer.safetensors",), "train_prior": ("prior.safetensors",)}
NPZ, GRID = "samples.npz", "grid.png"
GRID_COLUMNS = 8


def sampling_options(sc) -> SamplingOptions:
    return SamplingOptions(temperature=sc.temperature, top_k=list(sc.top_k), top_p=list(sc.top_p),
                           position_temperature=sc.position_temperature, position_top_k=sc.position_top_k,
                           position_top_p=sc.position_top_p, cfg_scale=sc.cfg_scale, cfg_schedule=sc.cfg_schedule)


def sample_label(i: int, num_classes: int) -> int:
    """The class of sample i: round-robin, so every prefix of the plan is as balanced as it can be."""
    return i % num_classes if num_classes else -1


def verify_outputs(stage_dir: Path) -> None:
    """Every chunk against the manifest (a missing or altered one is named)."""
    manifest = read_json(stage_dir / MANIFEST_NAME)
    for chunk in manifest["chunks"]:
        path = stage_dir / chunk["name"]
        if not path.is_file() or sha256_file(path) != chunk["sha256"]:
            raise StageError(f"{path}: missing or different from {stage_dir / MANIFEST_NAME}")


def run(ctx: StageContext) -> StageResult | None:
    job = SampleJob.create(ctx)
    ctx.logger.info("sample plan: %d samples in %d chunk(s) of %d, %s", job.num_samples, len(job.plan),
                    ctx.cfg.sample.chunk_size, f"{job.num_classes} classes" if job.num_classes else "unconditional")

    def write_one(unit: Unit, bar) -> dict:
        return publish_unit(ctx.stage_dir, unit, job.plan_id,
                            lambda path: {"count": write_sample_chunk(path, job.rows(unit, bar))})

    def finalize(sidecars: list[dict]) -> dict:
        chunks = [ctx.stage_dir / s["name"] for s in sidecars]
        pack_npz(ctx.stage_dir / NPZ, chunks, job.num_samples, job.resolution)
        job.write_grid(ctx.stage_dir / GRID, chunks)
        manifest = job.build_manifest(sidecars)
        atomic_write_json(ctx.stage_dir / MANIFEST_NAME, manifest)  # last: its presence means complete
        return manifest

    def summarize(manifest: dict, all_stats: list[dict]) -> StageResult:
        drawn, rate = items_and_rate(all_stats)
        per_class = manifest["per_class"]
        counts = {"samples": job.num_samples, "classes": job.num_classes, "chunks": len(job.plan),
                  **({"min_per_class": min(per_class), "max_per_class": max(per_class)} if per_class else {})}
        metrics = {"images_per_s": round(rate, 2), "samples_drawn_this_run": drawn, "sampling": manifest["sampling"]}
        return StageResult(counts=counts, metrics=metrics,
                           outputs={NPZ: sha256_file(ctx.stage_dir / NPZ), GRID: sha256_file(ctx.stage_dir / GRID),
                                    MANIFEST_NAME: hashlib.sha256(json_bytes(manifest)).hexdigest()})

    return run_units(ctx, job.plan, job.plan_id, desc="sample", write_one=write_one, finalize=finalize,
                     summarize=summarize)


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
    def create(cls, ctx: StageContext) -> "SampleJob":
        sc = ctx.cfg.sample
        tok_dir, prior_dir = ctx.input_path("train_tokenizer", ""), ctx.input_path("train_prior", "")
        tokenizer = load_tokenizer(tok_dir, ctx.device)
        prior = load_prior(prior_dir, ctx.device)
        if ctx.device.type == "cuda":
            prior = prior.to(torch.bfloat16)  # GPU sampling in bf16 (CPU: fp32, the reproducible reference)
        N, size = sc.num_samples, sc.chunk_size
        plan = [Unit("samples", j, lo, min(N, lo + size), f"chunks/chunk-{j:06d}.tar")
                for j, lo in enumerate(range(0, N, size))]
        opts = sampling_options(sc)
        fingerprints = {"prior_sha256": sha256_file(prior_dir / PRIOR_WEIGHTS),
                        "tokenizer_sha256": sha256_file(tok_dir / TOKENIZER_WEIGHTS)}
        plan_id = sha256_json({**fingerprints, "seed": ctx.cfg.seed, "sampling": vars(opts),
                               "batch_size": sc.batch_size, "device": ctx.device.type})
        return cls(prior, tokenizer, opts, plan, plan_id, N, prior.num_classes, tokenizer.resolution, sc.batch_size,
                   ctx.cfg.seed, sc.grid_classes, fingerprints)

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
