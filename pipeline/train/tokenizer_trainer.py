"""Tokenizer training: generator (VQ / RQ / DQ autoencoder) + PatchGAN discriminator.

Data parallel through a training engine (pipeline/train/engine.py): torch DDP by default
(`tokenizer_train.engine=ddp`; the tokenizer is small, ZeRO sharding buys little), or DeepSpeed
ZeRO 0-2 (`engine=deepspeed`; ZeRO-3 would partition the decoder's last-layer weight that the
adaptive GAN weight differentiates against, so the config rejects it). The generator and the
discriminator each get an engine of that kind. The trainer owns the step and everything needed to
resume it bit-exactly on CPU: the engines' state (model + discriminator with the EMA codebook
buffers, both optimizers and schedulers), the step, the reader position and every rank's RNGs.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config.root import Config
from ..runtime.dist import DistEnv
from ..runtime.io import atomic_write_json
from ..losses import TokenizerLoss
from ..models.registry import build_tokenizer
from ..runtime.progress import progress
from ..runner.stage import StageError
from .checkpoint import CheckpointManager, load_pt, resume_newest
from .engine import deepspeed_config, engine_meta, make_engine
from .rng import capture_rng_state, restore_rng_state
from .schedule import warmup_cosine
from .signals import PreemptionGuard, Preempted
from .classifier import classifier_for_run
from .tokenizer_eval import RECONSTRUCTIONS_PNG, evaluate_tokenizer, save_image_grid


ENTROPY_CALIBRATION_BATCHES = 16  # x 64 images: enough for a stable percentile of patch entropies


@dataclass
class LoaderFactory:
    """Builds readers over the shard manifest (train: infinite epochs; val: one pass)."""
    manifest: Path
    env: DistEnv
    seed: int
    num_workers: int
    random_crop: bool
    hflip: bool
    reader: str = "indexed"   # data.reader; a manifest of shard URLs is always streamed

    def train(self, batch_size: int):
        from ..data.reader import make_image_loader

        return make_image_loader(self.manifest, "train", batch_size, rank=self.env.rank,
                                 world_size=self.env.world_size, seed=self.seed, shuffle=True, drop_last=True,
                                 num_workers=self.num_workers, random_crop=self.random_crop, hflip=self.hflip,
                                 reader=self.reader)

    def calibration(self, batch_size: int):
        """The first train images in stored order, identical on every rank (same threshold everywhere)."""
        from ..data.reader import make_image_loader

        return make_image_loader(self.manifest, "train", batch_size, rank=0, world_size=1, seed=self.seed,
                                 shuffle=False, num_workers=self.num_workers, reader=self.reader)

    def val(self, batch_size: int):
        from ..data.reader import make_image_loader

        return make_image_loader(self.manifest, "val", batch_size, rank=self.env.rank,
                                 world_size=self.env.world_size, seed=self.seed, shuffle=False, drop_last=False,
                                 num_workers=self.num_workers, reader=self.reader)


def per_rank_batch(global_batch: int, world_size: int, grad_accum: int) -> int:
    per_rank, remainder = divmod(global_batch, world_size * grad_accum)
    if remainder or per_rank == 0:
        raise StageError(f"tokenizer_train.batch_size={global_batch} must be a positive multiple of "
                         f"world_size x grad_accum = {world_size} x {grad_accum}")
    return per_rank


class TokenizerTrainer:
    def __init__(self, cfg: Config, env: DistEnv, device: torch.device, stage_dir: Path, loaders: LoaderFactory,
                 logger: logging.Logger, writer=None):
        self.cfg, self.env, self.device, self.logger, self.writer = cfg, env, device, logger, writer
        self.stage_dir = Path(stage_dir)
        self.train_cfg = cfg.tokenizer_train
        self.loaders = loaders
        torch.manual_seed(cfg.seed)  # identical initialisation on every rank
        self.model = build_tokenizer(cfg.tokenizer, cfg.data.resolution).to(device)
        self.loss = TokenizerLoss(cfg.tokenizer).to(device)
        tc = self.train_cfg
        self.opt_g = torch.optim.Adam(self.model.parameters(), lr=tc.lr, betas=tuple(tc.betas),
                                      weight_decay=tc.weight_decay)
        self.sched_g = warmup_cosine(self.opt_g, tc.steps, tc.warmup_steps, tc.min_lr_ratio)
        self.disc = self.loss.discriminator
        self.opt_d = self.sched_d = None
        if self.disc is not None:
            self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=cfg.tokenizer.disc_lr or tc.lr,
                                          betas=tuple(tc.betas))
            self.sched_d = warmup_cosine(self.opt_d, tc.steps, tc.warmup_steps, tc.min_lr_ratio)
        self.batch_per_rank = per_rank_batch(tc.batch_size, env.world_size, tc.grad_accum)
        ds_config = None
        if tc.engine == "deepspeed":
            # fp32 weights even on GPU (bf16 autocast instead): the EMA codebooks and the adaptive
            # GAN weight need them. The generated config is saved next to the checkpoints.
            ds_config = deepspeed_config(tc, env.world_size, device, bf16_weights=False)
            if env.is_main:
                atomic_write_json(stage_dir / "deepspeed_config.json", ds_config)
        # The quantizer all-reduces its own EMA statistics, so DDP need not broadcast buffers.
        self.gen = make_engine("generator", self.model, self.opt_g, self.sched_g, tc, env, device,
                               broadcast_buffers=False, ds_config=ds_config)
        # The discriminator runs two forwards (real, fake) per backward, which DDP does not allow:
        # under DDP its gradients are averaged by one explicit all-reduce.
        self.disc_engine = None if self.disc is None else make_engine(
            "discriminator", self.disc, self.opt_d, self.sched_d, tc, env, device, grad_sync="allreduce",
            ds_config=ds_config)
        self.train_loader = loaders.train(self.batch_per_rank)
        self.checkpoints = CheckpointManager(stage_dir / "checkpoints", keep=tc.keep_checkpoints, logger=logger)
        self.meta = engine_meta(tc, env)
        self.step = 0

    def export_model(self) -> torch.nn.Module:
        """The trained tokenizer as a plain module. ZeRO turns the parameters into views of one flat
        buffer (which safetensors refuses to save), so under DeepSpeed it is a fresh copy."""
        if self.gen.kind == "ddp":
            return self.model
        model = build_tokenizer(self.cfg.tokenizer, self.cfg.data.resolution)
        model.load_state_dict({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return model.eval()

    # ----- state -------------------------------------------------------------------------
    def engines(self):
        return [e for e in (self.gen, self.disc_engine) if e is not None]

    def save_checkpoint(self) -> None:
        """Collective: every rank writes its part into one step folder, published atomically."""
        with self.checkpoints.saving(self.step, self.meta) as folder:
            for engine in self.engines():
                engine.save(folder)
            client = {"step": self.step, "loader": self.train_loader.state_dict(), "rng": capture_rng_state()}
            torch.save(client, folder / f"client_rank_{self.env.rank:05d}.pt")
        self.logger.info("checkpoint saved: %s", self.checkpoints.path_for(self.step))

    def _load(self, folder: Path) -> None:
        for engine in self.engines():
            engine.load(folder)
        client = load_pt(folder / f"client_rank_{self.env.rank:05d}.pt", map_location="cpu")
        self.step = client["step"]
        self.train_loader.load_state_dict(client["loader"])
        restore_rng_state(client["rng"])

    def resume(self) -> bool:
        resumed = resume_newest(self.checkpoints, self.meta, self._load)
        if resumed:
            self.logger.info("resumed from checkpoint at step %d", self.step)
        if self.writer is not None:
            self.writer.resume_from(self.step)  # a killed run's events after this step are purged
        return resumed

    # ----- one optimizer step ----------------------------------------------------------
    def _next_batch(self):
        return next(self._batches)[:2]  # (images, labels); readers may append sample keys

    def _iterate_batches(self):
        while True:  # epochs follow each other; the loader tracks epoch and position itself
            yield from self.train_loader

    def train_step(self) -> dict:
        tc = self.train_cfg
        gan_active = self.loss.gan_active(self.step)
        logs: dict[str, float] = {}
        batches = [self._next_batch() for _ in range(tc.grad_accum)]
        self.gen.zero_grad()
        recons = []
        # The GAN term runs the discriminator; its weights get no gradient from the generator's step.
        frozen = self.disc_engine.frozen() if self.disc_engine is not None else contextlib.nullcontext()
        with frozen:
            for i, (images, _) in enumerate(batches):
                images = images.to(self.device, non_blocking=True)
                with self.gen.micro_batch(i):
                    with self.gen.autocast():
                        recon, aux = self.gen(images)
                    total, g_logs = self.loss.generator_loss(images, recon.float(), aux, self.step,
                                                             self.model.get_last_layer())
                    self.gen.backward(total)
                recons.append((images, recon.detach().float()))
                for k, v in g_logs.items():
                    logs[k] = logs.get(k, 0.0) + float(v) / tc.grad_accum
        logs.update({f"{k}_g": v for k, v in self.gen.step().items()})
        if gan_active:
            self.disc_engine.zero_grad()
            for i, (images, recon) in enumerate(recons):
                with self.disc_engine.micro_batch(i):
                    d_loss, d_logs = self.loss.discriminator_loss(images, recon, self.step)
                    self.disc_engine.backward(d_loss)
                for k, v in d_logs.items():
                    logs[k] = logs.get(k, 0.0) + float(v) / tc.grad_accum
            self.disc_engine.step()
        elif self.disc_engine is not None:
            self.disc_engine.skip_step()
        self.step += 1
        logs["lr"] = self.gen.lr
        return logs

    # ----- the loop ----------------------------------------------------------------------
    def fit(self, guard: PreemptionGuard) -> dict:
        """Train to `steps`, checkpointing periodically and when `guard` reports a signal."""
        tc = self.train_cfg
        for engine in self.engines():
            engine.train()
        if not self.resume() and self.cfg.tokenizer.kind == "dq" and self.cfg.tokenizer.router == "entropy":
            from ..models.dq import calibrate_entropy_threshold

            threshold = calibrate_entropy_threshold(self.model, self.loaders.calibration(64),
                                                    max_batches=ENTROPY_CALIBRATION_BATCHES)
            self.logger.info("DQ entropy router: threshold %.4f (fine ratio target %.2f)", threshold,
                             self.cfg.tokenizer.target_ratio)
        self._batches = self._iterate_batches()
        images_per_step = tc.batch_size
        bar = progress(tc.steps, initial=self.step, desc="train_tokenizer", unit="step", enabled=self.env.is_main)
        guard.defer()  # in the loop a signal waits for the step boundary: checkpoint, then stop
        while self.step < tc.steps:
            start = time.perf_counter()
            logs = self.train_step()
            rate = images_per_step / max(time.perf_counter() - start, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{logs.get('total_loss', float('nan')):.4f}", img_s=f"{rate:.0f}")
            if self.writer is not None and (self.step % tc.log_every == 0 or self.step == tc.steps):
                for key, value in logs.items():
                    self.writer.add_scalar(f"train/{key}", value, self.step)
                self.writer.add_scalar("train/images_per_s", rate, self.step)
            if tc.eval_every and self.step % tc.eval_every == 0 and self.step < tc.steps:
                self.evaluate()
            stop = guard.should_stop()
            if stop or self.step % tc.checkpoint_every == 0 or self.step == tc.steps:
                self.save_checkpoint()
            if stop:
                bar.close()
                raise Preempted(self.step, guard.received)
        bar.close()
        guard.act_at_once(f"the evaluation after the final checkpoint (step {self.step})")
        metrics = self.evaluate()
        if tc.rfid_images:
            metrics.update(self.reconstruction_fid())
        return metrics

    def reconstruction_fid(self) -> dict:
        """rFID on the main rank (the other ranks wait at the stage's next barrier); {} with a warning
        when no Inception weights can be had: a missing eval network must not fail a finished training."""
        from ..evaluation.inception import UNCALIBRATED, InceptionWeightsMissing, load_inception
        from ..evaluation.reference_stats import reconstruction_fid

        if not self.env.is_main:
            return {}
        sc = self.cfg.score
        try:
            extractor, source = load_inception(sc.inception_weights, download=sc.download_weights,
                                               allow_uncalibrated=sc.allow_uncalibrated, device=self.device)
        except InceptionWeightsMissing as err:
            self.logger.warning("rFID skipped: %s", err)
            return {}
        if source == UNCALIBRATED:
            self.logger.warning("rFID with an uncalibrated Inception: reported as rfid_uncalibrated")
        metrics = reconstruction_fid(self.model, self.stage_dir.parent, self.loaders.manifest, extractor, source,
                                     max_images=self.train_cfg.rfid_images, batch=sc.batch_size, device=self.device,
                                     logger=self.logger)
        self.logger.info("rFID at step %d: %s", self.step, metrics)
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"eval/{key}", value, self.step)
            self.writer.flush()
        return metrics

    def evaluate(self) -> dict:
        tc = self.train_cfg
        loader = self.loaders.val(max(1, min(64, self.batch_per_rank)))
        classifier = None
        if tc.eval_classifier:  # collective: rank 0 trains it once, every rank loads the cached file
            classifier, _ = classifier_for_run(self.stage_dir.parent, self.loaders.manifest, seed=self.cfg.seed,
                                               logger=self.logger)
        metrics, preview = evaluate_tokenizer(self.model, loader, codebook_size=self.cfg.tokenizer.codebook_size,
                                              max_images=tc.eval_images, device=self.device, classifier=classifier)
        if preview is not None and self.env.is_main:
            save_image_grid(preview, self.stage_dir / RECONSTRUCTIONS_PNG)
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"eval/{key}", value, self.step)
            if preview is not None:
                from torchvision.utils import make_grid

                grid = make_grid(torch.cat(preview), nrow=preview[0].shape[0], normalize=True, value_range=(-1, 1))
                self.writer.add_image("eval/originals_top_reconstructions_bottom", grid, self.step)
            self.writer.flush()
        self.logger.info("eval at step %d: %s", self.step,
                         ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
        return metrics
