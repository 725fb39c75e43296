"""The training loop both trainers share (the tokenizer's and the prior's).

`Trainer` owns everything around one optimizer step: the per-rank batch, the loop to `steps`, the
cadence (scalars every `log_every`, eval every `eval_every`, checkpoints every `checkpoint_every`
steps or `checkpoint_every_min` minutes), preemption (checkpoint at the next step boundary, then
raise `Preempted`), checkpoints with the client state (step, reader position, every RNG) and
resuming from the newest valid one, the endless batch iterator and TensorBoard scalars.

A subclass builds its model(s), engines and `self.train_loader` in `__init__` (its inputs are
handed to it by the stage) and supplies the rest:

    train_step()   one optimizer step on `self.next_batch()` micro-batches; returns scalars
    evaluate()     metrics on the val split (collective)
    engines()      the engines whose state a checkpoint holds
    rates(seconds) throughput scalars of a step; postfix(logs): the progress bar's fields
    finish()       the metrics of the finished run (by default one last evaluate())
    and its export (the weights the stage saves).

Resume is exact: a run stopped at any step and resumed reproduces the uninterrupted run's weights
bit for bit on CPU, which is why the RNG and reader position travel with every checkpoint.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import torch

from ..config.sections import TrainConfig
from ..runtime.dist import DistEnv, broadcast_object
from ..runtime.progress import progress
from .checkpoint import CheckpointManager, load_pt, resume_newest
from .engine import TrainEngine, engine_meta, per_rank_batch
from .rng import capture_rng_state, restore_rng_state
from .signals import Preempted, PreemptionGuard


def client_file(rank: int) -> str:
    """Each rank's client state (step, reader position, RNGs) in a checkpoint step folder."""
    return f"client_rank_{rank:05d}.pt"


