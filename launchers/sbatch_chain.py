"""What launchers/slurm/pipeline.sbatch runs: submit launchers/slurm/<stage>.sbatch for every
unfinished stage, chained with afterok, with the resources of the config's launcher section.

    python -m launchers.sbatch_chain CONFIG RUN_DIR [key=value ...] [--stages a,b]

Every value reaches sbatch as one argv item (no shell), and sbatch hands CONFIG, RUN_DIR and the
overrides to the stage script as its arguments, which passes them on as "$@".
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from pipeline.config.root import load_config
from pipeline.config.schema import ConfigError
from pipeline.runner.rundir import check_run_dir_name
from pipeline.runner.stage import STAGE_NAMES, preflight

from .graph import DATA_PARALLEL_STAGES, JobSpec, build_graph, select_stages
from .job_records import record_submission, slurm_dir, update_last_submission

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "launchers" / "slurm"


def sbatch_command(spec: JobSpec, config: str, run_dir: Path, overrides: list[str], job_ids: dict,
                   signal_delay_s: int) -> list[str]:
    pattern = "%x-%A_%a.out" if spec.stage in DATA_PARALLEL_STAGES else "%x-%j.out"
    cmd = ["sbatch", "--parsable", *spec.sbatch_options(), f"--signal=B:USR1@{signal_delay_s}", "--requeue",
           "--open-mode=append", f"--output={slurm_dir(run_dir) / spec.stage / pattern}"]
    deps = [job_ids[d] for d in spec.depends_on if d in job_ids]
    if deps:
        cmd += ["--dependency=afterok:" + ":".join(deps), "--kill-on-invalid-dep=yes"]
    return cmd + [str(SCRIPTS / f"{spec.stage}.sbatch"), config, str(run_dir), *overrides]


def job_environment(cfg, run_dir: Path) -> dict:
    """Our environment for the stage jobs, minus the SLURM variables of the job we run in (they
    would describe this small job to the stage's srun), plus what common.sh reads."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(TESSERA_REPO=str(REPO), TESSERA_PYTHON=sys.executable,
               TESSERA_MAX_REQUEUES=str(cfg.launcher.max_requeues))
    if cfg.launcher.setup:
        setup = slurm_dir(run_dir) / "setup.sh"
        setup.write_text("# launcher.setup of the config, sourced by each stage job\n"
                         + "\n".join(cfg.launcher.setup) + "\n")
        env["TESSERA_SETUP"] = str(setup)
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launchers.sbatch_chain", description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("run_dir")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--stages", default=None)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        config = str(Path(args.config).resolve())
        run_dir = Path(args.run_dir).resolve()
        check_run_dir_name(run_dir, slurm=True)
        stages = select_stages(args.stages, list(STAGE_NAMES))
        preflight(cfg, stages, run_dir=run_dir)
        specs, done = build_graph(cfg, run_dir, stages)
    except ConfigError as err:
        print(f"tessera: error: {err}", file=sys.stderr)
        return 2
    for stage in done:
        print(f"[tessera] {stage}: done already; not submitted")
    slurm_dir(run_dir).mkdir(parents=True, exist_ok=True)
    env = job_environment(cfg, run_dir)
    record_submission(run_dir, "slurm", {}, config=config, overrides=list(args.overrides), repo=str(REPO),
                      via="launchers/slurm/pipeline.sbatch")
    job_ids: dict[str, str] = {}
    for spec in specs:
        (slurm_dir(run_dir) / spec.stage).mkdir(parents=True, exist_ok=True)
        cmd = sbatch_command(spec, config, run_dir, list(args.overrides), job_ids, cfg.launcher.signal_delay_s)
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"tessera: error: sbatch for stage {spec.stage} failed: {out.stderr.strip()}", file=sys.stderr)
            return 1
        job_id = out.stdout.strip().split(";")[0]
        job_ids[spec.stage] = job_id
        update_last_submission(run_dir, spec.stage, {"job_id": job_id, "array_tasks": spec.array_tasks,
                                                     "depends_on": spec.depends_on})
        print(f"[tessera] {spec.stage}: submitted job {job_id}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
