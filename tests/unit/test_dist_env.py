import pytest

from pipeline.cli.main import _array_task, parse_args
from pipeline.config.schema import ConfigError
from pipeline.runtime.dist import DistEnv, detect_env


def test_single_process_default():
    assert detect_env({}) == DistEnv(0, 1, 0)


def test_torchrun_variables():
    assert detect_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == DistEnv(3, 8, 1)


def test_srun_variables():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}
    assert detect_env(env) == DistEnv(5, 16, 1)


def test_torchrun_wins_over_slurm():
    # One srun task per node that runs torchrun: torchrun's variables describe the ranks.
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1"}
    assert detect_env(env) == DistEnv(9, 16, 1)


def test_single_slurm_task_is_not_distributed():
    assert not detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).is_distributed


def test_array_task_from_flags_or_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT", raising=False)
    args = parse_args(["stage", "shard", "cfg.yaml", "--num-tasks", "4", "--task-id", "2"])
    assert _array_task(args) == (4, 2)
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "8")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "12")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "10")
    assert _array_task(parse_args(["stage", "shard", "cfg.yaml"])) == (8, 2)
    with pytest.raises(ConfigError):
        _array_task(parse_args(["stage", "shard", "cfg.yaml", "--num-tasks", "0"]))


def test_overrides_after_options():
    args = parse_args(["run", "cfg.yaml", "a.b=1", "--run-dir", "/tmp/x", "c.d=2"])
    assert args.overrides == ["a.b=1", "c.d=2"] and args.run_dir == "/tmp/x"
    with pytest.raises(SystemExit):
        parse_args(["run", "cfg.yaml", "--bogus"])


def test_srun_tasks_get_torchrun_variables_with_their_node_layout(monkeypatch):
    """srun ranks: rank/world from SLURM_PROCID/NTASKS, the per-node rank count from
    SLURM_STEP_TASKS_PER_NODE (mosaicml-streaming needs LOCAL_WORLD_SIZE), the master from the node list."""
    from pipeline.runtime.dist import slurm_torch_env

    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "12", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
           "SLURM_STEP_TASKS_PER_NODE": "4(x2),4", "SLURM_JOB_ID": "1234", "MASTER_ADDR": "node7"}
    out = slurm_torch_env(env)
    assert out == {"RANK": "9", "WORLD_SIZE": "12", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "NODE_RANK": "2",
                   "MASTER_ADDR": "node7", "MASTER_PORT": str(29500 + 1234 % 1000)}
    uneven = {**env, "SLURM_STEP_TASKS_PER_NODE": "3,1", "SLURM_NODEID": "1", "SLURM_NTASKS": "4", "SLURM_PROCID": "3"}
    assert slurm_torch_env(uneven)["LOCAL_WORLD_SIZE"] == "1"
