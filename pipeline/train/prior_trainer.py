"""Prior training (RQ-Transformer / DQ-Transformer) on the precomputed code shards.

One engine (pipeline/train/engine.py; DeepSpeed ZeRO 0-3 by default, or DDP) owns the model, the
AdamW optimizer (the authors' grouping: weight decay on Linear weights only) and the warm-up +
cosine schedule. The base trainer (pipeline/train/trainer.py) runs the loop and keeps the client
state; this module adds what only the prior has: an optional weight EMA, elastic resume (the
newest checkpoint was written by another number of ranks), the val loss, preview samples and the
export. Randomness that depends on the data (label dropout, stochastic codes) comes from
generators keyed by (seed, step, sample index, view), so a resumed run draws what the
uninterrupted one drew, on any number of ranks.

Its inputs come from the stage: the trained tokenizer (code shapes, codebook vectors, soft
targets, decoding the samples) and a factory of code-shard readers.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..config.root import Config
from ..data.loaders import CodeLoaders, close_loader
from ..generation.sampling import keyed_uniforms
from ..losses.prior_loss import rq_prior_loss
from ..models.prior_config import CodeSpec
from ..models.registry import build_prior
from ..runtime.dist import DistEnv, all_gather_objects, barrier, broadcast_object
from ..runtime.errors import StageError
from ..runtime.io import atomic_write_json, read_json
from .checkpoint import RECORD
from .ema import WeightEMA
from .engine import make_engine
from .prior_deepspeed import (
    UNIVERSAL_DONE,
    make_prior_optimizer,
    newest_world_size,
    prior_deepspeed_config,
    to_universal,
)
from .schedule import warmup_cosine
from .throughput import device_peak_flops, prior_flops_per_sample
from .trainer import Trainer

SAMPLES_PNG = "samples.png"
GRID_SAMPLES = 16


class PriorTrainer(Trainer):
    stage, section = "train_prior", "prior_train"

    def __init__(self, cfg: Config, env: DistEnv, device: torch.device, stage_dir: Path, tokenizer: torch.nn.Module,
                 codes: CodeLoaders, logger: logging.Logger, writer=None):
        tc = cfg.prior_train
        super().__init__(tc, env, device, stage_dir, seed=cfg.seed, logger=logger, writer=writer)
        self.cfg, self.tokenizer, self.codes = cfg, tokenizer, codes
        self.spec = CodeSpec.from_tokenizer(tokenizer)
        codebook = tokenizer.quantizer.embed.detach() if self.spec.kind == "rq" else None
        self.model = build_prior(cfg.prior, self.spec, codebook).to(device)
        self.num_parameters = sum(p.numel() for p in self.model.parameters())  # before ZeRO-3 partitions them
        # Elastic resume: the newest checkpoint was written by another number of ranks.
        saved_world = broadcast_object(newest_world_size(self.checkpoints) if env.is_main else None)
        self.elastic = saved_world is not None and saved_world != env.world_size
        ds_config = None
        if tc.engine == "deepspeed":
            ds_config = prior_deepspeed_config(tc, env.world_size, device)
            if self.elastic:  # DeepSpeed loads a universal checkpoint (any world size)
                ds_config["checkpoint"] = {"load_universal": True}
            if env.is_main:
                atomic_write_json(self.stage_dir / "deepspeed_config.json", ds_config)
        self.optimizer = make_prior_optimizer(self.model, tc, ds_config)
        self.scheduler = warmup_cosine(self.optimizer, tc.steps, tc.warmup_steps, tc.min_lr_ratio)
        self.engine = make_engine("prior", self.model, self.optimizer, self.scheduler, tc, env, device,
                                  ds_config=ds_config)
        self.ema = None
        if tc.ema_decay > 0:
            if tc.engine == "deepspeed" and tc.zero_stage == 3:
                raise StageError("prior_train.ema_decay with zero_stage 3 is not supported (the parameters are "
                                 "partitioned); use zero_stage 2 or ema_decay 0")
            self.ema = WeightEMA(self.model, tc.ema_decay)
        self.train_loader = codes.train(self.batch_per_rank)
        self.has_latents = "latent_CHW" in self.train_loader.dataset.code_manifest.get("columns", {})
        if tc.targets == "soft" and self.spec.kind != "rq":
            raise StageError("prior_train.targets: soft targets apply to RQ/VQ codes; use targets=codes for dq")
        if tc.targets == "soft" and not self.has_latents:
            raise StageError("prior_train.targets=soft needs the latents in the code shards: set "
                             "precompute.store_latents=true and rerun precompute_codes (with --force), or use "
                             "prior_train.targets=codes")
        self.tokens_per_sample = self.spec.height * self.spec.width * self.spec.depth  # DQ: coarse-grid cells
        self.flops_per_sample = prior_flops_per_sample(self.model, self.spec)
        self.peak_flops = device_peak_flops(device)

    def engines(self):
        return [self.engine]

    # ----- state beyond the base trainer's ---------------------------------------------------
    @property
    def resume_meta(self) -> dict:
        # The world size is recorded but need not match: another one resumes elastically.
        return {k: v for k, v in self.checkpoint_meta.items() if k != "world_size"}

    def client_state(self) -> dict:
        client = {**super().client_state(), "scheduler": self.scheduler.state_dict()}
        if self.ema is not None:
            client["ema"] = self.ema.state_dict()
        return client

    def load_client_state(self, client: dict) -> None:
        # Streaming's state is the global position: it resumes on any number of ranks.
        super().load_client_state(client)
        if self.ema is not None:
            self.ema.load_state_dict(client["ema"])

    def load_checkpoint(self, folder: Path) -> None:
        saved_world = read_json(folder / RECORD)["world_size"]
        if saved_world == self.env.world_size and not self.elastic:
            super().load_checkpoint(folder)
        else:
            self.load_client_state(self._load_elastic(folder, saved_world))

    def _load_elastic(self, folder: Path, saved_world: int) -> dict:
        """Resume a checkpoint of `saved_world` ranks on this world size: the same global batch and
        data order; DeepSpeed through a universal checkpoint (converted once, cached next to the
        checkpoints), DDP from its full state. RNG streams restart from (seed, step, rank)."""
        self.logger.info("elastic resume: checkpoint %s was written by %d rank(s), this run has %d",
                         folder, saved_world, self.env.world_size)
        if self.engine.kind == "deepspeed":
            universal = self.stage_dir / "universal" / folder.name
            if self.env.is_main and not (universal / UNIVERSAL_DONE).is_file():
                to_universal(folder / self.engine.name, universal / self.engine.name)
                (universal / UNIVERSAL_DONE).write_text("converted\n")
            barrier()
            self.engine.load_universal(universal)
        else:
            self.engine.load(folder)
        client = self.read_client_state(folder, min(self.env.rank, saved_world - 1))
        self.scheduler.load_state_dict(client["scheduler"])
        torch.manual_seed((self.cfg.seed * 1_000_003 + client["step"]) * 65_537 + self.env.rank)
        return client

    # ----- one optimizer step ----------------------------------------------------------
    def _draws(self, batch: dict) -> torch.Tensor:
        """(B, 1 + H*W*D) uniforms for this step's random choices per sample (label dropout, then
        stochastic codes), keyed by (seed, step, sample index, view): the same sample at the same step
        draws the same numbers whichever rank and micro-batch it lands in."""
        n = 1 + (self.tokens_per_sample if self.spec.kind == "rq" else 0)
        keys = [(self.cfg.seed, self.step, int(i), int(v)) for i, v in zip(batch["index"], batch["view"])]
        return keyed_uniforms(keys, n)

    def batch_loss(self, batch: dict, draws: torch.Tensor | None, *, train: bool) -> tuple[torch.Tensor, dict]:
        """Loss of one micro-batch; in training with label dropout (and stochastic codes) from `draws`."""
        labels = batch["label"].to(self.device) if self.model.num_classes else None
        if train and labels is not None:
            labels = self.model.drop_labels(labels, u_B=draws[:, 0])
        if self.spec.kind == "rq":
            codes = batch["codes_HWD"].to(self.device)
            soft = None
            if self.train_cfg.targets == "soft":
                latent = batch["latent_CHW"].to(self.device).float()
                stochastic = train and self.train_cfg.stochastic_codes
                uniforms = draws[:, 1:].reshape(codes.shape) if stochastic else None
                soft, sampled = self.tokenizer.quantizer.soft_codes(
                    latent, self.cfg.tokenizer.soft_tau, sample=stochastic, uniforms_BHWD=uniforms)
                if stochastic:
                    codes = sampled.to(self.device)
            with self.engine.autocast():
                logits = self.engine(codes, labels)
            return rq_prior_loss(logits, codes, soft)
        inputs = [batch[k].to(self.device) for k in ("positions_L", "contents_L", "granularity_L", "mask_L")]
        with self.engine.autocast():
            out = self.engine(*inputs, labels)
        losses = type(self.model).loss_from_outputs(out)
        return losses.pop("loss"), {k: v.detach() for k, v in losses.items()}

    def train_step(self) -> dict:
        tc = self.train_cfg
        logs: dict[str, float] = {}
        self.engine.zero_grad()
        for i in range(tc.grad_accum):
            batch = self.next_batch()
            with self.engine.micro_batch(i):
                loss, parts = self.batch_loss(batch, self._draws(batch), train=True)
                self.engine.backward(loss)
            for k, v in {"loss": loss.detach(), **parts}.items():
                logs[k] = logs.get(k, 0.0) + float(v) / tc.grad_accum
        logs.update(self.engine.step())
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        logs["lr"] = self.engine.lr
        return logs

    def on_start(self, resumed: bool) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def rates(self, seconds: float) -> dict:
        rates = {"samples_per_s": self.train_cfg.batch_size / seconds}
        rates["tokens_per_s"] = rates["samples_per_s"] * self.tokens_per_sample
        if self.peak_flops:
            rates["mfu"] = rates["samples_per_s"] * self.flops_per_sample / (self.peak_flops * self.env.world_size)
            rates["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        return rates

    def postfix(self, logs: dict) -> dict:
        return {"loss": f"{logs['loss']:.4f}", "tok_s": f"{logs['tokens_per_s']:.0f}"}

    # ----- evaluation and export ---------------------------------------------------------
    def periodic(self):
        return [*super().periodic(), (self.train_cfg.sample_every, self.sample_grid)]

    def finish(self) -> dict:
        metrics = self.evaluate()
        if self.last_logs:  # this process ran steps (not only a resume of a finished run)
            metrics["train_loss"] = self.last_logs["loss"]
        self.sample_grid()
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean val loss over up to eval_images val code samples (per depth for RQ; position vs
        content for DQ), averaged over ranks."""
        self.engine.train(False)
        loader = self.codes.val(self.batch_per_rank)
        sums: dict[str, float] = {}
        seen = 0
        try:
            for batch in loader:
                n = int(batch["label"].shape[0])
                loss, parts = self.batch_loss(batch, None, train=False)
                for k, v in {"loss": loss, **parts}.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * n
                seen += n
                if seen * self.env.world_size >= self.train_cfg.eval_images:
                    break
        finally:
            close_loader(loader)
            self.engine.train(True)
        totals = all_gather_objects((sums, seen))
        count = max(sum(c for _, c in totals), 1)
        metrics = {f"val_{k}": sum(s.get(k, 0.0) for s, _ in totals) / count for k in sums}
        metrics["val_samples"] = count
        self.report_eval(metrics)
        return metrics

    def export_state(self) -> dict:
        """Consolidated weights for the sampler (EMA when enabled), on every rank's CPU.
        Collective under ZeRO-3 (the partitioned parameters are gathered)."""
        if self.ema is not None:
            state = {k: v.clone() for k, v in self.model.state_dict().items()}
            state.update(self.ema.state_dict())
            return state
        if self.engine.kind == "deepspeed" and self.train_cfg.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None):
                return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    @torch.no_grad()
    def sample_grid(self) -> None:
        """A few class-conditional samples (one class per row) -> samples.png and TensorBoard."""
        from ..generation import sample_codes
        from ..generation.decode import decode_to_uint8, save_uint8_grid
        from ..generation.sampling import SamplingOptions

        state = self.export_state()  # collective under ZeRO-3
        if not self.env.is_main:
            return
        sampler_model = build_prior(self.cfg.prior, self.spec, state.get("codebook")).to(self.device)
        sampler_model.load_state_dict(state)
        sampler_model.eval()
        n = GRID_SAMPLES
        classes = max(self.model.num_classes, 1)
        labels = torch.arange(n, device=self.device) % classes if self.model.num_classes else None
        codes = sample_codes(sampler_model, labels, list(range(n)), self.cfg.seed, SamplingOptions())
        images = decode_to_uint8(self.tokenizer, codes, batch_size=n)  # (n, R, R, 3) uint8
        save_uint8_grid(images, self.stage_dir / SAMPLES_PNG, nrow=min(n, 8))
        if self.writer is not None:
            from torchvision.utils import make_grid

            self.writer.add_image("samples", make_grid(images.permute(0, 3, 1, 2), nrow=min(n, 8)), self.step)
