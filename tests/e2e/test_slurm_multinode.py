"""The stages across the nodes of a real SLURM cluster: tests/slurm/local_cluster.sh's 2 nodes
(`.ci/run` starts it; every test skips, saying why, when fewer than 2 nodes answer).

Each node is its own network namespace, hostname and /dev/shm on one machine, so ranks on
different nodes meet only through the first node's address, as on a real cluster. The reference of
every multi-node run is the same number of ranks on one node (torchrun) or one task: on CPU the
runs are bitwise equal; the one exception is the elastic resume, whose tolerance is stated there.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from testkit import (
    REPO,
    TINY_TOKENIZER,
    assert_bitwise_equal,
    copy_until_prior,
    prior_weights,
    require_slurm_cluster,
    tessera,
)

pytestmark = pytest.mark.e2e

NODES = ("tessera-n1", "tessera-n2")
CODES = [*TINY_TOKENIZER, "tokenizer_train.steps=10", "precompute.store_latents=true"]
# The prior of tests/test_train_prior.py, 40 steps (about 10 s) so that a signal lands mid-training.
PRIOR = ["prior.preset=rq-demo", "prior.num_classes=10", "prior.embed_dim=32", "prior.n_head=4",
         "prior.spatial_layers=2", "prior.depth_layers=1", "prior_train.batch_size=8", "prior_train.lr=3e-3",
         "prior_train.eval_images=16", "prior_train.warmup_steps=0", "prior_train.sample_every=0",
         "prior_train.steps=40", "prior_train.checkpoint_every=10", "prior_train.eval_every=40"]
# Small requests so that one rank fits each 2-core node; the stated collective timeout of the killed-node test.
COLLECTIVE_TIMEOUT_S = 30
LAUNCH = [f"launcher.collective_timeout_s={COLLECTIVE_TIMEOUT_S}"] + [
    f"launcher.{stage}.{key}" for stage in ("shard", "train_tokenizer", "precompute_codes", "train_prior")
    for key in ("cpus_per_task=1", "mem_gb=1", "time_min=10")]
TWO_NODES = {stage: [f"launcher.{stage}.nodes=2", f"launcher.{stage}.tasks_per_node=1"]
             for stage in ("train_tokenizer", "train_prior")}
# Array tasks on whole nodes: the two tasks of an array run at once, one on each node.
ARRAYS = [f"launcher.{stage}.{key}" for stage in ("shard", "precompute_codes")
          for key in ("array_tasks=2", "exclusive=true")]
FAST_PROGRESS = {"TESSERA_PROGRESS_INTERVAL_S": "0.3"}


@pytest.fixture(scope="module")
def cluster():
    require_slurm_cluster(NODES)


def submit(run_dir, *args, env_extra=None):
    return tessera("submit", "configs/demo-rq.yaml", "--run-dir", str(run_dir), *CODES, *PRIOR, *LAUNCH, *args,
                   env_extra=env_extra)


def run_local(run_dir, stages, *args, nproc=1):
    return tessera("run", "configs/demo-rq.yaml", "--run-dir", str(run_dir), "--stages", stages, *CODES, *PRIOR,
                   *args, nproc=nproc)


def job_id(run_dir, stage) -> str:
    from launchers.job_records import latest_jobs

    return latest_jobs(run_dir)[stage]["job_id"]


def wait_for_jobs(run_dir, timeout_s=300):
    from launchers.job_records import live_jobs

    deadline = time.monotonic() + timeout_s
    while live_jobs(run_dir):
        assert time.monotonic() < deadline, f"jobs of {run_dir} still running after {timeout_s} s"
        time.sleep(0.5)


def wait_until(predicate, what, timeout_s=180):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not after {timeout_s} s"
        time.sleep(0.2)


def outputs(run_dir, stage) -> dict:
    return json.loads((Path(run_dir) / stage / "done.json").read_text())["outputs"]


def stage_log(run_dir, stage) -> str:
    return (Path(run_dir) / stage / "log.txt").read_text()


def hosts_in_log(text: str) -> set[str]:
    """The hosts that wrote log lines ("12:00:00 [tessera-n2 job 7 rank 1/2] INFO ...")."""
    return {node for node in NODES if f"[{node} job " in text}


@pytest.fixture(scope="module")
def codes_on_one_node(tmp_path_factory):
    """The reference: shard and precompute_codes as one task, train_tokenizer on 2 ranks of one node."""
    run_dir = tmp_path_factory.mktemp("one-node") / "run"
    run_local(run_dir, "shard")
    run_local(run_dir, "train_tokenizer", nproc=2)
    run_local(run_dir, "precompute_codes")
    return run_dir


@pytest.fixture(scope="module")
def codes_on_two_nodes(cluster, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("two-nodes") / "run"
    submit(run_dir, "--stages", "shard,train_tokenizer,precompute_codes", *ARRAYS, *TWO_NODES["train_tokenizer"])
    wait_for_jobs(run_dir)
    return run_dir


@pytest.fixture(scope="module")
def prior_references(codes_on_one_node, tmp_path_factory):
    """ZeRO stage -> run directory of 2 ranks on one node, 40 steps, uninterrupted."""
    runs = {}
    for zero_stage in (2, 3):
        run_dir = copy_until_prior(codes_on_one_node, tmp_path_factory.mktemp(f"zero{zero_stage}") / "run")
        run_local(run_dir, "train_prior", f"prior_train.zero_stage={zero_stage}", nproc=2)
        runs[zero_stage] = run_dir
    return runs


def test_array_stages_spread_over_both_nodes_and_the_tokenizer_trains_across_them(codes_on_two_nodes,
                                                                                  codes_on_one_node):
    for stage in ("shard", "train_tokenizer", "precompute_codes"):
        assert outputs(codes_on_two_nodes, stage) == outputs(codes_on_one_node, stage), stage
    # Both array tasks and both tokenizer ranks ran, each on its own node.
    for stage in ("shard", "precompute_codes", "train_tokenizer"):
        assert hosts_in_log(stage_log(codes_on_two_nodes, stage)) == set(NODES), stage
    status = tessera("status", str(codes_on_two_nodes)).stdout
    rows = {line.split()[0]: line for line in status.splitlines()[3:]}
    assert "[2] COMPLETED x2 nodes=" in rows["shard"] and "tessera-n1" in rows["shard"] \
        and "tessera-n2" in rows["shard"], status
    assert "COMPLETED nodes=tessera-n[1-2]" in rows["train_tokenizer"], status


def test_two_node_zero2_job_preempted_with_usr2_requeues_and_equals_one_node(codes_on_two_nodes, prior_references,
                                                                             tmp_path):
    """tessera submit (submitit): 2 nodes x 1 rank, ZeRO-2, preempted after its first checkpoint; the
    requeued job ends bitwise equal to 2 ranks on one node, uninterrupted."""
    run_dir = copy_until_prior(codes_on_two_nodes, tmp_path / "run")
    submit(run_dir, "--stages", "train_prior", "prior_train.zero_stage=2", *TWO_NODES["train_prior"],
           env_extra=FAST_PROGRESS)
    job = job_id(run_dir, "train_prior")
    log = run_dir / "train_prior" / "log.txt"
    wait_until(lambda: log.is_file() and "checkpoint saved" in log.read_text(), "a first checkpoint")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    wait_for_jobs(run_dir)
    # Every rank, on both nodes, wrote its part of the preemption checkpoint, and the requeued job resumed.
    for rank, node in enumerate(NODES):
        output = (run_dir / "slurm" / "train_prior" / job / f"{job}_{rank}_log.out").read_text()
        assert f"hostname={node}" in output and "USR2 received: checkpoint saved" in output, output[-3000:]
    assert "resumed from checkpoint at step" in log.read_text() and hosts_in_log(log.read_text()) == set(NODES)
    events = [json.loads(line) for line in (run_dir / "slurm" / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["requeue"]
    assert "restarts=1 nodes=tessera-n[1-2]" in tessera("status", str(run_dir)).stdout
    assert_bitwise_equal(prior_weights(run_dir), prior_weights(prior_references[2]))


def test_two_node_zero3_sbatch_job_requeued_by_scontrol_equals_one_node(codes_on_two_nodes, prior_references,
                                                                       tmp_path):
    """launchers/slurm/train_prior.sbatch: srun starts the ranks, pipeline/dist.py finds the first node
    from SLURM's variables; ZeRO-3, requeued after its first checkpoint, bitwise equal to one node."""
    run_dir = copy_until_prior(codes_on_two_nodes, tmp_path / "run")
    env = {**os.environ, **FAST_PROGRESS, "TESSERA_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "train_prior.out"
    job = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
         "--mem=1G", f"--output={out}", "launchers/slurm/train_prior.sbatch", "configs/demo-rq.yaml", str(run_dir),
         *CODES, *PRIOR, *LAUNCH, "prior_train.zero_stage=3"],
        cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.strip()
    log = run_dir / "train_prior" / "log.txt"
    wait_until(lambda: log.is_file() and "checkpoint saved" in log.read_text(), "a first checkpoint")
    subprocess.run(["scontrol", "requeue", job], check=True)
    wait_until(lambda: (run_dir / "train_prior" / "done.json").is_file(), "the requeued job", timeout_s=300)
    output = out.read_text()
    # The requeued job resumed on both nodes, and each rank stopped once: in the loop it checkpoints
    # ("TERM received: checkpoint saved"); when the requeue lands outside it (model build, eval,
    # export) it stops at once and keeps the last checkpoint. Each stop is one rank-tagged log line
    # (the CLI's own one-line echo of it carries no rank, so it is not counted).
    stops = re.findall(r"rank (\d)/2\] WARNING SIGTERM received", output)
    assert sorted(stops) == ["0", "1"] and "restart 1" in output, output[-3000:]
    assert "resumed from checkpoint at step" in log.read_text() and hosts_in_log(log.read_text()) == set(NODES)
    assert_bitwise_equal(prior_weights(run_dir), prior_weights(prior_references[3]))