class Trainer:
    stage = ""    # the stage it trains for: names the progress bar
    section = ""  # its config section, e.g. "prior_train": names the key in error messages

    def __init__(self, train_cfg: TrainConfig, env: DistEnv, device: torch.device, stage_dir: Path, *,
                 seed: int, logger: logging.Logger, writer=None):
        self.train_cfg, self.env, self.device, self.logger, self.writer = train_cfg, env, device, logger, writer
        self.stage_dir = Path(stage_dir)
        self.batch_per_rank = per_rank_batch(train_cfg, env.world_size, key=f"{self.section}.batch_size")
        self.checkpoints = CheckpointManager(self.stage_dir / "checkpoints", keep=train_cfg.keep_checkpoints,
                                             logger=logger)
        self.checkpoint_meta = engine_meta(train_cfg, env)  # recorded with every checkpoint
        self.step = 0
        self.last_logs: dict[str, float] = {}  # the scalars of the last step this process ran
        self.train_loader = None  # the subclass's resumable reader of the train split
        torch.manual_seed(seed)  # identical initialisation on every rank: subclasses build models next

    # ----- what a subclass supplies ------------------------------------------------------
    def engines(self) -> list[TrainEngine]:
        raise NotImplementedError

    def train_step(self) -> dict:
        raise NotImplementedError

    def evaluate(self) -> dict:
        raise NotImplementedError

    def rates(self, seconds: float) -> dict:
        """Throughput scalars of one step that took `seconds` (logged with the step's scalars)."""
        return {}

    def postfix(self, logs: dict) -> dict:
        """The fields the progress bar shows after each step."""
        return {}

    def periodic(self) -> list[tuple[int, Callable[[], object]]]:
        """(every N steps, work) done between steps, not at the last one (finish() covers it)."""
        return [(self.train_cfg.eval_every, self.evaluate)]

    def on_start(self, resumed: bool) -> None:
        """Called once before the first step of this process, after resuming (or not)."""

    def finish(self) -> dict:
        """The finished run's metrics."""
        return self.evaluate()

    # ----- checkpoints -------------------------------------------------------------------
    @property
    def resume_meta(self) -> dict:
        """What a checkpoint's record must match to be resumed (another engine or ZeRO stage cannot)."""
        return self.checkpoint_meta

    def client_state(self) -> dict:
        """This rank's state outside the engines; extended by subclasses with what they own."""
        return {"step": self.step, "loader": self.train_loader.state_dict(), "rng": capture_rng_state()}

    def load_client_state(self, client: dict) -> None:
        self.step = client["step"]
        self.train_loader.load_state_dict(client["loader"])

    def read_client_state(self, folder: Path, rank: int) -> dict:
        return load_pt(folder / client_file(rank), map_location="cpu")

    def save_checkpoint(self) -> None:
        """Collective: every rank writes its part into one step folder, published atomically."""
        with self.checkpoints.saving(self.step, self.checkpoint_meta) as folder:
            for engine in self.engines():
                engine.save(folder)
            torch.save(self.client_state(), folder / client_file(self.env.rank))
        self.logger.info("checkpoint saved: %s", self.checkpoints.path_for(self.step))

    def load_checkpoint(self, folder: Path) -> None:
        """Load a checkpoint written by this many ranks (engines, RNGs, then the client state)."""
        for engine in self.engines():
            engine.load(folder)
        client = self.read_client_state(folder, self.env.rank)
        restore_rng_state(client["rng"])
        self.load_client_state(client)

    def resume(self) -> bool:
        resumed = resume_newest(self.checkpoints, self.resume_meta, self.load_checkpoint)
        if resumed:
            self.logger.info("resumed from checkpoint at step %d", self.step)
        if self.writer is not None:
            self.writer.resume_from(self.step)  # a killed run's events after this step are purged
        return resumed

    # ----- the loop ----------------------------------------------------------------------
    def next_batch(self):
        return next(self._batches)

    def _endless_batches(self):
        while True:  # epochs follow each other; the loader tracks epoch and position itself
            yield from self.train_loader

    def fit(self, guard: PreemptionGuard) -> dict:
        """Train to `steps`, checkpointing on the cadence and when `guard` reports a signal."""
        tc = self.train_cfg
        for engine in self.engines():
            engine.train()
        self.on_start(self.resume())
        self._batches = self._endless_batches()
        bar = progress(tc.steps, initial=self.step, desc=self.stage, unit="step", enabled=self.env.is_main)
        every_min = getattr(tc, "checkpoint_every_min", 0.0)  # a prior_train key; the tokenizer has none
        last_save = time.monotonic()
        guard.defer()  # in the loop a signal waits for the step boundary: checkpoint, then stop
        while self.step < tc.steps:
            start = time.perf_counter()
            logs = self.train_step()
            logs.update(self.rates(max(time.perf_counter() - start, 1e-9)))
            self.last_logs = logs
            bar.update(1)
            bar.set_postfix(**self.postfix(logs))
            if self.step % tc.log_every == 0 or self.step == tc.steps:
                self.write_scalars("train", logs)
            for every, work in self.periodic():
                if every and self.step % every == 0 and self.step < tc.steps:
                    work()
            # Time-based checkpoints: rank 0's clock decides, so every rank saves at the same step.
            timed = bool(every_min) and broadcast_object(time.monotonic() - last_save >= 60 * every_min)
            stop = guard.should_stop()
            if stop or timed or self.step % tc.checkpoint_every == 0 or self.step == tc.steps:
                self.save_checkpoint()
                last_save = time.monotonic()
            if stop:
                bar.close()
                raise Preempted(self.step, guard.received)
        bar.close()
        guard.act_at_once(f"the evaluation after the final checkpoint (step {self.step})")
        return self.finish()

    # ----- reporting ---------------------------------------------------------------------
    def write_scalars(self, group: str, values: dict, flush: bool = False) -> None:
        """TensorBoard scalars `group/key` at the current step (main rank only: others have no writer)."""
        if self.writer is None:
            return
        for key, value in values.items():
            self.writer.add_scalar(f"{group}/{key}", value, self.step)
        if flush:
            self.writer.flush()

    def report_eval(self, metrics: dict) -> None:
        """An eval's metrics to TensorBoard and the log."""
        self.write_scalars("eval", metrics, flush=True)
        self.logger.info("eval at step %d: %s", self.step,
                         ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
