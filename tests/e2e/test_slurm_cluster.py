"""The launchers on a real SLURM cluster: `tessera submit` (submitit) and the plain sbatch scripts.

Needs the cluster of tests/slurm/local_cluster.sh (`.ci/run` starts it; these jobs use one of its
nodes); every test here skips, saying why, when no cluster answers (fails under `.ci/run`). The
pipeline is the demo config shrunk to seconds (16 px, a few images, 300 prior steps so that a
preemption lands mid-training), with the shard and sample stages as 2-task job arrays and the
prior on 2 srun ranks.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from testkit import REPO, TINY_TOKENIZER, copy_until_prior, require_slurm_cluster, tessera

pytestmark = pytest.mark.e2e

RUN = [*TINY_TOKENIZER, "tokenizer_train.steps=10",
       "prior.embed_dim=32", "prior.spatial_layers=1", "prior.depth_layers=1", "prior_train.engine=ddp",
       "prior_train.steps=300", "prior_train.checkpoint_every=50", "prior_train.batch_size=8",
       "prior_train.eval_images=16", "prior_train.sample_every=0",
       "sample.num_samples=20", "sample.chunk_size=10", "sample.batch_size=8",
       "score.download_weights=false", "score.kid_subset_size=10", "score.classifier_check=false"]
# What each job asks for: small enough for a 2-core node; arrays and 2 ranks where the stage allows.
LAUNCH = ["launcher.shard.array_tasks=2", "launcher.sample.array_tasks=2", "launcher.train_prior.tasks_per_node=2",
          "launcher.train_tokenizer.tasks_per_node=1", "launcher.sample.tasks_per_node=1"] + [
    f"launcher.{stage}.{key}" for stage in ("shard", "train_tokenizer", "precompute_codes", "train_prior", "sample",
                                            "score") for key in ("cpus_per_task=1", "mem_gb=1", "time_min=10")]
STAGES = ("shard", "train_tokenizer", "precompute_codes", "train_prior", "sample", "score")
FAST_PROGRESS = {"TESSERA_PROGRESS_INTERVAL_S": "0.3"}  # a progress line every 0.3 s in the job output
# A run directory and an override value no shell may interpret.
NASTY = "dir with spaces 'quote\" $(touch PWNED); echo x"


@pytest.fixture(scope="module")
def cluster():
    require_slurm_cluster()


def outputs(run_dir, stage) -> dict:
    """What a stage produced: its output hashes; for score, the metrics (metrics.json also holds paths)."""
    if stage == "score":
        return json.loads((Path(run_dir) / "score" / "metrics.json").read_text())["metrics"]
    return json.loads((Path(run_dir) / stage / "done.json").read_text())["outputs"]


def wait_for_jobs(run_dir, timeout_s=400):
    from launchers.job_records import live_jobs

    deadline = time.monotonic() + timeout_s
    while live_jobs(run_dir):
        assert time.monotonic() < deadline, f"jobs of {run_dir} still running after {timeout_s} s"
        time.sleep(1)


def wait_for_job(job_id, timeout_s=120):
    from launchers.job_records import LIVE_STATES, job_states

    deadline = time.monotonic() + timeout_s
    while any(state in LIVE_STATES for state in job_states(job_id)[0]):
        assert time.monotonic() < deadline, f"job {job_id} still running after {timeout_s} s"
        time.sleep(1)


def wait_for_training(log: Path, run_dir, timeout_s=120):
    """Until the job's output shows a training step (the trainer's signal handler is installed)."""
    deadline = time.monotonic() + timeout_s
    while not (log.is_file() and "[train_prior] step " in log.read_text(errors="replace")):
        assert time.monotonic() < deadline, f"no training progress in {log} after {timeout_s} s"
        time.sleep(0.2)


def job_output(run_dir, stage) -> Path:
    from launchers.job_records import latest_jobs

    return Path(latest_jobs(run_dir)[stage]["output"].replace("%t", "0"))


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The reference: the same graph through `--executor local` (no SLURM), arrays and ranks included."""
    run_dir = tmp_path_factory.mktemp("local") / "run"
    out = tessera("submit", "configs/demo-rq.yaml", "--run-dir", str(run_dir), "--executor", "local", *RUN, *LAUNCH)
    for stage in STAGES:
        assert f"{stage}: done (local executor)" in out.stdout
    return run_dir


def test_submit_runs_the_pipeline_like_a_local_run_and_arrays_match_one_task(cluster, local_run, tmp_path):
    run_dir = tmp_path / "slurm-run"
    out = tessera("submit", "configs/demo-rq.yaml", "--run-dir", str(run_dir), *RUN, *LAUNCH)
    assert "shard: submitted job" in out.stdout and "(array of 2)" in out.stdout
    wait_for_jobs(run_dir)
    status = tessera("status", str(run_dir)).stdout
    for stage in STAGES:
        assert outputs(run_dir, stage) == outputs(local_run, stage), stage
    rows = {line.split()[0]: line for line in status.splitlines()[3:]}
    assert all(" done " in rows[stage] and "COMPLETED" in rows[stage] for stage in STAGES), status
    assert "[2] COMPLETED x2" in rows["shard"], status
    # The shard stage as one task writes the same manifest as the 2-task array.
    single = tmp_path / "one-task"
    tessera("run", "configs/demo-rq.yaml", "--run-dir", str(single), "--stages", "shard", *RUN)
    assert (single / "shard" / "manifest.json").read_bytes() == (run_dir / "shard" / "manifest.json").read_bytes()
    # Off a terminal the trainer writes plain progress lines, never bar redraws.
    log = job_output(run_dir, "train_prior").read_text()
    assert "\r" not in log and "[train_prior] step 300/300" in log
    again = tessera("submit", "configs/demo-rq.yaml", "--run-dir", str(run_dir), *RUN, *LAUNCH)
    assert "nothing to submit" in again.stdout


