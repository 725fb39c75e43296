"""Stage `precompute_codes`: every train/val image encoded once by the trained tokenizer ->
MDS code shards under RUN_DIR/precompute_codes/<split>/ plus manifest.json.

Workers = array tasks x ranks; worker w encodes code units w, w+W, ... (one unit per input
shard), keeping units an earlier attempt finished. The task that finds every unit present
verifies a seeded sample of codes against a fresh encode and writes the manifest (under
torchrun: rank 0 after a barrier, the result broadcast so every rank returns or raises alike).
"""
from __future__ import annotations

import hashlib

from pipeline.data.codes_job import MANIFEST_NAME, CodesJob, input_paths
from pipeline.data.manifest import manifest_bytes
from pipeline.dist import all_gather_objects, barrier, broadcast_object
from pipeline.io import atomic_write_json, sha256_file
from pipeline.rundir import RunDir
from pipeline.stage import StageContext, StageError, StageResult

NAME = "precompute_codes"
SECTIONS = ("data", "tokenizer", "tokenizer_train", "precompute")


def input_fingerprints(ctx: StageContext) -> dict[str, str]:
    manifest_path, tok_dir = input_paths(ctx.run_dir)
    run = RunDir(ctx.run_dir)
    # The hashes the earlier stages recorded for exactly these files (hashing a large tokenizer again is slow).
    shard_out = run.read_done("shard").get("outputs", {})
    tok_out = run.read_done("train_tokenizer").get("outputs", {})
    return {"shard/manifest.json": shard_out.get("manifest.json") or sha256_file(manifest_path),
            "train_tokenizer/tokenizer.safetensors": (tok_out.get("tokenizer.safetensors")
                                                      or sha256_file(tok_dir / "tokenizer.safetensors"))}


def run(ctx: StageContext) -> StageResult | None:
    cfg = ctx.cfg
    job = CodesJob.create(ctx.run_dir, cfg, ctx.stage_dir, ctx.device)
    num_workers = ctx.num_tasks * ctx.env.world_size
    worker = ctx.task_id * ctx.env.world_size + ctx.env.rank
    ctx.logger.info("precompute plan: %d code unit(s) (%s codes, %s precision, augment=%s); worker %d of %d "
                    "encodes %d", len(job.plan), job.layout.kind, job.precision, cfg.precompute.augment, worker,
                    num_workers, len(job.plan[worker::num_workers]))
    stats = job.write_worker_units(worker, num_workers, ctx.logger, progress_position=ctx.env.local_rank)
    all_stats = all_gather_objects(stats)
    barrier()

    outcome = None
    if ctx.env.is_main:
        sidecars = job.collect_sidecars()
        if sidecars is None:
            outcome = {"pending": True}
        else:
            try:
                checks = job.verify(sidecars, cfg.precompute.verify_images, cfg.seed)
                manifest = job.build_manifest(sidecars)
                atomic_write_json(ctx.stage_dir / MANIFEST_NAME, manifest)  # last: its presence means complete
                outcome = {"manifest": manifest, "checks": checks}
            except StageError as err:
                outcome = {"error": str(err)}
    outcome = broadcast_object(outcome)
    if "error" in outcome:
        raise StageError(outcome["error"])
    if outcome.get("pending"):
        ctx.logger.info("precompute_codes: other tasks' units are still missing; the last task writes the manifest")
        return None

    manifest = outcome["manifest"]
    seconds = max(max(s["seconds"] for s in all_stats), 1e-9)
    images_now = sum(s["images"] for s in all_stats)
    metrics = {"images_encoded_this_run": images_now, "images_per_s": round(images_now / seconds, 1),
               "samples_per_s": round(sum(s["samples"] for s in all_stats) / seconds, 1), **outcome["checks"]}
    counts = {"images": manifest["totals"]["images"], "views": manifest["totals"]["samples"],
              "units": manifest["totals"]["units"], "bytes": manifest["totals"]["bytes"],
              **{f"{split}_images": info["num_images"] for split, info in manifest["splits"].items()},
              **{f"{split}_views": info["num_samples"] for split, info in manifest["splits"].items()}}
    if job.layout.kind == "dq":
        metrics.update({f"{split}_mean_length": info["mean_length"] for split, info in manifest["splits"].items()})
    ctx.logger.info("precompute_codes: manifest written: %s; verification %s", counts, outcome["checks"])
    return StageResult(counts=counts, metrics=metrics,
                       outputs={MANIFEST_NAME: hashlib.sha256(manifest_bytes(manifest)).hexdigest()})
