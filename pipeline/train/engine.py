"""One training interface, two back ends: torch DDP (`DDPEngine`) and DeepSpeed (`DeepSpeedEngine`).

An engine owns one module with its optimizer and LR schedule: wrapping, forward, backward with
gradient accumulation, clipping + step, and saving / loading its state into a checkpoint step
folder (pipeline/train/checkpoint.py). A trainer with two networks (the tokenizer's generator and
discriminator) builds two engines of the same kind. One optimizer step:

    engine.zero_grad()
    for i, batch in enumerate(micro_batches):       # len == train_cfg.grad_accum
        with engine.micro_batch(i), engine.autocast():
            loss = loss_fn(engine(batch))           # the micro-batch's mean loss, unscaled
        engine.backward(loss)                       # both back ends scale it by 1/grad_accum
    stats = engine.step()                           # clip, optimizer step, schedule step

`DDPEngine`: DistributedDataParallel (gradient all-reduce overlapped with backward, `no_sync` on
all but the last micro-batch), or with `grad_sync="allreduce"` a plain module whose gradients are
averaged by one explicit all-reduce in `step()` (for a module run several times per backward,
which DDP forbids: the PatchGAN discriminator sees real and fake images). Rank 0 saves
`<name>.pt` (model, optimizer, scheduler), loaded with weights_only=True.

`DeepSpeedEngine`: `deepspeed.initialize` with our torch optimizer and LambdaLR as client
optimizer / scheduler and a config generated from the typed config (`deepspeed_config`); ZeRO
stage 0-3, bf16 weights (GPU only) or fp32, gradient clipping and accumulation inside DeepSpeed.
Every rank saves its shards into `<name>/` of the step folder with `save_checkpoint`.
"""
from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ..config.sections import TrainConfig
from ..runtime.dist import DistEnv, resolve_precision
from ..runtime.errors import StageError
from .checkpoint import load_pt

ENGINES = ("ddp", "deepspeed")


def per_rank_batch(train_cfg: TrainConfig, world_size: int, key: str = "batch_size") -> int:
    """Samples in one micro-batch on one rank: the global batch over ranks x micro-batches.
    `key` names the setting in the message when it does not divide."""
    per_rank, remainder = divmod(train_cfg.batch_size, world_size * train_cfg.grad_accum)
    if remainder or per_rank == 0:
        raise StageError(f"{key}={train_cfg.batch_size} must be a positive multiple of world_size x grad_accum = "
                         f"{world_size} x {train_cfg.grad_accum}")
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