def test_submitit_job_preempted_mid_training_requeues_and_ends_with_the_same_weights(cluster, local_run, tmp_path):
    run_dir = copy_until_prior(local_run, tmp_path / "preempt")
    tessera("submit", "configs/demo-rq.yaml", "--run-dir", str(run_dir), "--stages", "train_prior", *RUN, *LAUNCH,
            env_extra=FAST_PROGRESS)
    from launchers.job_records import latest_jobs

    job_id = latest_jobs(run_dir)["train_prior"]["job_id"]
    wait_for_training(job_output(run_dir, "train_prior"), run_dir)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    wait_for_jobs(run_dir)
    events = [json.loads(line) for line in (run_dir / "slurm" / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["requeue"] and events[0]["stage"] == "train_prior"
    assert "restarts=1" in tessera("status", str(run_dir)).stdout
    log = job_output(run_dir, "train_prior").read_text()
    assert "requeueing job" in log and "restart 1 of job" in log and "USR2 received: checkpoint saved" in log
    assert outputs(run_dir, "train_prior") == outputs(local_run, "train_prior")


def test_sbatch_script_requeued_by_scontrol_resumes_and_never_interprets_user_values(cluster, local_run, tmp_path):
    run_dir = copy_until_prior(local_run, tmp_path / NASTY)
    override = f"data.root={NASTY}"
    env = {**os.environ, **FAST_PROGRESS, "TESSERA_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "train_prior.out"
    job_id = subprocess.run(
        ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
         "--mem=1G", f"--output={log}", "launchers/slurm/train_prior.sbatch", "configs/demo-rq.yaml", str(run_dir),
         *RUN, override], cwd=REPO, env=env, capture_output=True, text=True,
        check=True).stdout.strip()
    wait_for_training(log, run_dir)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    wait_for_job(job_id, timeout_s=200)
    text = log.read_text()
    assert "restart 1" in text and "TERM received: checkpoint saved" in text, text[-3000:]
    assert outputs(run_dir, "train_prior") == outputs(local_run, "train_prior")
    import yaml

    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["root"] == NASTY
    assert not list(REPO.glob("PWNED")) and not list(tmp_path.glob("PWNED"))


def test_failing_stage_cancels_its_dependents_and_status_shows_it(cluster, tmp_path):
    run_dir = tmp_path / "failing"
    # No shard stage in this run directory: train_tokenizer fails at once on its missing input.
    tessera("submit", "configs/demo-rq.yaml", "--run-dir", str(run_dir), "--stages",
            "train_tokenizer,precompute_codes", *RUN, *LAUNCH)
    wait_for_jobs(run_dir, timeout_s=120)
    rows = {line.split()[0]: line for line in tessera("status", str(run_dir)).stdout.splitlines()[3:]}
    assert "FAILED" in rows["train_tokenizer"], rows
    assert "CANCELLED" in rows["precompute_codes"], rows
    assert not (run_dir / "precompute_codes" / "log.txt").exists()  # it never started


def test_pipeline_sbatch_completes_the_demo_chain(cluster, local_run, tmp_path):
    run_dir = tmp_path / NASTY / "run"
    env = {**os.environ, "TESSERA_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    chain = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path / 'chain.out'}",
                            "launchers/slurm/pipeline.sbatch", "configs/demo-rq.yaml", str(run_dir), *RUN, *LAUNCH],
                           cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.strip()
    wait_for_job(chain)
    assert "train_prior: submitted job" in (tmp_path / "chain.out").read_text()
    wait_for_jobs(run_dir)
    for stage in STAGES:
        assert outputs(run_dir, stage) == outputs(local_run, stage), stage
    status = tessera("status", str(run_dir)).stdout
    assert status.count("COMPLETED") >= len(STAGES), status
    assert not list(REPO.glob("PWNED")) and not list(tmp_path.glob("**/PWNED"))


def test_cancel_stops_the_run_jobs(cluster, tmp_path):
    run_dir = tmp_path / "cancelled"
    # A dependency on a job that holds forever keeps the stage pending until cancelled.
    tessera("submit", "configs/demo-rq.yaml", "--run-dir", str(run_dir), "--stages", "shard,train_tokenizer",
            *RUN, *LAUNCH, "launcher.shard.sbatch_flags=[--begin=now+1hour]")
    out = tessera("cancel", str(run_dir))
    assert "cancelled job(s)" in out.stdout
    wait_for_jobs(run_dir, timeout_s=60)
    status = tessera("status", str(run_dir)).stdout
    assert "CANCELLED" in status and "train_tokenizer" in status
