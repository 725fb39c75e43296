"""Stage 4: train the prior (RQ-Transformer / DQ-Transformer) on the precomputed codes and export it.

Reads RUN_DIR/train_tokenizer (the tokenizer: code shapes, codebook vectors, soft targets, sample
decoding) and RUN_DIR/precompute_codes (code shards); writes RUN_DIR/train_prior/{prior.safetensors,
prior.json, deepspeed_config.json, samples.png, checkpoints/}. Resumes from the newest valid
checkpoint; SIGUSR1/SIGUSR2/SIGTERM checkpoint and exit with code 3.
"""
from __future__ import annotations

import torch

from pipeline.config.schema import ConfigError
from pipeline.data.loaders import CodeLoaders
from pipeline.models.prior_config import CodeSpec
from pipeline.models.registry import build_prior, build_tokenizer
from pipeline.runner.artifacts import PRIOR_CONFIG, PRIOR_WEIGHTS, load_tokenizer, save_prior
from pipeline.runner.rundir import RunDir
from pipeline.runner.stage import StageResult
from pipeline.runtime.dist import barrier
from pipeline.runtime.io import sha256_file
from pipeline.runtime.logs import tensorboard_writer
from pipeline.train.prior_trainer import PriorTrainer
from pipeline.train.signals import PreemptionGuard

NAME = "train_prior"
INPUTS = {"train_tokenizer": ("tokenizer.safetensors",), "precompute_codes": ("manifest.json",)}
# A lost or corrupt export is rebuilt from the final checkpoint (pipeline/runner/repair.py), not retrained.
EXPORTS_FROM_CHECKPOINT = True


def check_config(cfg) -> None:
    """The prior must fit the tokenizer's codes and the data's classes (built on the meta device)."""
    p = cfg.prior
    if p.num_classes and p.num_classes != cfg.data.num_classes:
        raise ConfigError(f"prior.num_classes: {p.num_classes} differs from data.num_classes "
                          f"({cfg.data.num_classes}); set it to {cfg.data.num_classes}, "
                          "or 0 for an unconditional prior")
    tc = cfg.prior_train
    if tc.targets == "soft" and not cfg.precompute.store_latents:
        raise ConfigError("prior_train.targets: soft targets need the latents: set precompute.store_latents=true "
                          "(or prior_train.targets=codes)")
    with torch.device("meta"):
        spec = CodeSpec.from_tokenizer(build_tokenizer(cfg.tokenizer, cfg.data.resolution))
        build_prior(p, spec)


def run(ctx) -> StageResult:
    cfg = ctx.cfg
    run = RunDir(ctx.run_dir)
    codes = CodeLoaders(run.stage_dir("precompute_codes"), seed=cfg.seed)
    writer = tensorboard_writer(ctx.run_dir, NAME)
    try:
        # The guard is up before the (slow) model build, so an early SLURM signal is not fatal.
        with PreemptionGuard(at_once=True, doing="the model build and resume") as guard:
            tokenizer = load_tokenizer(run.stage_dir("train_tokenizer"), ctx.device)
            trainer = PriorTrainer(cfg, ctx.env, ctx.device, ctx.stage_dir, tokenizer, codes, ctx.logger, writer)
            metrics = trainer.fit(guard)
            state = trainer.export_state()  # collective under ZeRO-3
            trainer.engine.close()
    finally:
        if writer is not None:
            writer.close()
    if ctx.env.is_main:
        save_prior(state, cfg.prior, trainer.spec, ctx.stage_dir)
    barrier()
    tc = cfg.prior_train
    return StageResult(
        counts={"steps": trainer.step, "samples_seen": trainer.step * tc.batch_size,
                "parameters": trainer.num_parameters},
        metrics=metrics,
        outputs={name: sha256_file(ctx.stage_dir / name) for name in (PRIOR_WEIGHTS, PRIOR_CONFIG)},
    )