def node_processes(job: str, node: str) -> list[int]:
    """The job's processes on one node (its submitit task and the stage under it), from /proc."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SLURM_JOB_ID={job}".encode() in environ and f"SLURMD_NODENAME={node}".encode() in environ:
            pids.append(int(proc.name))
    return pids


def test_killed_node_fails_the_job_in_time_and_it_resumes_on_one_node_within_tolerance(codes_on_two_nodes,
                                                                                      prior_references, tmp_path):
    """A 2-node ZeRO-2 job loses its second node's processes (SIGKILL) after its first checkpoint.
    The surviving rank sees its peer's sockets close, or srun --kill-on-bad-exit ends it; at the
    latest launcher.collective_timeout_s ends a rank stuck in a collective: the job fails within
    that timeout plus 60 s. Resubmitted on 1 node x 1 rank, it resumes (elastic) from the last
    complete checkpoint through DeepSpeed's universal checkpoint: same global batches in the same
    order, but one rank sums each batch's gradient where two ranks all-reduce halves, so float
    rounding only: atol 2e-4 / rtol 1e-3 on the weights (tests/test_train_prior.py's elastic bound)
    and 2e-3 on the validation loss."""
    run_dir = copy_until_prior(codes_on_two_nodes, tmp_path / "run")
    submit(run_dir, "--stages", "train_prior", "prior_train.zero_stage=2", *TWO_NODES["train_prior"])
    job = job_id(run_dir, "train_prior")
    checkpoints = run_dir / "train_prior" / "checkpoints"
    wait_until(lambda: checkpoints.is_dir() and any(checkpoints.glob("step_*")), "a first checkpoint")
    victims = node_processes(job, NODES[1])
    assert victims, "no process of the job on the second node"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_for_jobs(run_dir, timeout_s=COLLECTIVE_TIMEOUT_S + 120)
    seconds = time.monotonic() - killed
    # A bound, not a speed: without the timeout a rank stuck in a collective would wait forever;
    # the margin covers the processes' exit and SLURM's bookkeeping on a loaded 2-core machine.
    assert seconds < COLLECTIVE_TIMEOUT_S + 60, f"the job ran {seconds:.0f} s after its node was killed"
    from launchers.job_records import job_states

    assert job_states(job)[0] == ["FAILED"]
    assert not (run_dir / "train_prior" / "done.json").exists()

    submit(run_dir, "--stages", "train_prior", "prior_train.zero_stage=2", "launcher.train_prior.nodes=1",
           "launcher.train_prior.tasks_per_node=1")
    wait_for_jobs(run_dir)
    log = stage_log(run_dir, "train_prior")
    assert "elastic resume" in log and "written by 2 rank(s), this run has 1" in log
    ours, ref = prior_weights(run_dir), prior_weights(prior_references[2])
    for key in ref:
        torch.testing.assert_close(ours[key], ref[key], atol=2e-4, rtol=1e-3)
    done = json.loads((run_dir / "train_prior" / "done.json").read_text())
    ref_done = json.loads((prior_references[2] / "train_prior" / "done.json").read_text())
    assert abs(done["metrics"]["val_loss"] - ref_done["metrics"]["val_loss"]) < 2e-3
