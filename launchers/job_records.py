"""The run's SLURM jobs: recorded at submission, queried for `tessera status`, cancelled by `tessera cancel`.

    RUN_DIR/slurm/jobs.json      every submission (time, executor, per stage: job id, array size, dependencies)
    RUN_DIR/slurm/events.jsonl   requeues and refusals to requeue, one JSON line each
    RUN_DIR/slurm/<stage>/       submitit's pickles and the jobs' output files

Job states come from `scontrol show job` (it knows finished jobs for MinJobAge, 300 s by default)
and, when the cluster keeps accounting, from `sacct` after that.
"""
from __future__ import annotations

import fcntl
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from pipeline.runtime.io import atomic_write_json, read_json

LIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
               "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED", "PREEMPTED"}


def slurm_dir(run_dir) -> Path:
    return Path(run_dir) / "slurm"


def jobs_path(run_dir) -> Path:
    return slurm_dir(run_dir) / "jobs.json"


@contextmanager
def _records_lock(run_dir):
    """Serialise read-modify-write of jobs.json (two submitters, or a chain job and a user)."""
    folder = slurm_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".jobs.lock", "a") as handle:
        fcntl.lockf(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)


def read_records(run_dir) -> dict:
    path = jobs_path(run_dir)
    if not path.is_file():
        return {"submissions": []}
    return read_json(path)


def record_submission(run_dir, executor: str, jobs: dict, **details) -> None:
    """Append one submission, atomically; `jobs` maps stage -> {"job_id", "array_tasks", "depends_on", ...}.
    Called after each stage is submitted, so a failure half-way leaves the jobs already queued on record."""
    with _records_lock(run_dir):
        records = read_records(run_dir)
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "executor": executor, **details, "jobs": jobs}
        records["submissions"].append(entry)
        atomic_write_json(jobs_path(run_dir), records)


def update_last_submission(run_dir, stage: str, job: dict) -> None:
    with _records_lock(run_dir):
        records = read_records(run_dir)
        records["submissions"][-1]["jobs"][stage] = job
        atomic_write_json(jobs_path(run_dir), records)


def latest_jobs(run_dir) -> dict:
    """stage -> its most recent SLURM job record (later submissions win)."""
    latest = {}
    for submission in read_records(run_dir)["submissions"]:
        if submission.get("executor") != "slurm":
            continue
        latest.update(submission["jobs"])
    return latest


def _scontrol_states(job_id: str) -> list[dict]:
    """One dict per job (or array task) of `scontrol show job -o`, [] when SLURM no longer knows it."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    jobs = []
    for line in out.stdout.splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        if "JobState" in fields:
            jobs.append(fields)
    return jobs


def _sacct_states(job_id: str) -> list[str]:
    if shutil.which("sacct") is None:
        return []
    try:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", str(job_id)], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    return [line.split("|")[1].split()[0] for line in out.stdout.splitlines() if "|" in line]


def job_info(job_id: str) -> tuple[list[str], int, str]:
    """(state of every task of the job, restarts of the job, its nodes as SLURM writes them: "n[1-2]",
    array tasks' joined by ","): (["COMPLETED", "RUNNING"], 0, "n1,n2"); states [] if unknown, nodes ""
    once only accounting knows the job."""
    jobs = _scontrol_states(job_id)
    if not jobs:
        return _sacct_states(job_id), 0, ""
    restarts = max(int(j.get("Restarts", "0") or 0) for j in jobs)
    nodes = []
    for job in jobs:
        if job.get("NodeList", "(null)") != "(null)" and job["NodeList"] not in nodes:
            nodes.append(job["NodeList"])
    return [j["JobState"] for j in jobs], restarts, ",".join(nodes)


def job_states(job_id: str) -> tuple[list[str], int]:
    """(state of every task of the job, restarts of the job): ["COMPLETED", "RUNNING"], or [] if unknown."""
    states, restarts, _ = job_info(job_id)
    return states, restarts


def summarize(states: list[str]) -> str:
    if not states:
        return "unknown (gone from SLURM)"
    counts: dict[str, int] = {}
    for state in states:
        counts[state] = counts.get(state, 0) + 1
    if len(states) == 1:
        return states[0]
    return " ".join(f"{state} x{n}" for state, n in counts.items())


def stage_job_column(run_dir) -> dict[str, str]:
    """stage -> "job 123 COMPLETED nodes=n[1-2]" (arrays: "job 124[2] COMPLETED x2 nodes=n1,n2"; requeued:
    "... restarts=1"; nodes while SLURM still knows the job)."""
    column = {}
    if shutil.which("scontrol") is None and shutil.which("sacct") is None:
        return {stage: f"job {job['job_id']} (no SLURM here)" for stage, job in latest_jobs(run_dir).items()}
    for stage, job in latest_jobs(run_dir).items():
        states, restarts, nodes = job_info(job["job_id"])
        array = f"[{job['array_tasks']}]" if job.get("array_tasks", 1) > 1 else ""
        text = f"job {job['job_id']}{array} {summarize(states)}"
        if restarts:
            text += f" restarts={restarts}"
        if nodes:
            text += f" nodes={nodes}"
        column[stage] = text
    return column


def live_jobs(run_dir) -> dict[str, str]:
    """stage -> job id of the run's recorded jobs that are still pending or running."""
    live = {}
    for stage, job in latest_jobs(run_dir).items():
        states, _ = job_states(job["job_id"])
        if any(state in LIVE_STATES for state in states):
            live[stage] = job["job_id"]
    return live


def cancel(run_dir) -> list[str]:
    """scancel every recorded job of the run still pending or running; returns their ids."""
    live = live_jobs(run_dir)
    ids = sorted(set(live.values()), key=lambda j: int(str(j).split("_")[0]))
    if ids:
        subprocess.run(["scancel", *ids], check=True, timeout=60)
    return ids
