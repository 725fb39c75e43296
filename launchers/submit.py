"""`tessera submit CONFIG [overrides] [--run-dir D] [--stages a,b] [--dry-run] [--executor slurm|local]`.

Every unfinished stage becomes one SLURM job (a job array for shard / precompute_codes / sample
when `launcher.<stage>.array_tasks` > 1), submitted through submitit and chained with
`--dependency=afterok:...` and `--kill-on-invalid-dep=yes`, so a failed stage cancels everything
downstream. submitit keeps its pickles and the jobs' output under RUN_DIR/slurm/<stage>/ (the run
directory is on a shared file system, which submitit needs). The job ids go to
RUN_DIR/slurm/jobs.json for `tessera status` and `tessera cancel`.

`--executor local` runs the same graph on this machine, stage after stage, through submitit's
LocalExecutor (same StageJob, ranks and array tasks as local processes).
"""
from __future__ import annotations

import os
import shlex
import socket
import sys
from pathlib import Path

import submitit

# _make_sbatch_string renders the script submitit would submit; --dry-run prints it without a
# cluster (SlurmExecutor itself refuses to exist where srun is missing).
from submitit.slurm.slurm import _make_sbatch_string

from pipeline.config.root import load_config
from pipeline.config.schema import ConfigError
from pipeline.runner.rundir import check_run_dir_name
from pipeline.runner.stage import STAGE_NAMES, preflight

from .graph import JobSpec, build_graph, format_graph, select_stages
from .job_records import live_jobs, record_submission, slurm_dir, update_last_submission
from .stage_job import StageJob

REPO = Path(__file__).resolve().parents[1]  # the checkout whose code the jobs run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dependency(spec: JobSpec, job_ids: dict) -> str | None:
    ids = [job_ids[dep] for dep in spec.depends_on if dep in job_ids]
    return "afterok:" + ":".join(ids) if ids else None


def _parameters(spec: JobSpec, job_ids: dict, signal_delay_s: int) -> dict:
    params = spec.submitit_parameters(signal_delay_s)
    dependency = _dependency(spec, job_ids)
    if dependency:
        params["dependency"] = dependency
        params["additional_parameters"] = {**params["additional_parameters"], "kill_on_invalid_dep": "yes"}
    return params


def _stage_job(spec: JobSpec, config: str, run_dir: Path, overrides: list[str], max_requeues: int,
               local_port: int | None = None) -> StageJob:
    return StageJob(spec.stage, config, str(run_dir), overrides, repo=str(REPO), python=sys.executable,
                    num_tasks=spec.array_tasks, max_requeues=max_requeues, local_port=local_port)


def dry_run_text(specs: list[JobSpec], run_dir: Path, signal_delay_s: int) -> str:
    """The dependency graph and every sbatch script, with <stage> standing for job ids not yet known."""
    placeholders = {spec.stage: f"<{spec.stage}>" for spec in specs}
    parts = ["dependency graph (afterok, --kill-on-invalid-dep=yes):", format_graph(specs)]
    for spec in specs:
        params = _parameters(spec, placeholders, signal_delay_s)
        command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit",
                            shlex.quote(str(slurm_dir(run_dir) / spec.stage / "%j"))])
        if spec.array_tasks > 1:
            params["map_count"] = spec.array_tasks
        script = _make_sbatch_string(command=command, folder=slurm_dir(run_dir) / spec.stage / "%j", **params)
        parts += ["", f"# ---- {spec.stage}: sbatch script ----", script.rstrip()]
    return "\n".join(parts)


def submit(config: str, overrides: list[str], run_dir: str | None, stages: str | None, *, executor: str = "slurm",
           dry_run: bool = False) -> int:
    cfg = load_config(config, overrides)
    run_path = (Path(run_dir) if run_dir else Path("runs") / cfg.name).resolve()
    check_run_dir_name(run_path, slurm=True)  # it is pasted into the sbatch scripts submitit writes
    config_path = str(Path(config).resolve())  # the jobs start in the repository, not necessarily here
    selected = select_stages(stages, list(STAGE_NAMES))
    preflight(cfg, selected, run_dir=run_path)
    specs, done = build_graph(cfg, run_path, selected)
    for stage in done:
        print(f"[tessera] {stage}: done already; not submitted")
    if not specs:
        print(f"[tessera] nothing to submit: every selected stage is done in {run_path}")
        return 0
    delay = cfg.launcher.signal_delay_s
    if dry_run:
        print(dry_run_text(specs, run_path, delay))
        return 0
    if executor == "local":
        return _run_local(specs, cfg, config_path, run_path, overrides)
    if executor != "slurm":
        raise ConfigError(f"--executor: {executor!r}; choose 'slurm' or 'local'")
    return _submit_slurm(specs, cfg, config_path, run_path, overrides)


