"""launchers/ without a cluster: the stage graph, each stage's SLURM request, `tessera submit
--dry-run`, the sbatch chain's argv (user values never pass through a shell), the requeue bound of
a job, and `--executor local`. The real-cluster tests are in test_slurm_cluster.py."""
import json
import os
import pickle
import shlex
import subprocess
import sys

import pytest
from testkit import REPO, TINY_TOKENIZER, tessera

from launchers.graph import build_graph, job_spec
from launchers.sbatch_chain import sbatch_command
from launchers.stage_job import StageJob
from pipeline.config.root import load_config
from pipeline.config.schema import ConfigError

NASTY = "dir with spaces 'quote\" $(touch PWNED); echo x"


def test_job_spec_resolves_stage_resources_against_launcher_defaults():
    cfg = load_config("configs/imagenet256-rq.yaml", [
        "launcher.partition=gpu", "launcher.account=proj", "launcher.qos=high", "launcher.constraint=h100",
        "launcher.sbatch_flags=[--reservation=big]", "launcher.setup=[module load cuda, conda activate tessera]",
        "launcher.train_prior.partition=big-gpu", "launcher.train_prior.exclusive=true",
        "launcher.train_prior.sbatch_flags=[--gres=gpu:h100:8]", "launcher.shard.array_tasks=16"])
    prior = job_spec(cfg, "train_prior", ["precompute_codes"])
    assert (prior.nodes, prior.tasks_per_node, prior.partition, prior.qos, prior.exclusive) == (4, 8, "big-gpu",
                                                                                                "high", True)
    params = prior.submitit_parameters(120)
    assert params["ntasks_per_node"] == 8 and params["gpus_per_node"] == 8 and params["partition"] == "big-gpu"
    assert params["account"] == "proj" and params["constraint"] == "h100" and params["exclusive"] is True
    assert params["setup"] == ["module load cuda", "conda activate tessera"]
    assert params["additional_parameters"] == {"requeue": True, "reservation": "big", "gres": "gpu:h100:8"}
    # One dead rank ends the whole step (the others would wait in a collective until the timeout).
    assert params["srun_args"] == ["--kill-on-bad-exit=1"]
    assert "srun_args" not in job_spec(cfg, "score").submitit_parameters(120)
    opts = job_spec(cfg, "shard").sbatch_options()
    assert "--array=0-15" in opts and "--partition=gpu" in opts and "--reservation=big" in opts


def test_job_info_reads_states_restarts_and_nodes_of_every_array_task(monkeypatch):
    import launchers.job_records as jobs

    tasks = [{"JobState": "COMPLETED", "Restarts": "0", "NodeList": "n1", "ReqNodeList": "(null)"},
             {"JobState": "RUNNING", "Restarts": "1", "NodeList": "n[2-3]"},
             {"JobState": "PENDING", "Restarts": "0", "NodeList": "(null)"},
             {"JobState": "COMPLETED", "Restarts": "0", "NodeList": "n1"}]
    monkeypatch.setattr(jobs, "_scontrol_states", lambda job_id: tasks)
    assert jobs.job_info("7") == (["COMPLETED", "RUNNING", "PENDING", "COMPLETED"], 1, "n1,n[2-3]")
    monkeypatch.setattr(jobs, "_scontrol_states", lambda job_id: [])
    monkeypatch.setattr(jobs, "_sacct_states", lambda job_id: ["FAILED"])
    assert jobs.job_info("7") == (["FAILED"], 0, "")


def test_bad_launcher_values_are_config_errors():
    with pytest.raises(ConfigError, match="launcher.train_prior.array_tasks"):
        job_spec(load_config("configs/demo-rq.yaml", ["launcher.train_prior.array_tasks=4"]), "train_prior")
    with pytest.raises(ConfigError, match="launcher.score.sbatch_flags"):
        load_config("configs/demo-rq.yaml", ["launcher.score.sbatch_flags=[gres=gpu:1]"])


def test_graph_skips_finished_stages_and_depends_on_submitted_inputs(tmp_path):
    cfg = load_config("configs/demo-rq.yaml")
    (tmp_path / "shard").mkdir()
    (tmp_path / "shard" / "done.json").write_text("{}")
    specs, done = build_graph(cfg, tmp_path, ["shard", "train_tokenizer", "precompute_codes", "train_prior"])
    assert done == ["shard"]
    assert {s.stage: s.depends_on for s in specs} == {"train_tokenizer": [], "precompute_codes": ["train_tokenizer"],
                                                     "train_prior": ["train_tokenizer", "precompute_codes"]}


def test_dry_run_prints_the_graph_and_scripts_and_submits_nothing(tmp_path):
    run_dir = tmp_path / NASTY
    out = tessera("submit", "configs/demo-rq.yaml", "--run-dir", str(run_dir), "--dry-run",
                  "launcher.shard.array_tasks=2", "launcher.setup=[module load x]",
                  "launcher.signal_delay_s=300").stdout
    assert "dependency graph" in out and "train_prior       one job, 1 node(s) x 2 rank(s)" in out
    assert "#SBATCH --array=0-1%2" in out and "#SBATCH --dependency='afterok:<shard>'" in out
    assert "#SBATCH --kill-on-invalid-dep=yes" in out and "#SBATCH --signal=USR2@300" in out
    assert "module load x" in out
    assert shlex.quote(str(run_dir / "slurm" / "train_prior" / "%j")) in out  # the run dir is quoted
    assert not run_dir.exists()


