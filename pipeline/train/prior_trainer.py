"""Prior training (RQ-Transformer / DQ-Transformer) on the precomputed code shards.

One engine (pipeline/train/engine.py; DeepSpeed ZeRO 0-3 by default, or DDP) owns the model, the
AdamW optimizer (the authors' grouping: weight decay on Linear weights only) and the warm-up +
cosine schedule. The trainer owns the step and everything needed to resume it exactly: engine
state, optional weight EMA, step, reader position (streaming's state: the global order does not
depend on the number of ranks) and every rank's RNGs. Randomness that depends on the data (label
dropout, stochastic codes) comes from generators keyed by (seed, step, sample index, view), so a
resumed run draws what the uninterrupted one drew, on any number of ranks.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..runner.artifacts import load_tokenizer
from ..config.root import Config
from ..data.code_reader import make_code_loader
from ..runtime.dist import DistEnv, all_gather_objects, barrier, broadcast_object
from ..runtime.errors import StageError
from ..generation.sampling import keyed_uniforms
from ..runtime.io import atomic_write_json, read_json
from ..losses.prior_loss import rq_prior_loss
from ..models.prior_config import CodeSpec
from ..models.registry import build_prior
from ..runtime.progress import progress
from .checkpoint import RECORD, CheckpointManager, load_pt, resume_newest
from .ema import WeightEMA
from .engine import engine_meta, make_engine
from .prior_deepspeed import UNIVERSAL_DONE, decay_groups, newest_world_size, prior_deepspeed_config, to_universal
from .rng import capture_rng_state, restore_rng_state
from .schedule import warmup_cosine
from .signals import PreemptionGuard, Preempted
from .throughput import device_peak_flops, prior_flops_per_sample

SAMPLES_PNG = "samples.png"
GRID_SAMPLES = 16


class PriorTrainer:
    def __init__(self, cfg: Config, env: DistEnv, device: torch.device, run_dir: Path, stage_dir: Path,
                 logger: logging.Logger, writer=None):
        self.cfg, self.env, self.device, self.logger, self.writer = cfg, env, device, logger, writer
        self.run_dir, self.stage_dir = Path(run_dir), Path(stage_dir)
        tc = self.train_cfg = cfg.prior_train
        self.tokenizer = load_tokenizer(self.run_dir / "train_tokenizer", device)
        self.spec = CodeSpec.from_tokenizer(self.tokenizer)
        codebook = self.tokenizer.quantizer.embed.detach() if self.spec.kind == "rq" else None
        torch.manual_seed(cfg.seed)  # identical initialisation on every rank
        self.model = build_prior(cfg.prior, self.spec, codebook).to(device)
        self.num_parameters = sum(p.numel() for p in self.model.parameters())  # before ZeRO-3 partitions them
        self.optimizer = torch.optim.AdamW(decay_groups(self.model, tc.weight_decay), lr=tc.lr,
                                           betas=tuple(tc.betas))
        self.scheduler = warmup_cosine(self.optimizer, tc.steps, tc.warmup_steps, tc.min_lr_ratio)
        per_rank, remainder = divmod(tc.batch_size, env.world_size * tc.grad_accum)
        if remainder or per_rank == 0:
            raise StageError(f"prior_train.batch_size={tc.batch_size} must be a positive multiple of world_size x "
                             f"grad_accum = {env.world_size} x {tc.grad_accum}")
        self.batch_per_rank = per_rank
        self.checkpoints = CheckpointManager(self.stage_dir / "checkpoints", keep=tc.keep_checkpoints, logger=logger)
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
        self.engine = make_engine("prior", self.model, self.optimizer, self.scheduler, tc, env, device,
                                  ds_config=ds_config)
        self.ema = None
        if tc.ema_decay > 0:
            if tc.engine == "deepspeed" and tc.zero_stage == 3:
                raise StageError("prior_train.ema_decay with zero_stage 3 is not supported (the parameters are "
                                 "partitioned); use zero_stage 2 or ema_decay 0")
            self.ema = WeightEMA(self.model, tc.ema_decay)
        self.codes_dir = self.run_dir / "precompute_codes"
        self.train_loader = make_code_loader(self.codes_dir, "train", self.batch_per_rank, seed=cfg.seed)
        self.has_latents = "latent_CHW" in self.train_loader.dataset.code_manifest.get("columns", {})
        if tc.targets == "soft" and self.spec.kind != "rq":
            raise StageError("prior_train.targets: soft targets apply to RQ/VQ codes; use targets=codes for dq")
        if tc.targets == "soft" and not self.has_latents:
            raise StageError("prior_train.targets=soft needs the latents in the code shards: set "
                             "precompute.store_latents=true and rerun precompute_codes with --force (which deletes and "
                             "rewrites its code shards), or use "
                             "prior_train.targets=codes")
        # Recorded with every checkpoint; the world size is not part of what a checkpoint must match
        # to resume (another one resumes elastically).
        self.save_meta = engine_meta(tc, env)
        self.meta = {k: v for k, v in self.save_meta.items() if k != "world_size"}
        self.step = 0
        self.last_train_loss: float | None = None
        self.flops_per_sample = prior_flops_per_sample(self.model, self.spec)
        self.peak_flops = device_peak_flops(device)

    # ----- state -------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Collective: every rank writes its part into one step folder, published atomically."""
        with self.checkpoints.saving(self.step, self.save_meta) as folder:
            self.engine.save(folder)
            client = {"step": self.step, "loader": self.train_loader.state_dict(), "rng": capture_rng_state(),
                      "scheduler": self.scheduler.state_dict()}
            if self.ema is not None:
                client["ema"] = self.ema.state_dict()
            torch.save(client, folder / f"client_rank_{self.env.rank:05d}.pt")
        self.logger.info("checkpoint saved: %s", self.checkpoints.path_for(self.step))

    def _load(self, folder: Path) -> None:
        saved_world = read_json(folder / RECORD)["world_size"]
        if saved_world == self.env.world_size and not self.elastic:
            self.engine.load(folder)
            client = load_pt(folder / f"client_rank_{self.env.rank:05d}.pt", map_location="cpu")
            restore_rng_state(client["rng"])
        else:
            client = self._load_elastic(folder, saved_world)
        self.step = client["step"]
        # Streaming's state is the global position: it resumes on any number of ranks.
        self.train_loader.load_state_dict(client["loader"])
        if self.ema is not None:
            self.ema.load_state_dict(client["ema"])

    def _load_elastic(self, folder: Path, saved_world: int) -> dict:
        """Resume a checkpoint of `saved_world` ranks on this world size: the same global batch and
        data order; DeepSpeed through a universal checkpoint (converted once, cached next to the
        checkpoints), DDP from its full state. RNG streams restart from (seed, step, rank)."""
        self.logger.info("elastic resume: checkpoint %s was written by %d ranks, this run has %d",
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
        client = load_pt(folder / f"client_rank_{min(self.env.rank, saved_world - 1):05d}.pt", map_location="cpu")
        self.scheduler.load_state_dict(client["scheduler"])
        torch.manual_seed((self.cfg.seed * 1_000_003 + client["step"]) * 65_537 + self.env.rank)
        return client

    def resume(self) -> bool:
        resumed = resume_newest(self.checkpoints, self.meta, self._load)
        if resumed:
            self.logger.info("resumed from checkpoint at step %d", self.step)
        if self.writer is not None:
            self.writer.resume_from(self.step)  # a killed run's events after this step are purged
        return resumed

    # ----- one optimizer step ----------------------------------------------------------
    def _draws(self, batch: dict) -> torch.Tensor:
        """(B, 1 + H*W*D) uniforms for this step's random choices per sample (label dropout, then
        stochastic codes), keyed by (seed, step, sample index, view): the same sample at the same step
        draws the same numbers whichever rank and micro-batch it lands in."""
        n = 1 + (self.spec.height * self.spec.width * self.spec.depth if self.spec.kind == "rq" else 0)
        keys = [(self.cfg.seed, self.step, int(i), int(v)) for i, v in zip(batch["index"], batch["view"])]
        return keyed_uniforms(keys, n)

    def _iterate_batches(self):
        while True:  # epochs follow each other; the loader tracks epoch and position itself
            yield from self.train_loader

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
            batch = next(self._batches)
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

    # ----- the loop ----------------------------------------------------------------------
    def fit(self, guard: PreemptionGuard) -> dict:
        tc = self.train_cfg
        self.engine.train()
        self.resume()
        self._batches = self._iterate_batches()
        tokens_per_sample = self.spec.height * self.spec.width * self.spec.depth
        bar = progress(tc.steps, initial=self.step, desc="train_prior", unit="step", enabled=self.env.is_main)
        last_save = time.monotonic()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        guard.defer()  # in the loop a signal waits for the step boundary: checkpoint, then stop
        while self.step < tc.steps:
            start = time.perf_counter()
            logs = self.train_step()
            self.last_train_loss = logs["loss"]
            seconds = max(time.perf_counter() - start, 1e-9)
            logs["samples_per_s"] = tc.batch_size / seconds
            logs["tokens_per_s"] = logs["samples_per_s"] * tokens_per_sample  # codes (DQ: coarse-grid cells)
            if self.peak_flops:
                logs["mfu"] = logs["samples_per_s"] * self.flops_per_sample / (self.peak_flops * self.env.world_size)
                logs["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
            bar.update(1)
            bar.set_postfix(loss=f"{logs['loss']:.4f}", tok_s=f"{logs['tokens_per_s']:.0f}")
            if self.writer is not None and (self.step % tc.log_every == 0 or self.step == tc.steps):
                for key, value in logs.items():
                    self.writer.add_scalar(f"train/{key}", value, self.step)
            if tc.eval_every and self.step % tc.eval_every == 0 and self.step < tc.steps:
                self.evaluate()
            if tc.sample_every and self.step % tc.sample_every == 0 and self.step < tc.steps:
                self.sample_grid()
            # Time-based checkpoints: rank 0's clock decides, so every rank saves at the same step.
            timed = bool(tc.checkpoint_every_min) and broadcast_object(
                time.monotonic() - last_save >= 60 * tc.checkpoint_every_min)
            stop = guard.should_stop()
            if stop or timed or self.step % tc.checkpoint_every == 0 or self.step == tc.steps:
                self.save_checkpoint()
                last_save = time.monotonic()
            if stop:
                bar.close()
                raise Preempted(self.step, guard.received)
        bar.close()
        guard.act_at_once(f"the evaluation after the final checkpoint (step {self.step})")
        metrics = self.evaluate()
        if self.last_train_loss is not None:
            metrics["train_loss"] = self.last_train_loss
        self.sample_grid()
        return metrics

    # ----- evaluation --------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean val loss over up to eval_images val code samples (per depth for RQ; position vs
        content for DQ), averaged over ranks."""
        self.engine.train(False)
        loader = make_code_loader(self.codes_dir, "val", self.batch_per_rank, seed=self.cfg.seed, shuffle=False,
                                  drop_last=False)
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
            _close(loader)
            self.engine.train(True)
        totals = all_gather_objects((sums, seen))
        count = max(sum(c for _, c in totals), 1)
        metrics = {f"val_{k}": sum(s.get(k, 0.0) for s, _ in totals) / count for k in sums}
        metrics["val_samples"] = count
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(f"eval/{key}", value, self.step)
            self.writer.flush()
        self.logger.info("eval at step %d: %s", self.step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
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
        sampler_model = build_prior(self.cfg.prior, self.spec,
                                    state.get("codebook")).to(self.device)
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


def _close(loader) -> None:
    """Release a finished StreamingDataLoader's dataset (its shared memory) before the next one."""
    dataset = getattr(loader, "dataset", None)
    for name in ("_shutdown", "close"):
        fn = getattr(dataset, name, None)
        if callable(fn):
            try:
                fn()
            except Exception:  # noqa: BLE001 - best effort
                pass
            return
