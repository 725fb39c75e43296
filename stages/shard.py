"""Stage `shard`: images (ImageFolder tree or the embedded synthetic set) -> webdataset/MDS shards
plus RUN_DIR/shard/manifest.json and rejected.jsonl.

Workers = array tasks x ranks; worker w writes shards w, w+W, w+2W, ... of a fixed plan, so the
output bytes do not depend on how the stage was launched. The manifest is written by the task
that finds every shard present when it ends (under torchrun: rank 0 after a barrier).
"""
from __future__ import annotations

from pipeline.data.shard_job import ShardJob
from pipeline.data.sources import make_source
from pipeline.dist import all_gather_objects, barrier, broadcast_object
from pipeline.stage import StageContext, StageResult

NAME = "shard"
SECTIONS = ("data",)
IGNORED_KEYS = ("data.random_crop", "data.hflip")  # reader-side augmentation: shards are the same


def input_fingerprints(ctx: StageContext) -> dict[str, str]:
    return make_source(ctx.cfg.data, ctx.cfg.seed).fingerprint()


def run(ctx: StageContext) -> StageResult | None:
    data = ctx.cfg.data
    job = ShardJob.create(data, ctx.cfg.seed, ctx.stage_dir)
    num_workers = ctx.num_tasks * ctx.env.world_size
    worker = ctx.task_id * ctx.env.world_size + ctx.env.rank
    ctx.logger.info("shard plan: %d shard(s) of %s for %s; worker %d of %d writes %d", len(job.plan), data.format,
                    job.source.split_sizes, worker, num_workers, len(job.plan[worker::num_workers]))
    stats = job.write_worker_shards(worker, num_workers, ctx.logger, progress_position=ctx.env.local_rank)
    all_stats = all_gather_objects(stats)
    barrier()

    # Rank 0 decides for the task so all ranks return (or raise) alike.
    sidecars = broadcast_object(job.collect_sidecars() if ctx.env.is_main else None)
    if sidecars is None:
        ctx.logger.info("shard: other tasks' shards are still missing; the last task to finish writes the manifest")
        return None
    summary = job.finalize(sidecars, data.max_reject_fraction, write=ctx.env.is_main)
    metrics = {"images_written_this_run": sum(s["images"] for s in all_stats),
               "images_per_s": round(sum(s["images_per_s"] for s in all_stats), 1)}
    ctx.logger.info("shard: manifest written: %s", summary["counts"])
    return StageResult(counts=summary["counts"], metrics=metrics, outputs=summary["outputs"])
