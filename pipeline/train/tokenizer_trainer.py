"""Tokenizer training: generator (VQ / RQ / DQ autoencoder) + PatchGAN discriminator.

Data parallel with torch DDP (one process per GPU or CPU rank): the tokenizer is small enough
(RQ-VAE ~100M parameters) that ZeRO sharding buys nothing, and DDP keeps the two optimizers,
the adaptive GAN weight's autograd.grad and exact resume simple. The trainer owns the step and
everything needed to resume it bit-exactly on CPU: model + discriminator (EMA codebook buffers
included), both optimizers and schedulers, the step, the reader position and every RNG state.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from ..config import Config
from ..dist import DistEnv
from ..engine import CheckpointManager, PreemptionGuard, Preempted, capture_rng_state, restore_rng_state, warmup_cosine
from ..losses import TokenizerLoss
from ..models.registry import build_tokenizer
from ..stage import StageError
from .tokenizer_eval import evaluate_tokenizer


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

    def train(self, batch_size: int):
        from ..data.reader import make_image_loader

        return make_image_loader(self.manifest, "train", batch_size, rank=self.env.rank,
                                 world_size=self.env.world_size, seed=self.seed, shuffle=True, drop_last=True,
                                 num_workers=self.num_workers, random_crop=self.random_crop, hflip=self.hflip)

    def calibration(self, batch_size: int):
        """The first train images in stored order, identical on every rank (same threshold everywhere)."""
        from ..data.reader import make_image_loader

        return make_image_loader(self.manifest, "train", batch_size, rank=0, world_size=1, seed=self.seed,
                                 shuffle=False, num_workers=self.num_workers)

    def val(self, batch_size: int):
        from ..data.reader import make_image_loader

        return make_image_loader(self.manifest, "val", batch_size, rank=self.env.rank,
                                 world_size=self.env.world_size, seed=self.seed, shuffle=False, drop_last=False,
                                 num_workers=self.num_workers)


def per_rank_batch(global_batch: int, world_size: int, grad_accum: int) -> int:
    per_rank, remainder = divmod(global_batch, world_size * grad_accum)
    if remainder or per_rank == 0:
        raise StageError(f"tokenizer_train.batch_size={global_batch} must be a positive multiple of "
                         f"world_size x grad_accum = {world_size} x {grad_accum}")
    return per_rank


def average_gradients(module: torch.nn.Module) -> None:
    """Average .grad over ranks in one flat all-reduce (no-op in a single process)."""
    if not torch.distributed.is_initialized():
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def _autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class TokenizerTrainer:
    def __init__(self, cfg: Config, env: DistEnv, device: torch.device, stage_dir: Path, loaders: LoaderFactory,
                 logger: logging.Logger, writer=None):
        self.cfg, self.env, self.device, self.logger, self.writer = cfg, env, device, logger, writer
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
        # The quantizer all-reduces its own EMA statistics, so DDP need not broadcast buffers.
        self.model_ddp = DDP(self.model, broadcast_buffers=False) if env.is_distributed else self.model
        self.batch_per_rank = per_rank_batch(tc.batch_size, env.world_size, tc.grad_accum)
        self.train_loader = loaders.train(self.batch_per_rank)
        self.checkpoints = CheckpointManager(stage_dir / "checkpoints", keep=tc.keep_checkpoints, logger=logger)
        self.step = 0

    # ----- state -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"step": self.step, "model": self.model.state_dict(), "opt_g": self.opt_g.state_dict(),
                 "sched_g": self.sched_g.state_dict(), "loader": self.train_loader.state_dict(),
                 "rng": capture_rng_state()}
        if self.disc is not None:
            state.update(disc=self.disc.state_dict(), opt_d=self.opt_d.state_dict(), sched_d=self.sched_d.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.model.load_state_dict(state["model"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.sched_g.load_state_dict(state["sched_g"])
        if self.disc is not None:
            self.disc.load_state_dict(state["disc"])
            self.opt_d.load_state_dict(state["opt_d"])
            self.sched_d.load_state_dict(state["sched_d"])
        self.train_loader.load_state_dict(state["loader"])
        restore_rng_state(state["rng"])

    def save_checkpoint(self) -> None:
        state = self.state_dict()  # every rank builds it (cheap); rank 0 writes it
        if self.env.is_main:
            path = self.checkpoints.save(self.step, state)
            self.logger.info("checkpoint saved: %s", path)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    def resume(self) -> bool:
        found = self.checkpoints.load_latest(map_location=self.device)
        if found is None:
            return False
        self.load_state_dict(found[1])
        self.logger.info("resumed from checkpoint at step %d", self.step)
        return True

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
        self.opt_g.zero_grad(set_to_none=True)
        recons = []
        for i, (images, _) in enumerate(batches):
            images = images.to(self.device, non_blocking=True)
            sync = i == len(batches) - 1
            ctx = contextlib.nullcontext() if sync or not self.env.is_distributed else self.model_ddp.no_sync()
            with ctx:
                with _autocast(self.device, tc.precision):
                    recon, aux = self.model_ddp(images)
                total, g_logs = self.loss.generator_loss(images, recon.float(), aux, self.step,
                                                         self.model.get_last_layer())
                (total / tc.grad_accum).backward()
            recons.append((images, recon.detach().float()))
            for k, v in g_logs.items():
                logs[k] = logs.get(k, 0.0) + float(v) / tc.grad_accum
        if tc.grad_clip > 0:
            logs["grad_norm_g"] = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip))
        self.opt_g.step()
        self.sched_g.step()
        if gan_active:
            self.opt_d.zero_grad(set_to_none=True)
            for images, recon in recons:
                d_loss, d_logs = self.loss.discriminator_loss(images, recon, self.step)
                (d_loss / tc.grad_accum).backward()
                for k, v in d_logs.items():
                    logs[k] = logs.get(k, 0.0) + float(v) / tc.grad_accum
            # The discriminator runs two forwards (real, fake) per backward, which DDP does not
            # allow, so its (small) gradients are averaged across ranks explicitly.
            average_gradients(self.disc)
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.disc.parameters(), tc.grad_clip)
            self.opt_d.step()
        if self.sched_d is not None:
            self.sched_d.step()
        self.step += 1
        logs["lr"] = self.sched_g.get_last_lr()[0]
        return logs

    # ----- the loop ----------------------------------------------------------------------
    def fit(self, guard: PreemptionGuard) -> dict:
        """Train to `steps`, checkpointing periodically and when `guard` reports a signal."""
        tc = self.train_cfg
        self.model.train()
        if not self.resume() and self.cfg.tokenizer.kind == "dq" and self.cfg.tokenizer.router == "entropy":
            from ..models.dq import calibrate_entropy_threshold

            threshold = calibrate_entropy_threshold(self.model, self.loaders.calibration(64),
                                                    max_batches=ENTROPY_CALIBRATION_BATCHES)
            self.logger.info("DQ entropy router: threshold %.4f (fine ratio target %.2f)", threshold,
                             self.cfg.tokenizer.target_ratio)
        self._batches = self._iterate_batches()
        images_per_step = tc.batch_size
        bar = tqdm(total=tc.steps, initial=self.step, desc="train_tokenizer", unit="step",
                   disable=not self.env.is_main, dynamic_ncols=True)
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
        return self.evaluate()

    def evaluate(self) -> dict:
        tc = self.train_cfg
        loader = self.loaders.val(max(1, min(64, self.batch_per_rank)))
        metrics, preview = evaluate_tokenizer(self.model, loader, codebook_size=self.cfg.tokenizer.codebook_size,
                                              max_images=tc.eval_images, device=self.device)
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
