"""Tokenizer training: generator (VQ / RQ / DQ autoencoder) + PatchGAN discriminator.

Data parallel through a training engine (pipeline/train/engine.py): torch DDP by default
(`tokenizer_train.engine=ddp`; the tokenizer is small, ZeRO sharding buys little), or DeepSpeed
ZeRO 0-2 (`engine=deepspeed`; ZeRO-3 would partition the decoder's last-layer weight that the
adaptive GAN weight differentiates against, so the config rejects it). The generator and the
discriminator each get an engine of that kind; their state (model + discriminator with the EMA
codebook buffers, both optimizers and schedulers) is what a checkpoint holds besides the client
state the base trainer (pipeline/train/trainer.py) keeps. This module supplies the step, the eval
(PSNR, codebook usage, probe classifier, rFID) and the export.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from ..config.root import Config
from ..data.loaders import ImageLoaders
from ..losses import TokenizerLoss
from ..models.registry import build_tokenizer
from ..runtime.dist import DistEnv
from ..runtime.io import atomic_write_json
from .classifier import classifier_for_run
from .engine import deepspeed_config, make_engine
from .schedule import warmup_cosine
from .tokenizer_eval import RECONSTRUCTIONS_PNG, evaluate_tokenizer, save_image_grid
from .trainer import Trainer

ENTROPY_CALIBRATION_BATCHES = 16  # x 64 images: enough for a stable percentile of patch entropies


class TokenizerTrainer(Trainer):
    stage, section = "train_tokenizer", "tokenizer_train"

    def __init__(self, cfg: Config, env: DistEnv, device: torch.device, stage_dir: Path, loaders: ImageLoaders,
                 logger: logging.Logger, writer=None):
        tc = cfg.tokenizer_train
        super().__init__(tc, env, device, stage_dir, seed=cfg.seed, logger=logger, writer=writer)
        self.cfg, self.loaders = cfg, loaders
        self.model = build_tokenizer(cfg.tokenizer, cfg.data.resolution).to(device)
        self.loss = TokenizerLoss(cfg.tokenizer).to(device)
        self.opt_g = torch.optim.Adam(self.model.parameters(), lr=tc.lr, betas=tuple(tc.betas),
                                      weight_decay=tc.weight_decay)
        self.sched_g = warmup_cosine(self.opt_g, tc.steps, tc.warmup_steps, tc.min_lr_ratio)
        self.disc = self.loss.discriminator
        self.opt_d = self.sched_d = None
        if self.disc is not None:
            self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=cfg.tokenizer.disc_lr or tc.lr,
                                          betas=tuple(tc.betas))
            self.sched_d = warmup_cosine(self.opt_d, tc.steps, tc.warmup_steps, tc.min_lr_ratio)
        ds_config = None
        if tc.engine == "deepspeed":
            # fp32 weights even on GPU (bf16 autocast instead): the EMA codebooks and the adaptive
            # GAN weight need them. The generated config is saved next to the checkpoints.
            ds_config = deepspeed_config(tc, env.world_size, device, bf16_weights=False)
            if env.is_main:
                atomic_write_json(self.stage_dir / "deepspeed_config.json", ds_config)
        # The quantizer all-reduces its own EMA statistics, so DDP need not broadcast buffers.
        self.gen = make_engine("generator", self.model, self.opt_g, self.sched_g, tc, env, device,
                               broadcast_buffers=False, ds_config=ds_config)
        # The discriminator runs two forwards (real, fake) per backward, which DDP does not allow:
        # under DDP its gradients are averaged by one explicit all-reduce.
        self.disc_engine = None if self.disc is None else make_engine(
            "discriminator", self.disc, self.opt_d, self.sched_d, tc, env, device, grad_sync="allreduce",
            ds_config=ds_config)
        self.train_loader = loaders.train(self.batch_per_rank)

    def engines(self):
        return [e for e in (self.gen, self.disc_engine) if e is not None]

    def export_model(self) -> torch.nn.Module:
        """The trained tokenizer as a plain module. ZeRO turns the parameters into views of one flat
        buffer (which safetensors refuses to save), so under DeepSpeed it is a fresh copy."""
        if self.gen.kind == "ddp":
            return self.model
        model = build_tokenizer(self.cfg.tokenizer, self.cfg.data.resolution)
        model.load_state_dict({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return model.eval()

    def on_start(self, resumed: bool) -> None:
        """A DQ entropy router's threshold comes from the data, once: a resumed run has it in its weights."""
        if resumed or self.cfg.tokenizer.kind != "dq" or self.cfg.tokenizer.router != "entropy":
            return
        from ..models.dq import calibrate_entropy_threshold

        threshold = calibrate_entropy_threshold(self.model, self.loaders.calibration(64),
                                                max_batches=ENTROPY_CALIBRATION_BATCHES)
        self.logger.info("DQ entropy router: threshold %.4f (fine ratio target %.2f)", threshold,
                         self.cfg.tokenizer.target_ratio)

    # ----- one optimizer step ----------------------------------------------------------
    def train_step(self) -> dict:
        tc = self.train_cfg
        gan_active = self.loss.gan_active(self.step)
        logs: dict[str, float] = {}
        batches = [self.next_batch()[:2] for _ in range(tc.grad_accum)]  # (images, labels); readers may add keys
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

    def rates(self, seconds: float) -> dict:
        return {"images_per_s": self.train_cfg.batch_size / seconds}

    def postfix(self, logs: dict) -> dict:
        return {"loss": f"{logs.get('total_loss', float('nan')):.4f}", "img_s": f"{logs['images_per_s']:.0f}"}

    # ----- evaluation --------------------------------------------------------------------
    def finish(self) -> dict:
        metrics = self.evaluate()
        if self.train_cfg.rfid_images:
            metrics.update(self.reconstruction_fid())
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
        if self.writer is not None and preview is not None:
            from torchvision.utils import make_grid

            grid = make_grid(torch.cat(preview), nrow=preview[0].shape[0], normalize=True, value_range=(-1, 1))
            self.writer.add_image("eval/originals_top_reconstructions_bottom", grid, self.step)
        self.report_eval(metrics)
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
        self.write_scalars("eval", metrics, flush=True)
        return metrics
