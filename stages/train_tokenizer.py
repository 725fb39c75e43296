"""Stage 2: train the tokenizer (VQ / RQ-VAE / DQ-VAE) on the shards and export it.

Reads RUN_DIR/shard/manifest.json (every shard of every split verified by the runner before the
first step); writes RUN_DIR/train_tokenizer/{tokenizer.safetensors, tokenizer.json,
checkpoints/}. Resumes from the newest valid checkpoint.
"""
from __future__ import annotations

import torch

from pipeline.data.loaders import ImageLoaders
from pipeline.models.registry import build_tokenizer
from pipeline.runner.artifacts import TOKENIZER_CONFIG, TOKENIZER_WEIGHTS, save_tokenizer
from pipeline.runner.stage import StageResult
from pipeline.runtime.dist import barrier
from pipeline.runtime.io import sha256_file
from pipeline.runtime.logs import tensorboard_writer
from pipeline.train.signals import PreemptionGuard
from pipeline.train.tokenizer_trainer import TokenizerTrainer

NAME = "train_tokenizer"
INPUTS = {"shard": ("manifest.json",)}
# A lost or corrupt export is rebuilt from the final checkpoint (pipeline/runner/repair.py), not retrained.
EXPORTS_FROM_CHECKPOINT = True


def check_config(cfg) -> None:
    """The tokenizer must build for this resolution (on the meta device: no memory, no time)."""
    with torch.device("meta"):
        build_tokenizer(cfg.tokenizer, cfg.data.resolution)


def run(ctx) -> StageResult:
    cfg = ctx.cfg
    loaders = ImageLoaders(manifest=ctx.input_path("shard", "manifest.json"), env=ctx.env, seed=cfg.seed,
                           num_workers=cfg.data.num_workers,
                           random_crop=cfg.data.random_crop, hflip=cfg.data.hflip, reader=cfg.data.reader)
    writer = tensorboard_writer(ctx.run_dir, NAME)
    # The guard is up before the (slow) model build, so an early SLURM signal is not fatal.
    try:
        with PreemptionGuard(at_once=True, doing="the model build and resume") as guard:
            trainer = TokenizerTrainer(cfg, ctx.env, ctx.device, ctx.stage_dir, loaders, ctx.logger, writer)
            metrics = trainer.fit(guard)
            for engine in (trainer.gen, trainer.disc_engine):
                if engine is not None:
                    engine.close()
    finally:
        if writer is not None:
            writer.close()
    if ctx.env.is_main:
        save_tokenizer(trainer.export_model(), cfg.tokenizer, cfg.data.resolution, ctx.stage_dir)
    barrier()
    n_params = sum(p.numel() for p in trainer.model.parameters())
    return StageResult(
        counts={"steps": trainer.step, "images_seen": trainer.step * cfg.tokenizer_train.batch_size,
                "parameters": n_params},
        metrics=metrics,
        outputs={name: sha256_file(ctx.stage_dir / name) for name in (TOKENIZER_WEIGHTS, TOKENIZER_CONFIG)},
    )
