import logging
import os
import signal

import numpy as np
import pytest
import torch

from pipeline.engine import CheckpointManager, PreemptionGuard, capture_rng_state, restore_rng_state, warmup_cosine
from pipeline.engine.schedule import warmup_cosine_factor


def test_checkpoint_keeps_last_k_and_round_trips(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    for step in (10, 20, 30):
        mgr.save(step, {"step": step, "w": torch.full((3,), float(step))})
    assert mgr.steps() == [30, 20]
    step, state = mgr.load_latest()
    assert step == 30 and torch.equal(state["w"], torch.full((3,), 30.0))


def test_truncated_latest_falls_back_with_warning(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path, keep=3)
    mgr.save(1, {"w": torch.ones(1000)})
    mgr.save(2, {"w": torch.zeros(1000)})
    latest = mgr.path_for(2)
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="tessera"):
        step, state = mgr.load_latest()
    assert step == 1 and torch.equal(state["w"], torch.ones(1000))
    assert "truncated" in caplog.text


def test_corrupt_bytes_same_size_fall_back(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path, keep=3)
    mgr.save(1, {"w": torch.ones(10)})
    mgr.save(2, {"w": torch.zeros(10)})
    latest = mgr.path_for(2)
    latest.write_bytes(b"\0" * latest.stat().st_size)
    with caplog.at_level(logging.WARNING, logger="tessera"):
        assert mgr.load_latest()[0] == 1
    assert "could not be loaded" in caplog.text


class Payload:
    """An arbitrary class: unpickling it could run code, so weights_only loading must refuse it."""


def test_weights_only_rejects_arbitrary_objects(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, {"ok": 1})
    torch.save({"evil": Payload()}, mgr.path_for(5))
    (tmp_path / "step_00000005.json").write_text('{"step": 5, "bytes": %d}' % mgr.path_for(5).stat().st_size)
    assert mgr.load_latest()[0] == 1  # the pickled exception object is refused, the older one loads


def test_empty_folder():
    assert CheckpointManager("/nonexistent/ckpt").load_latest() is None


def test_schedule_shape():
    assert warmup_cosine_factor(0, 100, 10, 0.0) == pytest.approx(0.1)
    assert warmup_cosine_factor(9, 100, 10, 0.0) == pytest.approx(1.0)
    assert warmup_cosine_factor(10, 100, 10, 0.0) == pytest.approx(1.0)
    assert warmup_cosine_factor(100, 100, 10, 0.1) == pytest.approx(0.1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, 100, 10)
    state = sched.state_dict()
    torch.save(state, "/dev/null")  # plain data: no closures in the state
    assert all(v is None or isinstance(v, dict) for v in state["lr_lambdas"])


def test_rng_round_trip(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3))
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert torch.equal(torch.rand(3), expected[0]) and np.array_equal(np.random.rand(3), expected[1])


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM])
def test_preemption_guard_flags_signal(sig):
    with PreemptionGuard() as guard:
        assert not guard.should_stop()
        os.kill(os.getpid(), sig)
        assert guard.should_stop() and guard.received == sig
    assert signal.getsignal(sig) is not guard._handle
