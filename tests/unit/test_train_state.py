"""Checkpoint step folders, the LR schedule, RNG state and the preemption guard (pipeline/train/)."""
import errno
import json
import logging
import os
import shutil
import signal

import numpy as np
import pytest
import torch

from pipeline.train.checkpoint import RECORD, CheckpointManager, IncompatibleCheckpoint, load_pt
from pipeline.train.rng import capture_rng_state, restore_rng_state
from pipeline.train.schedule import warmup_cosine, warmup_cosine_factor
from pipeline.train.signals import PreemptionGuard

META = {"engine": "ddp", "world_size": 1, "zero_stage": None}


def save(mgr, step, state, meta=META):
    with mgr.saving(step, meta) as folder:
        torch.save(state, folder / "state.pt")
        (folder / "shard").mkdir()
        torch.save({"part": torch.arange(step)}, folder / "shard" / "rank_0.pt")


def latest(mgr, meta=META):
    for step, folder in mgr.candidates(meta):
        return step, load_pt(folder / "state.pt")
    return None


def test_checkpoint_keeps_last_k_and_round_trips(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    for step in (10, 20, 30):
        save(mgr, step, {"step": step, "w": torch.full((3,), float(step))})
    assert mgr.steps() == [30, 20]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000020", "step_00000030"]  # no temp left
    record = json.loads((mgr.path_for(30) / RECORD).read_text())
    assert record["files"] == {"shard/rank_0.pt": (mgr.path_for(30) / "shard/rank_0.pt").stat().st_size,
                               "state.pt": (mgr.path_for(30) / "state.pt").stat().st_size}
    assert record["step"] == 30 and record["engine"] == "ddp" and record["world_size"] == 1
    step, state = latest(mgr)
    assert step == 30 and torch.equal(state["w"], torch.full((3,), 30.0))


@pytest.mark.parametrize("damage", ["truncate", "remove_file", "remove_record"])
def test_incomplete_newest_falls_back_with_warning(tmp_path, caplog, damage):
    mgr = CheckpointManager(tmp_path, keep=3)
    save(mgr, 1, {"w": torch.ones(1000)})
    save(mgr, 2, {"w": torch.zeros(1000)})
    newest = mgr.path_for(2)
    if damage == "truncate":
        part = newest / "shard" / "rank_0.pt"
        part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
        reason = "shard/rank_0.pt is truncated"
    elif damage == "remove_file":
        (newest / "shard" / "rank_0.pt").unlink()
        reason = "shard/rank_0.pt is missing"
    else:
        (newest / RECORD).unlink()
        reason = "the save did not finish"
    with caplog.at_level(logging.WARNING, logger="tessera"):
        step, state = latest(mgr)
    assert step == 1 and torch.equal(state["w"], torch.ones(1000))
    assert "step_00000002 skipped" in caplog.text and reason in caplog.text


def test_other_engine_or_world_size_is_a_clear_error(tmp_path):
    mgr = CheckpointManager(tmp_path)
    save(mgr, 1, {"w": torch.ones(1)})
    with pytest.raises(IncompatibleCheckpoint, match="world_size=1.*this run has world_size=2"):
        latest(mgr, {**META, "world_size": 2})


def test_failed_save_removes_its_temp_folder_and_the_next_run_removes_stale_ones(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path)
    stale = tmp_path / ".step_00000007.killed-job.tmp"  # a save that was killed (no job writes here now:
    stale.mkdir()                                       # the stage lock admits one job per stage)
    with pytest.raises(RuntimeError):
        with mgr.saving(3, META) as folder:
            torch.save({}, folder / "state.pt")
            raise RuntimeError("something broke mid-save")
    assert sorted(p.name for p in tmp_path.iterdir()) == [stale.name]  # its own temp folder is gone
    save(mgr, 4, {"w": torch.ones(1)})
    with caplog.at_level(logging.INFO, logger="tessera"):
        assert latest(mgr)[0] == 4
    assert not stale.exists() and stale.name in caplog.text


def test_no_room_for_another_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path)
    save(mgr, 1, {"w": torch.ones(1000)})
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=100))
    with pytest.raises(OSError, match=r"no space left for a checkpoint: it needs ~0.0 MiB \(the size of step 1\)"):
        save(mgr, 2, {"w": torch.ones(1000)})
    assert mgr.steps() == [1] and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_save_that_fills_the_disk_says_so(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path)
    usage = shutil.disk_usage(tmp_path)
    with pytest.raises(OSError, match="no space left while saving a checkpoint") as info:
        with mgr.saving(1, META):
            monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=0))
            raise RuntimeError("[enforce fail at inline_container.cc] . unexpected pos 29294976 vs 29294864")
    assert info.value.errno == errno.ENOSPC and ".step_00000001." in info.value.filename


def test_resaving_a_step_replaces_an_incomplete_folder(tmp_path):
    mgr = CheckpointManager(tmp_path)
    save(mgr, 5, {"w": torch.ones(1)})
    (mgr.path_for(5) / RECORD).unlink()
    save(mgr, 5, {"w": torch.zeros(1)})
    assert torch.equal(latest(mgr)[1]["w"], torch.zeros(1))


class Payload:
    """An arbitrary class: unpickling it could run code, so weights_only loading must refuse it."""


def test_weights_only_rejects_arbitrary_objects(tmp_path):
    torch.save({"evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="[Ww]eights.only"):
        load_pt(tmp_path / "evil.pt")


def test_empty_folder():
    assert latest(CheckpointManager("/nonexistent/ckpt")) is None


def test_schedule_shape(tmp_path):
    assert warmup_cosine_factor(0, 100, 10, 0.0) == pytest.approx(0.1)
    assert warmup_cosine_factor(9, 100, 10, 0.0) == pytest.approx(1.0)
    assert warmup_cosine_factor(10, 100, 10, 0.0) == pytest.approx(1.0)
    assert warmup_cosine_factor(100, 100, 10, 0.1) == pytest.approx(0.1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, 100, 10, 0.1)
    state = sched.state_dict()
    # LambdaLR stores None for a plain function or lambda (whose parameters are then not saved and
    # a resumed run silently keeps its own) and the attributes of a callable object: the schedule's
    # parameters must be in the state, as plain data that weights_only loading accepts.
    assert [type(v) for v in state["lr_lambdas"]] == [dict]
    assert state["lr_lambdas"][0] == {"total_steps": 100, "warmup_steps": 10, "min_lr_ratio": 0.1}
    fresh = warmup_cosine(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), 1, 0)
    torch.save(state, tmp_path / "sched.pt")
    fresh.load_state_dict(torch.load(tmp_path / "sched.pt", weights_only=True))
    assert fresh.lr_lambdas[0](50) == pytest.approx(warmup_cosine_factor(50, 100, 10, 0.1))


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
