"""Stage `sample`: draw `sample.num_samples` images from the trained (or imported) prior.

1. Inputs: RUN_DIR/train_prior (prior.safetensors) and RUN_DIR/train_tokenizer (decoding).
2. Plan (pipeline.generation.sample_job): chunk j holds samples [j * chunk_size, (j + 1) * chunk_size).
   Sample i has class i mod num_classes and draws all its randomness from a generator seeded by
   (seed, i), so a chunk's bytes do not depend on the launch.
3. Work: worker w of W (array tasks x ranks) writes chunks w, w+W, ... as PNG tars
   (pipeline.runner.units); finished chunks are kept on a rerun, a partial one is redone.
4. Finish: the task that finds every chunk packs samples.npz (the ADM evaluator's format),
   draws grid.png (8 samples for each of the first classes) and writes manifest.json last.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline.generation.sample_files import pack_npz, write_sample_chunk
from pipeline.generation.sample_job import SampleJob
from pipeline.runner.stage import StageContext, StageError, StageResult
from pipeline.runner.units import MANIFEST_NAME, Unit, items_and_rate, publish_unit, run_units
from pipeline.runtime.io import atomic_write_json, json_bytes, read_json, sha256_file

NAME = "sample"
INPUTS = {"train_tokenizer": ("tokenizer.safetensors",), "train_prior": ("prior.safetensors",)}
NPZ, GRID = "samples.npz", "grid.png"


def verify_outputs(stage_dir: Path) -> None:
    """Every chunk against the manifest (a missing or altered one is named)."""
    manifest = read_json(stage_dir / MANIFEST_NAME)
    for chunk in manifest["chunks"]:
        path = stage_dir / chunk["name"]
        if not path.is_file() or sha256_file(path) != chunk["sha256"]:
            raise StageError(f"{path}: missing or different from {stage_dir / MANIFEST_NAME}")


def run(ctx: StageContext) -> StageResult | None:
    job = SampleJob.create(ctx.input_path("train_tokenizer", ""), ctx.input_path("train_prior", ""), ctx.cfg,
                           ctx.device)
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