def _submit_slurm(specs, cfg, config_path: str, run_dir: Path, overrides: list[str]) -> int:
    if submitit.SlurmExecutor.affinity() < 0:
        raise ConfigError("tessera submit: SLURM is not available here (no srun/sbatch on PATH); use --dry-run to "
                          "see the scripts, or --executor local")
    live = live_jobs(run_dir)
    if live:
        raise ConfigError(f"{run_dir} already has jobs pending or running ("
                          + ", ".join(f"{stage}: {job}" for stage, job in live.items())
                          + f"); wait for them, or `tessera cancel {run_dir}` first")
    # The jobs import launchers/ and pipeline/ from this checkout: sbatch exports our environment.
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in paths if p != str(REPO)])
    launcher = cfg.launcher
    record_submission(run_dir, "slurm", {}, config=config_path, overrides=list(overrides), repo=str(REPO))
    job_ids: dict[str, str] = {}
    for spec in specs:
        ex = submitit.SlurmExecutor(folder=slurm_dir(run_dir) / spec.stage / "%j",
                                    max_num_timeout=launcher.max_requeues)
        ex.update_parameters(**_parameters(spec, job_ids, launcher.signal_delay_s))
        job = _stage_job(spec, config_path, run_dir, overrides, launcher.max_requeues)
        if spec.array_tasks > 1:
            jobs = ex.map_array(job, list(range(spec.array_tasks)))
            job_id = jobs[0].job_id.split("_")[0]
            output = jobs[0].paths.stdout
        else:
            submitted = ex.submit(job, 0)
            job_id, output = submitted.job_id, submitted.paths.stdout
        job_ids[spec.stage] = job_id
        update_last_submission(run_dir, spec.stage, {"job_id": job_id, "array_tasks": spec.array_tasks,
                                                     "depends_on": spec.depends_on, "output": str(output)})
        after = f" after {', '.join(spec.depends_on)}" if spec.depends_on else ""
        print(f"[tessera] {spec.stage}: submitted job {job_id}"
              f"{f' (array of {spec.array_tasks})' if spec.array_tasks > 1 else ''}{after}", flush=True)
    print(f"[tessera] run directory: {run_dir}  (`tessera status {shlex.quote(str(run_dir))}`, "
          f"`tessera cancel {shlex.quote(str(run_dir))}`; job output in {slurm_dir(run_dir)}/<stage>/)")
    return 0


def _run_local(specs, cfg, config_path: str, run_dir: Path, overrides: list[str]) -> int:
    """Stage after stage on this machine: same jobs, ranks and array tasks as local processes."""
    record_submission(run_dir, "local", {spec.stage: {"array_tasks": spec.array_tasks} for spec in specs},
                      config=config_path, overrides=list(overrides), repo=str(REPO))
    for spec in specs:
        ex = submitit.LocalExecutor(folder=slurm_dir(run_dir) / "local" / spec.stage)
        ex.update_parameters(timeout_min=spec.time_min, tasks_per_node=spec.ranks, nodes=1)
        job = _stage_job(spec, config_path, run_dir, overrides, cfg.launcher.max_requeues,
                         local_port=_free_port() if spec.ranks > 1 else None)
        jobs = ex.map_array(job, list(range(spec.array_tasks))) if spec.array_tasks > 1 else [ex.submit(job, 0)]
        try:
            for j in jobs:
                j.results()
        except Exception as err:  # submitit re-raises the job's error with its traceback text
            print(f"tessera: error: stage {spec.stage} failed (local executor): {str(err).strip().splitlines()[-1]}; "
                  f"output in {jobs[0].paths.stdout.parent}", file=sys.stderr)
            return 1
        print(f"[tessera] {spec.stage}: done (local executor)", flush=True)
    print(f"[tessera] run directory: {run_dir}  (see `tessera status {shlex.quote(str(run_dir))}`)")
    return 0
