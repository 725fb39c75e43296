"""The base training loop (pipeline/train/trainer.py) on a toy trainer in one process: the
per-rank batch, the log / eval / checkpoint cadence, preemption at a step boundary and a resume
that reproduces the uninterrupted run bit for bit (RNG, reader position and engine state)."""
import logging
import signal

import pytest
import torch

from pipeline.config.sections import TrainConfig
from pipeline.runtime.dist import DistEnv
from pipeline.runtime.errors import StageError
from pipeline.train.engine import make_engine, per_rank_batch
from pipeline.train.schedule import warmup_cosine
from pipeline.train.signals import Preempted, PreemptionGuard
from pipeline.train.trainer import Trainer


class ResumableLoader:
    """Fixed rows in order, `batch` at a time; its position is part of the checkpoint."""

    def __init__(self, rows: torch.Tensor, batch: int):
        self.rows, self.batch, self.pos = rows, batch, 0

    def __iter__(self):
        while self.pos + self.batch <= len(self.rows):
            self.pos += self.batch
            yield self.rows[self.pos - self.batch:self.pos]
        self.pos = 0  # the next epoch

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


class RecordingWriter:
    """The part of the stage's TensorBoard writer a trainer uses, recording what it was given."""

    def __init__(self):
        self.scalars = []
        self.resumed_from = None

    def resume_from(self, step):
        self.resumed_from = step

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, step))

    def flush(self):
        pass


class ToyTrainer(Trainer):
    stage, section = "toy", "toy_train"

    def __init__(self, train_cfg, stage_dir, *, preempt_at=None, writer=None):
        super().__init__(train_cfg, DistEnv(), torch.device("cpu"), stage_dir, seed=0,
                         logger=logging.getLogger("test_trainer"), writer=writer)
        self.model = torch.nn.Linear(4, 1)
        optimizer = torch.optim.Adam(self.model.parameters(), lr=0.1)
        scheduler = warmup_cosine(optimizer, train_cfg.steps, 0)
        self.engine = make_engine("toy", self.model, optimizer, scheduler, train_cfg, self.env, self.device)
        self.train_loader = ResumableLoader(torch.arange(40.0).reshape(10, 4) / 40, self.batch_per_rank)
        self.preempt_at, self.guard, self.evals = preempt_at, None, []

    def engines(self):
        return [self.engine]

    def train_step(self) -> dict:
        self.engine.zero_grad()
        rows = self.next_batch()
        noisy = rows + 0.1 * torch.randn_like(rows)  # the global RNG: a resume must restore it
        loss = (self.engine(noisy) - 1).pow(2).mean()
        self.engine.backward(loss)
        self.engine.step()
        self.step += 1
        if self.step == self.preempt_at:
            self.guard.received = signal.SIGUSR1  # what the signal handler does
        return {"loss": float(loss.detach())}

    def evaluate(self) -> dict:
        self.evals.append(self.step)
        metrics = {"val": float(self.model.weight.detach().sum())}
        self.report_eval(metrics)
        return metrics

    def fit_guarded(self) -> dict:
        with PreemptionGuard(signals=()) as self.guard:
            return self.fit(self.guard)


def toy_config(**overrides) -> TrainConfig:
    # 6 steps over 10 rows in batches of 2: the reader wraps into a second epoch mid-run.
    values = dict(steps=6, batch_size=2, checkpoint_every=2, keep_checkpoints=5, log_every=4, eval_every=3)
    return TrainConfig(**{**values, **overrides})


def test_cadence_of_logs_evals_and_checkpoints(tmp_path):
    writer = RecordingWriter()
    trainer = ToyTrainer(toy_config(), tmp_path, writer=writer)
    metrics = trainer.fit_guarded()
    assert trainer.step == 6 and set(metrics) == {"val"}
    assert trainer.evals == [3, 6]  # every 3 steps but the last, where finish() evaluates once
    assert trainer.checkpoints.steps() == [6, 4, 2]
    assert [step for tag, step in writer.scalars if tag == "train/loss"] == [4, 6]  # every 4 and the last
    assert [step for tag, step in writer.scalars if tag == "eval/val"] == [3, 6]


def test_preempted_run_resumes_to_the_same_weights(tmp_path):
    reference = ToyTrainer(toy_config(), tmp_path / "reference")
    reference.fit_guarded()

    stopped = ToyTrainer(toy_config(), tmp_path / "stopped", preempt_at=3)
    with pytest.raises(Preempted) as raised:
        stopped.fit_guarded()
    assert raised.value.step == 3 and stopped.checkpoints.steps()[0] == 3  # saved off the 2-step cadence

    resumed = ToyTrainer(toy_config(), tmp_path / "stopped")
    resumed.fit_guarded()
    assert resumed.step == 6 and resumed.evals == [6]
    for name, value in reference.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    assert not torch.equal(reference.model.weight, ToyTrainer(toy_config(), tmp_path / "fresh").model.weight)


def test_per_rank_batch_names_the_key_when_it_does_not_divide():
    assert per_rank_batch(TrainConfig(batch_size=32, grad_accum=2), 4) == 4
    with pytest.raises(StageError, match=r"prior_train.batch_size=30 must be a positive multiple of "
                                         r"world_size x grad_accum = 4 x 2"):
        per_rank_batch(TrainConfig(batch_size=30, grad_accum=2), 4, key="prior_train.batch_size")
    with pytest.raises(StageError):
        ToyTrainer(toy_config(batch_size=3, grad_accum=2), "unused")