def test_sbatch_chain_passes_user_values_as_single_arguments(tmp_path):
    cfg = load_config("configs/demo-rq.yaml", ["launcher.sample.array_tasks=3"])
    run_dir = tmp_path / NASTY
    override = f"data.root={NASTY}"
    cmd = sbatch_command(job_spec(cfg, "sample", ["train_prior"]), "configs/demo-rq.yaml", run_dir, [override],
                         {"train_prior": "17"}, 90)
    assert cmd[0] == "sbatch" and "--array=0-2" in cmd and "--dependency=afterok:17" in cmd
    assert "--kill-on-invalid-dep=yes" in cmd and "--signal=B:USR1@90" in cmd and "--gpus-per-node=0" in cmd
    assert cmd[-4].endswith("launchers/slurm/sample.sbatch")
    assert cmd[-3:] == ["configs/demo-rq.yaml", str(run_dir), override]  # argv items, never shell text


def test_stage_job_requeues_until_the_bound_then_refuses(tmp_path, monkeypatch):
    job = StageJob("train_prior", "c.yaml", str(tmp_path), ["a.b=1"], repo=".", python="python", max_requeues=2)
    job._returncode = 3  # the stage saved and stopped
    clone = pickle.loads(pickle.dumps(job))  # what submitit stores for the requeued job
    assert clone.command(0)[-5:] == ["--num-tasks", "1", "--task-id", "0", "a.b=1"] and clone._returncode is None
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    again = job.checkpoint(0)
    assert again is not None and again.function is job and again.args == (0,)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert job.checkpoint(0) is None
    events = [json.loads(line) for line in (tmp_path / "slurm" / "events.jsonl").read_text().splitlines()]
    assert [(e["event"], e["restarts"]) for e in events] == [("requeue", 2), ("not requeued", 2)]


@pytest.mark.e2e
def test_local_executor_runs_array_tasks_like_one_task(tmp_path):
    run = [*TINY_TOKENIZER]
    local = tmp_path / "local"
    out = tessera("submit", "configs/demo-rq.yaml", "--run-dir", str(local), "--stages", "shard", "--executor",
                  "local", "launcher.shard.array_tasks=2", *run)
    assert "shard: done (local executor)" in out.stdout
    single = tmp_path / "single"
    tessera("run", "configs/demo-rq.yaml", "--run-dir", str(single), "--stages", "shard", *run)
    assert (local / "shard" / "manifest.json").read_bytes() == (single / "shard" / "manifest.json").read_bytes()
    assert "nothing to submit" in tessera("submit", "configs/demo-rq.yaml", "--run-dir", str(local), "--stages",
                                          "shard", "--executor", "local", *run).stdout


@pytest.mark.parametrize("name", ["run\ntouch PWNED", "esc\x1b[31m"])
def test_run_dir_with_control_characters_is_refused_everywhere(tmp_path, name):
    run_dir = tmp_path / name
    for argv in (["submit", "configs/demo-rq.yaml", "--run-dir", str(run_dir), "--dry-run"],
                 ["run", "configs/demo-rq.yaml", "--run-dir", str(run_dir), "--stages", "shard"]):
        out = tessera(*argv, check=False)
        assert out.returncode == 2 and "control character" in out.stderr and "Traceback" not in out.stderr
    chain = subprocess.run([sys.executable, "-m", "launchers.sbatch_chain", "configs/demo-rq.yaml", str(run_dir)],
                           cwd=REPO, capture_output=True, text=True)
    assert chain.returncode == 2 and "control character" in chain.stderr
    # The stage scripts refuse it before anything runs (srun is never reached: it is not installed here).
    script = (f"source launchers/slurm/common.sh; srun() {{ touch {shlex.quote(str(tmp_path / 'RAN'))}; }}; "
              f"tessera_stage shard configs/demo-rq.yaml \"$RUN_DIR\"")
    shell = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True,
                           env={**os.environ, "RUN_DIR": str(run_dir)})
    assert shell.returncode == 2 and "control character" in shell.stderr
    assert not (tmp_path / "RAN").exists() and not run_dir.exists() and not (REPO / "PWNED").exists()


def test_run_dir_with_a_percent_sign_is_refused_for_slurm_only(tmp_path):
    """SLURM expands '%' in output file names (%j: the job id): logs would land elsewhere."""
    run_dir = tmp_path / "run%j"
    out = tessera("submit", "configs/demo-rq.yaml", "--run-dir", str(run_dir), "--dry-run", check=False)
    assert out.returncode == 2 and "contains '%'" in out.stderr and "Traceback" not in out.stderr
    chain = subprocess.run([sys.executable, "-m", "launchers.sbatch_chain", "configs/demo-rq.yaml", str(run_dir)],
                           cwd=REPO, capture_output=True, text=True)
    assert chain.returncode == 2 and "contains '%'" in chain.stderr
    assert not run_dir.exists()
    # A local run has no output patterns: the same name works there.
    tessera("run", "configs/demo-rq.yaml", "--run-dir", str(run_dir), "--stages", "shard", "data.num_train=16",
            "data.num_val=4")
    assert (run_dir / "shard" / "done.json").is_file()
