"""Stage `precompute_codes`: every train/val image encoded once by the trained tokenizer ->
MDS code shards under RUN_DIR/precompute_codes/<split>/ plus manifest.json.

1. Inputs: the shard manifest and the exported tokenizer (both earlier stages must be done).
2. Plan: code unit j of a split encodes input shard j of that split; batches never cross a unit
   boundary and always start at its first image, so a unit's bytes do not depend on the number
   of workers. Train images may get extra views (hflip / tencrop); val keeps the plain view.
3. Work: worker w of W (array tasks x ranks) encodes units w, w+W, ... (pipeline.runner.units), keeping
   units an earlier attempt finished.
4. Finish: the task that finds every unit present decodes a seeded sample of stored codes, checks
   them against a fresh encode, and writes manifest.json last (under torchrun: rank 0).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline.config.schema import ConfigError
from pipeline.data.codes_writer import UnitStats, write_code_unit
from pipeline.data.manifest import verify_shards
from pipeline.encode.codes_job import CodesJob
from pipeline.runner.stage import StageContext, StageResult
from pipeline.runner.units import MANIFEST_NAME, Unit, publish_unit, run_units
from pipeline.runtime.io import atomic_write_json, json_bytes, read_json

NAME = "precompute_codes"
INPUTS = {"shard": ("manifest.json",), "train_tokenizer": ("tokenizer.safetensors",)}


def check_config(cfg) -> None:
    if cfg.precompute.store_latents and cfg.tokenizer.kind == "dq":
        raise ConfigError("precompute.store_latents: true applies to RQ/VQ tokenizers (soft labels); this config's "
                          "tokenizer.kind is 'dq': set precompute.store_latents=false")


def verify_outputs(stage_dir: Path) -> None:
    """Every code unit against the manifest (a missing or altered one is named)."""
    manifest = read_json(stage_dir / MANIFEST_NAME)
    verify_shards(manifest, stage_dir, stage=NAME)


def run(ctx: StageContext) -> StageResult | None:
    cfg = ctx.cfg
    job = CodesJob.create(ctx.input_path("shard", MANIFEST_NAME), ctx.input_path("train_tokenizer", ""), cfg,
                          ctx.stage_dir, ctx.device)
    ctx.logger.info("precompute plan: %d code unit(s) (%s codes, %s precision, augment=%s)", len(job.plan),
                    job.layout.kind, job.precision, cfg.precompute.augment)

    def write_one(unit: Unit, bar) -> dict:
        stats = UnitStats(job.layout)
        return publish_unit(ctx.stage_dir, unit, job.plan_id,
                            lambda path: write_code_unit(path, job.unit_rows(unit, stats, bar), job.layout, stats))

    def finalize(sidecars: list[dict]) -> dict:
        checks = job.verify(sidecars, cfg.precompute.verify_images, cfg.seed)
        manifest = job.build_manifest(sidecars)
        atomic_write_json(ctx.stage_dir / MANIFEST_NAME, manifest)  # last: its presence means complete
        return {"manifest": manifest, "checks": checks}

    def summarize(outcome: dict, all_stats: list[dict]) -> StageResult:
        manifest, totals = outcome["manifest"], outcome["manifest"]["totals"]
        seconds = max(max(s["seconds"] for s in all_stats), 1e-9)
        images_now = sum(s["items"] for s in all_stats)
        metrics = {"images_encoded_this_run": images_now, "images_per_s": round(images_now / seconds, 1),
                   "samples_per_s": round(sum(s["rows"] for s in all_stats) / seconds, 1), **outcome["checks"]}
        splits = manifest["splits"]
        counts = {"images": totals["images"], "views": totals["samples"], "units": totals["units"],
                  "bytes": totals["bytes"], **{f"{split}_images": info["num_images"] for split, info in splits.items()},
                  **{f"{split}_views": info["num_samples"] for split, info in splits.items()}}
        if job.layout.kind == "dq":
            metrics.update({f"{split}_mean_length": info["mean_length"] for split, info in splits.items()})
        tokenizer_metrics = ctx.input_record("train_tokenizer").get("metrics", {})
        if "psnr" in tokenizer_metrics:
            # Informational: the tokenizer's eval used other images, so only a large gap means anything.
            metrics["tokenizer_eval_psnr"] = tokenizer_metrics["psnr"]
        ctx.logger.info("precompute_codes: manifest written: %s; verification %s", counts, outcome["checks"])
        return StageResult(counts=counts, metrics=metrics,
                           outputs={MANIFEST_NAME: hashlib.sha256(json_bytes(manifest)).hexdigest()})

    return run_units(ctx, job.plan, job.plan_id, desc="precompute", write_one=write_one, finalize=finalize,
                     summarize=summarize)