class TrainEngine:
    """The interface; see the module docstring for one step."""
    kind = ""

    def __init__(self, name: str, module: torch.nn.Module, train_cfg: TrainConfig, device: torch.device):
        self.name, self.module, self.train_cfg, self.device = name, module, train_cfg, device
        self.autocast_dtype = torch.bfloat16 if resolve_precision(train_cfg.precision, device) == "bf16" else None
        self._micro = 0

    def __call__(self, *args, **kwargs):
        return self.wrapped(*args, **kwargs)

    def micro_batch(self, index: int):
        """Context for micro-batch `index` of an optimizer step (forward and backward inside)."""
        return contextlib.nullcontext()

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    @contextlib.contextmanager
    def frozen(self):
        """No parameter gradients while inside (the module still passes gradients to its inputs):
        e.g. the generator's GAN loss runs the discriminator, whose weights it must not touch."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def _count_micro(self) -> None:
        self._micro += 1
        if self._micro > self.train_cfg.grad_accum:
            raise RuntimeError(f"{self.name}: {self._micro} backward calls in one step, grad_accum is "
                               f"{self.train_cfg.grad_accum}")

    def skip_step(self) -> None:
        """Advance the LR schedule by one step without an update (e.g. before the GAN starts)."""
        self.scheduler.step()  # every back end keeps our LambdaLR as `self.scheduler`

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # each back end implements these
    def zero_grad(self) -> None: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> dict: ...
    def save(self, folder: Path) -> None: ...
    def load(self, folder: Path) -> None: ...


class DDPEngine(TrainEngine):
    kind = "ddp"

    def __init__(self, name, module, optimizer, scheduler, train_cfg, env: DistEnv, device, *,
                 grad_sync: str = "ddp", broadcast_buffers: bool = True):
        super().__init__(name, module, train_cfg, device)
        if grad_sync not in ("ddp", "allreduce"):
            raise ValueError(f"grad_sync must be 'ddp' or 'allreduce', got {grad_sync!r}")
        self.optimizer, self.scheduler, self.env, self.grad_sync = optimizer, scheduler, env, grad_sync
        use_ddp = env.is_distributed and grad_sync == "ddp"
        self.wrapped = DDP(module, broadcast_buffers=broadcast_buffers) if use_ddp else module

    def micro_batch(self, index: int):
        last = index == self.train_cfg.grad_accum - 1
        if isinstance(self.wrapped, DDP) and not last:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._micro = 0

    def backward(self, loss: torch.Tensor) -> None:
        self._count_micro()
        (loss / self.train_cfg.grad_accum).backward()

    def step(self) -> dict:
        stats = {}
        if self.grad_sync == "allreduce":
            average_gradients(self.module)
        if self.train_cfg.grad_clip > 0:
            stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(),
                                                                       self.train_cfg.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        self._micro = 0
        return stats

    def save(self, folder: Path) -> None:
        if self.env.is_main:
            torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, folder / f"{self.name}.pt")

    def load(self, folder: Path) -> None:
        state = load_pt(folder / f"{self.name}.pt", map_location=self.device)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def deepspeed_config(train_cfg: TrainConfig, world_size: int, device: torch.device, *,
                     bf16_weights: bool | None = None) -> dict:
    """The DeepSpeed JSON config for `train_cfg` (the global batch is `train_cfg.batch_size`).

    bf16_weights: DeepSpeed's bf16 mode (bf16 weights, fp32 master copy in the optimizer); None:
    when the precision resolves to bf16 on a GPU. fp32 on CPU."""
    grad_accum = train_cfg.grad_accum
    micro = per_rank_batch(train_cfg, world_size)
    if bf16_weights is None:
        bf16_weights = device.type == "cuda" and resolve_precision(train_cfg.precision, device) == "bf16"
    return {
        "train_batch_size": train_cfg.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": train_cfg.grad_clip,
        "zero_optimization": {"stage": train_cfg.zero_stage},
        "bf16": {"enabled": bool(bf16_weights)},
        "fp16": {"enabled": False},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _init_deepspeed_dist(device: torch.device) -> None:
    """DeepSpeed needs a process group even for one process; torchrun/srun ranks have one already."""
    import deepspeed

    if torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)
        return
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False)


class DeepSpeedEngine(TrainEngine):
    kind = "deepspeed"

    def __init__(self, name, module, optimizer, scheduler, train_cfg, env: DistEnv, device, *, config: dict):
        super().__init__(name, module, train_cfg, device)
        import deepspeed

        if config["bf16"]["enabled"]:
            self.autocast_dtype = None  # the weights themselves are bf16
        _init_deepspeed_dist(device)
        self.env, self.config = env, config
        self.wrapped, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=config)

    def __call__(self, *args, **kwargs):
        # The module itself, not DeepSpeed's forward: that one hooks the outputs so that any
        # backward through them runs ZeRO's gradient reduction, including a torch.autograd.grad
        # (the tokenizer's adaptive GAN weight), which then fails (0.19.8: reduce_ipg_grads on an
        # empty bucket). engine.backward() below does the prologue/epilogue work itself.
        # ZeRO-3 must gather the partitioned parameters in DeepSpeed's forward.
        if self.config["zero_optimization"]["stage"] == 3:
            return self.wrapped(*args, **kwargs)
        return self.module(*args, **kwargs)

    def zero_grad(self) -> None:
        self._micro = 0  # DeepSpeed clears its gradients itself after each optimizer step

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed divides by gradient_accumulation_steps itself, and reduces, clips and steps
        # (optimizer, then scheduler) in the step() of the boundary micro-batch.
        self._count_micro()
        if self.wrapped.zero_optimization():
            self.wrapped.optimizer.set_gradient_accumulation_boundary(self.wrapped.is_gradient_accumulation_boundary())
        self.wrapped.backward(loss)
        self.wrapped.step()

    def step(self) -> dict:
        if self._micro != self.train_cfg.grad_accum:
            raise RuntimeError(f"{self.name}: step() after {self._micro} of {self.train_cfg.grad_accum} micro-batches")
        self._micro = 0
        norm = self.wrapped.get_global_grad_norm()
        return {"grad_norm": float(norm)} if self.train_cfg.grad_clip > 0 and norm is not None else {}

    def save(self, folder: Path) -> None:
        self.wrapped.save_checkpoint(str(folder), tag=self.name, client_state={}, save_latest=False)

    def load(self, folder: Path) -> None:
        # DeepSpeed reads its own files with torch.load(weights_only=False) (0.19.8's
        # TorchCheckpointEngine.load); we only hand it folders whose completion record matched.
        path, _ = self.wrapped.load_checkpoint(str(folder), tag=self.name, load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint '{self.name}' in {folder}")

    def load_universal(self, folder: Path) -> None:
        """Load a universal checkpoint (`folder/<name>/`, from deepspeed's ds_to_universal), written by
        any number of ranks; needs `"checkpoint": {"load_universal": true}` in the config."""
        path, _ = self.wrapped.load_checkpoint(str(folder), tag=self.name, load_optimizer_states=True,
                                               load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no universal checkpoint '{self.name}' in {folder}")


def make_engine(name: str, module, optimizer, scheduler, train_cfg: TrainConfig, env: DistEnv, device, *,
                grad_sync: str = "ddp", broadcast_buffers: bool = True, ds_config: dict | None = None) -> TrainEngine:
    """The engine `train_cfg.engine` names. DeepSpeed ignores grad_sync (ZeRO reduces the
    gradients of a module run several times per backward correctly) and broadcast_buffers
    (it broadcasts parameters and buffers from rank 0 once, at initialisation)."""
    if train_cfg.engine == "ddp":
        return DDPEngine(name, module, optimizer, scheduler, train_cfg, env, device, grad_sync=grad_sync,
                         broadcast_buffers=broadcast_buffers)
    if train_cfg.engine == "deepspeed":
        config = ds_config if ds_config is not None else deepspeed_config(train_cfg, env.world_size, device)
        return DeepSpeedEngine(name, module, optimizer, scheduler, train_cfg, env, device, config=config)
    raise ValueError(f"unknown engine {train_cfg.engine!r}; choose one of {ENGINES}")


def engine_meta(train_cfg: TrainConfig, env: DistEnv) -> dict:
    """What a checkpoint's completion record must match for this run to resume from it."""
    return {"engine": train_cfg.engine, "world_size": env.world_size,
            "zero_stage": train_cfg.zero_stage if train_cfg.engine == "deepspeed" else None}
