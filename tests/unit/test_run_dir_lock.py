"""The stage lock: one writer per stage (per array task), stale leases taken over, live ones named."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from pipeline.runner.lock import LockHeld, StageLock, lease_is_live, live_holder, read_lease


def test_second_holder_is_refused_with_the_holder_named(tmp_path):
    with StageLock(tmp_path):
        with pytest.raises(LockHeld, match=rf"in use by pid {os.getpid()} on {socket.gethostname()}"):
            StageLock(tmp_path).acquire()
        assert live_holder(tmp_path)["pid"] == os.getpid()
    assert not (tmp_path / "lock.json").exists() and live_holder(tmp_path) is None


def test_array_tasks_lock_separately(tmp_path):
    with StageLock(tmp_path, task_id=0, num_tasks=2), StageLock(tmp_path, task_id=1, num_tasks=2):
        with pytest.raises(LockHeld):
            StageLock(tmp_path, task_id=1, num_tasks=2).acquire()


def test_lease_of_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / "lock.json").write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "job": "",
                                                    "token": "old", "started": time.time(),
                                                    "heartbeat": time.time()}))
    with StageLock(tmp_path):
        assert read_lease(tmp_path / "lock.json")["pid"] == os.getpid()
    assert "taking over the lock" in caplog.text


def test_other_node_holds_until_its_heartbeat_goes_stale(tmp_path):
    lease = {"host": "node-that-is-not-here", "pid": 1, "job": "4711", "token": "other", "started": time.time(),
             "heartbeat": time.time()}
    (tmp_path / "lock.json").write_text(json.dumps(lease))
    with pytest.raises(LockHeld, match="SLURM job 4711"):
        StageLock(tmp_path, stale_after_s=60).acquire()
    lease["heartbeat"] = time.time() - 120
    (tmp_path / "lock.json").write_text(json.dumps(lease))
    assert not lease_is_live(lease, stale_after_s=60)
    with StageLock(tmp_path, stale_after_s=60):
        assert read_lease(tmp_path / "lock.json")["host"] == socket.gethostname()


def test_heartbeat_refreshes_the_lease(tmp_path):
    with StageLock(tmp_path, heartbeat_s=0.05):
        first = read_lease(tmp_path / "lock.json")["heartbeat"]
        deadline = time.time() + 10
        while read_lease(tmp_path / "lock.json")["heartbeat"] == first:
            assert time.time() < deadline, "the heartbeat thread never refreshed the lease"
            time.sleep(0.02)


def test_release_leaves_a_lease_that_is_not_ours(tmp_path):
    lock = StageLock(tmp_path).acquire()
    lock._stop.set()
    lock._thread.join()
    taken = {"host": "elsewhere", "pid": 1, "job": "", "token": "other", "started": 0, "heartbeat": time.time()}
    (tmp_path / "lock.json").write_text(json.dumps(taken))
    lock.release()
    assert read_lease(tmp_path / "lock.json")["token"] == "other"


def test_lock_files_are_not_work_and_survive_force(tmp_path):
    from pipeline.runner.lock import is_lock_file
    from pipeline.runner.rundir import RunDir
    from pipeline.runner.stage import _clear_stage_dir

    assert [is_lock_file(n) for n in ("lock.json", ".lock", "lock.task-3.json", ".lock.task-3")] == [True] * 4
    assert not any(is_lock_file(n) for n in ("log.txt", "locker.json", "manifest.json"))
    stage = tmp_path / "shard"
    with StageLock(stage, task_id=1, num_tasks=2):
        assert RunDir(tmp_path).state("shard").state == "not started"  # a lock alone is no work
        (stage / "train").mkdir()
        _clear_stage_dir(stage)  # what --force does
        assert sorted(p.name for p in stage.iterdir()) == [".lock.task-1", "lock.task-1.json"]
