"""`tessera` command line: run the pipeline, one stage, or show a run's status.

    tessera run CONFIG [--run-dir DIR] [--stages a,b] [--force [--from-scratch]] [key=value ...]
    tessera stage NAME CONFIG [--run-dir DIR] [--num-tasks N --task-id I] [--force [--from-scratch]] [key=value ...]
    tessera submit CONFIG [--run-dir DIR] [--stages a,b] [--dry-run] [--executor slurm|local] [key=value ...]
    tessera status RUN_DIR
    tessera cancel RUN_DIR
    tessera verify RUN_DIR
    tessera config [CONFIG] [key=value ...] [--keys]
    tessera estimate CONFIG [--world-size N] [--gpu-memory-gb G] [key=value ...]
    tessera score --samples X.npz --ref REF.npz [--out DIR] [--metrics fid,isc,kid,prc] [--inception-weights P]
    tessera import rq-official --stage1 DIR [--stage2 DIR] --run-dir RUN_DIR [--config CONFIG] [--ema] [--force]
                               [k=v ...]
    tessera --version
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from pathlib import Path

from ..config.schema import ConfigError

EPILOG = "Overrides are dotted keys, e.g. tokenizer_train.lr=1e-4 data.resolution=64 (see `tessera config --keys`)."


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML preset, e.g. configs/demo-rq.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--run-dir", default=None, help="run directory (default: runs/<config name>)")
    p.add_argument("--force", action="store_true", help="start a stage over when its config or inputs changed; with "
                   "the same config and inputs, rebuild it from the checkpoints and units that still match")
    p.add_argument("--from-scratch", action="store_true", help="with --force: also delete the stage's "
                   "checkpoints and finished units that still match the config (redo all its work)")


def installed_version() -> str:
    """The installed distribution's version; the package's own when run from a checkout without installing."""
    try:
        return importlib.metadata.version("tessera")
    except importlib.metadata.PackageNotFoundError:
        from .. import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera", description="Tessera: RQ / DQ autoregressive image generation "
                                     "pipeline (shard -> train_tokenizer -> precompute_codes -> train_prior -> "
                                     "sample -> score).", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {installed_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_run = sub.add_parser("run", help="run the stages in order, skipping finished ones", epilog=EPILOG)
    _add_common(p_run)
    p_run.add_argument("--stages", default=None, help="comma-separated subset of stages (default: all implemented)")

    p_stage = sub.add_parser("stage", help="run one stage (single process, torchrun or srun ranks)", epilog=EPILOG)
    p_stage.add_argument("name",
                         help="stage name: shard, train_tokenizer, precompute_codes, train_prior, sample, score")
    _add_common(p_stage)
    p_stage.add_argument("--num-tasks", type=int, default=None, help="array tasks sharing this stage (SLURM arrays)")
    p_stage.add_argument("--task-id", type=int, default=None, help="this task's index in [0, num-tasks)")

    p_submit = sub.add_parser("submit", help="submit every unfinished stage as a SLURM job (submitit), chained "
                              "with afterok dependencies; docs/cluster.md", epilog=EPILOG)
    p_submit.add_argument("config", help="YAML preset, e.g. configs/imagenet256-rq.yaml")
    p_submit.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p_submit.add_argument("--run-dir", default=None, help="run directory on a shared file system "
                          "(default: runs/<config name>)")
    p_submit.add_argument("--stages", default=None, help="comma-separated subset of stages (default: all)")
    p_submit.add_argument("--dry-run", action="store_true", help="print the dependency graph and the sbatch "
                          "scripts; submit nothing")
    p_submit.add_argument("--executor", default="slurm", choices=("slurm", "local"),
                          help="slurm (default), or local: the same jobs as processes on this machine, in order")

    p_status = sub.add_parser("status", help="table of stages: state, counts, wall time, key metrics, SLURM jobs")
    p_status.add_argument("run_dir", help="run directory")

    p_cancel = sub.add_parser("cancel", help="scancel the run's SLURM jobs that are pending or running")
    p_cancel.add_argument("run_dir", help="run directory")

    p_verify = sub.add_parser("verify", help="check every finished stage's outputs against its done.json and "
                              "manifests (exit 1 when any differs)")
    p_verify.add_argument("run_dir", help="run directory")

    p_config = sub.add_parser("config", help="print the effective config, or every key with --keys")
    p_config.add_argument("config", nargs="?", default=None, help="YAML preset")
    p_config.add_argument("overrides", nargs="*", metavar="key=value")
    p_config.add_argument("--keys", action="store_true", help="list every key with type, default and help")

    p_est = sub.add_parser("estimate", help="parameters and memory per GPU of training the prior (ZeRO 0-3, "
                           "offload, activation checkpointing) and a recommendation", epilog=EPILOG)
    p_est.add_argument("config", help="YAML preset")
    p_est.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p_est.add_argument("--world-size", type=int, default=None, help="ranks (default: launcher.train_prior nodes x "
                       "gpus_per_node)")
    p_est.add_argument("--gpu-memory-gb", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    p_est.add_argument("--gpu-tflops", type=float, default=989.0, help="dense bf16 peak of one GPU in TFLOP/s "
                       "(default 989: H100/H200)")
    p_est.add_argument("--mfu", type=float, default=0.35, help="model FLOPs utilisation assumed for the wall "
                       "time (default 0.35; benchmarks/prior_training.py measures it)")

    p_score = sub.add_parser("score", help="score any ADM-format sample archive (arr_0 uint8 N x H x W x 3) against "
                             "a reference .npz: FID, IS, KID, precision/recall")
    p_score.add_argument("--samples", required=True, help="the samples .npz (arr_0; e.g. RUN_DIR/sample/samples.npz)")
    p_score.add_argument("--ref", required=True, help="reference .npz: the ADM batch (mu, sigma, arr_0), statistics "
                         "(mu, sigma[, features]), or another image archive (arr_0)")
    p_score.add_argument("--out", default=None, help="folder for metrics.json and leaderboard.md (default: print only)")
    p_score.add_argument("--metrics", default="fid,isc,kid,prc", help="comma-separated subset of fid,isc,kid,prc")
    p_score.add_argument("--inception-weights", default="", help="torch-fidelity's inception-v3-compat .pth")
    p_score.add_argument("--no-download", action="store_true", help="never download the Inception weights")
    p_score.add_argument("--allow-uncalibrated", action="store_true", help="without weights, report *_uncalibrated "
                         "numbers from a seeded random Inception (never FID)")
    p_score.add_argument("--batch-size", type=int, default=50)
    p_score.add_argument("--kid-subset-size", type=int, default=1000)
    p_score.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")

    p_import = sub.add_parser("import", help="turn another codebase's released checkpoints into finished stages")
    sources = p_import.add_subparsers(dest="source", required=True, metavar="SOURCE")
    p_rq = sources.add_parser("rq-official", help="the authors' RQ-VAE (kakaobrain/rq-vae-transformer) -> "
                              "RUN_DIR/train_tokenizer, and their RQ-Transformer -> RUN_DIR/train_prior",
                              epilog=EPILOG)
    p_rq.add_argument("--stage1", required=True, metavar="DIR", help="their RQ-VAE folder (model.pt + config.yaml)")
    p_rq.add_argument("--stage2", default=None, metavar="DIR", help="their RQ-Transformer folder (model.pt + "
                      "config.yaml; its state_dict_ema is imported, as their sampling script does)")
    p_rq.add_argument("--run-dir", required=True, help="run directory to create or complete")
    p_rq.add_argument("--config", default=None, help="our YAML preset for the other sections (data, launcher, ...); "
                      "the tokenizer section and data.resolution come from their config.yaml")
    p_rq.add_argument("--ema", action="store_true", help="stage 1: import model.pt's state_dict_ema instead "
                      "of state_dict")
    p_rq.add_argument("--force", action="store_true", help="replace imported stages that are already done with "
                      "another config or checkpoint")
    p_rq.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides (not the "
                      "tokenizer architecture)")
    return parser


def _array_task(args) -> tuple[int, int]:
    """--num-tasks/--task-id, else a SLURM job array, else a single task."""
    num_tasks = args.num_tasks
    task_id = args.task_id
    if num_tasks is None and "SLURM_ARRAY_TASK_COUNT" in os.environ:
        num_tasks = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
        task_id = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
    num_tasks = 1 if num_tasks is None else num_tasks
    task_id = 0 if task_id is None else task_id
    if num_tasks < 1:
        raise ConfigError(f"--num-tasks must be >= 1, got {num_tasks}")
    return num_tasks, task_id


def _run_dir(args, cfg) -> Path:
    from ..runner.rundir import check_run_dir_name

    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / cfg.name
    check_run_dir_name(run_dir)
    return run_dir


def _from_scratch(args) -> bool:
    if args.from_scratch and not args.force:
        raise ConfigError("--from-scratch goes with --force (it says what --force may delete)")
    return args.from_scratch


def cmd_run(args) -> int:
    from ..config.root import load_config
    from ..runner.stage import STAGE_NAMES, preflight, run_stage
    from ..runtime.memory import current_rss_bytes, peak_rss_bytes, release_memory, reset_peak_rss
    from .summary import format_summary

    cfg = load_config(args.config, args.overrides)
    if args.stages:
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
        for s in stages:
            if s not in STAGE_NAMES:
                raise ConfigError(f"--stages: unknown stage {s!r}; stages are: {', '.join(STAGE_NAMES)}")
        stages = [s for s in STAGE_NAMES if s in stages]  # always in pipeline order
    else:
        stages = list(STAGE_NAMES)
    run_dir = _run_dir(args, cfg)
    preflight(cfg, stages, run_dir=run_dir, force=args.force)  # every stage's checks before the first starts
    for name in stages:
        reset_peak_rss()
        outcome = run_stage(name, cfg, run_dir, force=args.force, from_scratch=_from_scratch(args))
        peak = peak_rss_bytes()
        release_memory()  # the next stage starts from this stage's leftovers otherwise
        print(f"[tessera] {name}: {outcome.status} (peak RSS {peak / 2 ** 30:.2f} GiB, after release "
              f"{current_rss_bytes() / 2 ** 30:.2f} GiB)", flush=True)
    print(format_summary(run_dir))
    print(f"[tessera] run directory: {run_dir}  (see `tessera status {run_dir}`)")
    return 0


def cmd_stage(args) -> int:
    from ..config.root import load_config
    from ..runner.stage import run_stage

    cfg = load_config(args.config, args.overrides)
    num_tasks, task_id = _array_task(args)
    outcome = run_stage(args.name, cfg, _run_dir(args, cfg), force=args.force, num_tasks=num_tasks, task_id=task_id,
                        from_scratch=_from_scratch(args))
    print(f"[tessera] {args.name}: {outcome.status}", flush=True)
    return 0


def cmd_status(args) -> int:
    from .status import format_status

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory not found: {run_dir}")
    from launchers.job_records import stage_job_column

    print(format_status(run_dir, jobs=stage_job_column(run_dir)))
    return 0


def cmd_submit(args) -> int:
    from launchers.submit import submit

    return submit(args.config, args.overrides, args.run_dir, args.stages, executor=args.executor,
                  dry_run=args.dry_run)


def cmd_cancel(args) -> int:
    from launchers.job_records import cancel, latest_jobs

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory not found: {run_dir}")
    if not latest_jobs(run_dir):
        print(f"[tessera] no SLURM jobs recorded in {run_dir}")
        return 0
    cancelled = cancel(run_dir)
    print(f"[tessera] cancelled job(s) {' '.join(cancelled)}" if cancelled else "[tessera] no job of this run is "
          "pending or running")
    return 0


def cmd_verify(args) -> int:
    from ..runner.rundir import RunDir
    from ..runner.stage import StageError, verify_stage

    run = RunDir(args.run_dir)
    if not run.root.is_dir():
        raise ConfigError(f"run directory not found: {run.root}")
    failures = 0
    for state in run.states():
        if state.state != "done":
            print(f"{state.name:<18} {state.state}")
            continue
        try:
            verify_stage(state.name, run)
            print(f"{state.name:<18} ok")
        except StageError as err:
            failures += 1
            print(f"{state.name:<18} FAILED: {err}")
    return 1 if failures else 0


def cmd_config(args) -> int:
    from ..config.root import config_keys, load_config

    if args.keys:
        print("\n".join(config_keys()))
        return 0
    print(load_config(args.config, args.overrides).to_yaml(), end="")
    return 0


def cmd_estimate(args) -> int:
    from ..config.root import load_config
    from .estimate import estimate, format_estimate

    cfg = load_config(args.config, args.overrides)
    res = cfg.launcher.train_prior
    world = args.world_size or max(1, res.nodes * max(res.gpus_per_node, 1))
    if world < 1:
        raise ConfigError(f"--world-size must be >= 1, got {world}")
    print(format_estimate(estimate(cfg, world, args.gpu_memory_gb, args.gpu_tflops, args.mfu), cfg.prior.preset))
    return 0


def cmd_import(args) -> int:
    from ..importers.rq_official_stages import import_rq_official
    from ..runner.rundir import check_run_dir_name

    check_run_dir_name(args.run_dir)
    outcomes = import_rq_official(stage1=args.stage1, stage2=args.stage2, run_dir=args.run_dir, config=args.config,
                                  overrides=args.overrides, ema=args.ema, force=args.force)
    for outcome in outcomes:
        print(f"[tessera] import {args.source}: {outcome.name}: {outcome.status}", flush=True)
    print(f"[tessera] run directory: {args.run_dir}  (see `tessera status {args.run_dir}`)")
    return 0


def cmd_score(args) -> int:
    """`tessera score --samples X.npz --ref REF`: the score stage's own computation on any archive."""
    import json
    import logging
    from pathlib import Path

    import torch

    from ..config.schema import build_section
    from ..config.sections import ScoreConfig
    from ..evaluation.scoring import METRIC_NAMES, leaderboard_row, read_npz_header
    from ..runner.stage import load_stage_module
    from ..runtime.validate import check_reference_archive, check_sample_archive

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    bad = [m for m in metrics if m not in METRIC_NAMES]
    if bad:
        raise ConfigError(f"--metrics: {bad[0]!r} is not a metric; choose from {', '.join(METRIC_NAMES)}")
    samples = Path(args.samples)
    # Both files are checked before the (slow) Inception network is loaded.
    shape = check_sample_archive(samples, "--samples")
    check_reference_archive(args.ref, "--ref", resolution=shape[1])
    sc = build_section(ScoreConfig, {
        "metrics": metrics, "reference": str(args.ref),
        "inception_weights": args.inception_weights, "download_weights": not args.no_download,
        "allow_uncalibrated": args.allow_uncalibrated, "batch_size": args.batch_size,
        "kid_subset_size": args.kid_subset_size}, "score")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    score = load_stage_module("score")
    result, source, _ = score.score_archive(samples, sc, device, logging.getLogger("tessera.score"))
    num = read_npz_header(samples)[0][0]
    record = {"metrics": result, "inception": source, "reference": str(args.ref), "samples": str(samples),
              "num_samples": num}
    print(json.dumps(record, indent=1))
    row = leaderboard_row(samples.stem, None, "-", "-", result, num, str(args.ref))
    print(row, end="")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        score.write_score(out, record, row)
    return 0


COMMANDS = {"estimate": cmd_estimate, "score": cmd_score, "run": cmd_run, "stage": cmd_stage, "status": cmd_status,
            "verify": cmd_verify, "config": cmd_config, "import": cmd_import, "submit": cmd_submit,
            "cancel": cmd_cancel}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Like parse_args, but `key=value` overrides may also come after options (`--run-dir X a.b=1`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [tok for tok in extra if tok.startswith("-") or "=" not in tok or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ..runtime.errors import StageError, describe_os_error
    from ..train.signals import PREEMPTED_EXIT_CODE, Interrupted, Preempted

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, StageError) as err:
        print(f"tessera: error: {err}", file=sys.stderr)
        return 2
    except (Preempted, Interrupted) as stop:  # checkpoint written; the launcher requeues on this exit code
        print(f"tessera: {stop}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except BrokenPipeError:  # e.g. `tessera config --keys | head`
        return 0
    except OSError as err:  # outside a stage (inside, the runner already turned it into a StageError)
        print(f"tessera: error: {describe_os_error(err, 'tessera ' + args.command)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tessera: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
