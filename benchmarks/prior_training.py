"""Prior training throughput: tokens/s (and on GPU MFU and peak memory).

Two modes:

  stage  The real `train_prior` stage (streaming reader, engine, checkpoints off the hot path) on
         demo codes, for ZeRO 0/2/3 x 1 and 2 processes (CPU, gloo). tokens/s is the median of
         the per-step TensorBoard scalar over the steps after a warm-up.
             python benchmarks/prior_training.py stage --run-dir /tmp/bench-codes
             python benchmarks/prior_training.py stage --run-dir /tmp/bench-codes --slurm-nodes 2 --nprocs 2
               (the same ranks spread over 2 nodes of a SLURM cluster, e.g. tests/slurm/local_cluster.sh's)
         (--run-dir: a run whose precompute_codes is done, e.g. after `make run`; created with a
         short tokenizer when missing)

  step   One optimizer step after another on synthetic codes through the same engine, without the
         reader: the model's own speed. On a GPU: rq-1.4b, ZeRO-2, bf16, activation checkpointing,
         for each attention backend (SDPA flash, SDPA math, flash-attn when installed).
             python benchmarks/prior_training.py step --device cuda --preset rq-1.4b --micro-batch 32
             python benchmarks/prior_training.py step --device cpu --preset rq-demo   (the same code path)

Writes benchmarks/results/prior_training_<mode>_<device>.json, a section of BENCHMARKS.md
(benchmarks/report.py).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from report import RESULTS, command_line, describe_machine, markdown_table, write_section  # noqa: E402

DEMO = REPO / "configs" / "demo-rq.yaml"


# ---- stage mode -----------------------------------------------------------------------------
def tessera_cmd(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "pipeline.cli"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(29600 + os.getpid() % 300), "-m", "pipeline.cli"]


def ensure_codes(run_dir: Path, overrides: list[str]) -> None:
    if (run_dir / "precompute_codes" / "done.json").is_file():
        return
    print(f"no codes in {run_dir}: running shard, train_tokenizer, precompute_codes {overrides}", flush=True)
    subprocess.run([*tessera_cmd(1), "run", str(DEMO), "--run-dir", str(run_dir), "--stages",
                    "shard,train_tokenizer,precompute_codes", *overrides], check=True, cwd=REPO)


def scalar_values(tb_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for events in sorted(tb_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags().get("scalars", []):
            values += [e.value for e in acc.Scalars(tag)]
    return values


def run_stage_mode(args) -> list[dict]:
    codes = Path(args.run_dir)
    tokenizer = [f"tokenizer_train.steps={args.tokenizer_steps}"] if args.tokenizer_steps else []
    ensure_codes(codes, tokenizer)
    rows = []
    for zero in args.zero_stages:
        for nproc in args.nprocs:
            with tempfile.TemporaryDirectory() as tmp:
                run = Path(tmp) / "run"
                shutil.copytree(codes, run, ignore=shutil.ignore_patterns("train_prior", "*.lock", "tensorboard"))
                cmd = [*tessera_cmd(nproc), "run", str(DEMO), "--run-dir", str(run), "--stages", "train_prior",
                       f"prior_train.steps={args.steps}", "prior_train.log_every=1",
                       f"prior_train.checkpoint_every={args.steps}", "prior_train.eval_images=32",
                       f"prior_train.zero_stage={zero}", "prior_train.engine=deepspeed",
                       f"prior_train.batch_size={args.batch_size}", "prior_train.sample_every=0"]
                cmd += tokenizer
                env = {**os.environ, "OMP_NUM_THREADS": str(max(1, args.threads // nproc))}
                start = time.perf_counter()
                if args.slurm_nodes:
                    run_on_slurm(cmd, run, args.slurm_nodes, nproc, env)
                else:
                    subprocess.run(cmd, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
                wall = time.perf_counter() - start
                tok = scalar_values(run / "tensorboard" / "train_prior", "train/tokens_per_s")[args.warmup:]
                row = {"mode": "stage", "zero_stage": zero, "processes": nproc, "nodes": args.slurm_nodes or 1,
                       "launcher": "tessera submit (SLURM)" if args.slurm_nodes else "torchrun",
                       "batch": args.batch_size,
                       "steps_timed": len(tok), "tokens_per_s": statistics.median(tok) if tok else None,
                       "stage_wall_s": round(wall, 1)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def run_on_slurm(cmd: list[str], run: Path, nodes: int, nproc: int, env: dict) -> None:
    """The same stage as `tessera submit` on `nodes` nodes x nproc/nodes ranks; returns when the job ended."""
    from launchers.job_records import live_jobs

    if nproc % nodes:
        raise SystemExit(f"--nprocs {nproc} does not split over --slurm-nodes {nodes}")
    submit = [sys.executable, "-m", "pipeline.cli", "submit", *cmd[cmd.index("run") + 1:],
              f"launcher.train_prior.nodes={nodes}", f"launcher.train_prior.tasks_per_node={nproc // nodes}",
              "launcher.train_prior.cpus_per_task=1", "launcher.train_prior.mem_gb=1"]
    subprocess.run(submit, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    while live_jobs(run):
        time.sleep(1)
    if not (run / "train_prior" / "done.json").is_file():
        raise SystemExit(f"the SLURM job did not finish train_prior; see {run / 'slurm' / 'train_prior'}")


# ---- step mode ------------------------------------------------------------------------------
def attention_backends(device: str) -> list[str]:
    if device != "cuda":
        return ["default"]
    names = ["sdpa-flash", "sdpa-math"]
    try:
        import flash_attn  # noqa: F401

        names.insert(0, "flash-attn")
    except ImportError:
        pass
    return names


@contextlib.contextmanager
def backend_context(name: str, model):
    """Attention backend for one measurement: the flash-attn package, or SDPA pinned to one kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    flags = [m for m in model.modules() if hasattr(m, "use_flash_attn")]
    saved = [m.use_flash_attn for m in flags]
    for m in flags:
        m.use_flash_attn = name == "flash-attn"
    try:
        if name == "sdpa-flash":
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                yield
        elif name == "sdpa-math":
            with sdpa_kernel([SDPBackend.MATH]):
                yield
        else:
            yield
    finally:
        for m, v in zip(flags, saved):
            m.use_flash_attn = v


def profile_steps(one_step, path: Path, backend: str, steps: int = 2) -> None:
    """Two more steps under torch.profiler: the top operators by device time and by CPU time, appended
    to `path` (where a step's time goes when the MFU is low)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            one_step()
    averages = prof.key_averages()
    tables = []
    device_keys = ("device_time_total", "cuda_time_total") if torch.cuda.is_available() else ()
    for keys in (device_keys, ("cpu_time_total",)):
        for key in keys:  # the first that this torch version knows
            try:
                tables.append(f"--- {backend}: {steps} steps, sorted by {key}\n"
                              + averages.table(sort_by=key, row_limit=25, max_name_column_width=60))
                break
            except (AttributeError, KeyError, ValueError):
                continue
    text = "\n".join(tables) + "\n"
    with open(path, "a") as f:
        f.write(text)
    print(text, flush=True)


def run_step_mode(args) -> list[dict]:
    from pipeline.config.schema import build_section
    from pipeline.config.sections import PriorTrainConfig
    from pipeline.losses.prior_loss import rq_prior_loss
    from pipeline.models.prior_config import CodeSpec, PriorConfig
    from pipeline.models.registry import build_prior
    from pipeline.runtime.dist import detect_env
    from pipeline.train.engine import make_engine
    from pipeline.train.prior_deepspeed import decay_groups, prior_deepspeed_config
    from pipeline.train.schedule import warmup_cosine
    from pipeline.train.throughput import device_peak_flops, prior_flops_per_sample

    device = torch.device(args.device)
    spec = CodeSpec("rq", args.codebook_size, args.code_dim, 8, 8, 4)
    cfg = build_section(PriorConfig, {"preset": args.preset, "grad_checkpointing": bool(args.grad_checkpointing)},
                        "prior")
    torch.manual_seed(0)
    model = build_prior(cfg, spec, torch.randn(spec.codebook_size, spec.code_dim)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    tc = build_section(PriorTrainConfig, {"batch_size": args.micro_batch, "zero_stage": args.zero_stage,
                                          "engine": "deepspeed", "steps": 1000}, "prior_train")
    optimizer = torch.optim.AdamW(decay_groups(model, tc.weight_decay), lr=tc.lr, betas=tuple(tc.betas))
    scheduler = warmup_cosine(optimizer, tc.steps, 10, 0.0)
    env = detect_env()
    engine = make_engine("prior", model, optimizer, scheduler, tc, env, device,
                         ds_config=prior_deepspeed_config(tc, env.world_size, device))
    engine.train()
    flops = prior_flops_per_sample(model, spec)
    peak = device_peak_flops(device)
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, spec.codebook_size, (args.micro_batch, 8, 8, 4), generator=g).to(device)
    labels = torch.randint(0, cfg.num_classes or 1, (args.micro_batch,), generator=g).to(device)
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def one_step() -> tuple[float, float, torch.Tensor]:
        """(forward seconds, backward + optimizer seconds, loss) of one step. Split there because
        DeepSpeed's engine runs its optimizer inside backward (the boundary micro-batch)."""
        sync()
        t0 = time.perf_counter()
        engine.zero_grad()
        with engine.micro_batch(0):
            with engine.autocast():
                logits = engine(codes, labels if cfg.num_classes else None)
            loss, _ = rq_prior_loss(logits, codes)
            sync()
            t1 = time.perf_counter()
            engine.backward(loss)
        engine.step()
        sync()
        return t1 - t0, time.perf_counter() - t1, loss

    rows = []
    backends = attention_backends(args.device)
    for backend in backends:
        times, forward, backward = [], [], []
        with backend_context(backend, model):
            try:
                for i in range(args.warmup + args.steps):
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    a, b, loss = one_step()
                    if i >= args.warmup:
                        times.append(a + b)
                        forward.append(a)
                        backward.append(b)
                if args.profile and backend == backends[0]:  # the fastest backend: profiling is slow
                    profile_steps(one_step, Path(args.profile), backend)
            except Exception as err:  # noqa: BLE001 - a backend that cannot run this shape is a result too
                rows.append({"mode": "step", "backend": backend, "error": f"{type(err).__name__}: {err}"[:300]})
                print(json.dumps(rows[-1]), flush=True)
                continue
        seconds = statistics.median(times)
        samples_per_s = args.micro_batch * env.world_size / seconds
        row = {"mode": "step", "preset": args.preset, "params": n_params, "device": str(device),
               "backend": backend, "zero_stage": args.zero_stage, "grad_checkpointing": bool(args.grad_checkpointing),
               "micro_batch": args.micro_batch, "step_s": round(seconds, 4),
               "forward_s": round(statistics.median(forward), 4),
               "backward_optimizer_s": round(statistics.median(backward), 4),
               "tokens_per_s": round(samples_per_s * 8 * 8 * 4, 1), "loss": round(float(loss.detach()), 4)}
        if peak:
            row["mfu"] = round(samples_per_s * flops / (peak * env.world_size), 4)
            row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def stage_section(rows: list[dict], args: dict) -> dict:
    """Median tokens/s of the real stage: one row per ZeRO stage, one column per process count."""
    nprocs = sorted({r["processes"] for r in rows})
    table = []
    for zero in sorted({r["zero_stage"] for r in rows}):
        cells = {r["processes"]: r for r in rows if r["zero_stage"] == zero}
        table.append([zero] + [round(cells[n]["tokens_per_s"]) if n in cells and cells[n]["tokens_per_s"] else "-"
                               for n in nprocs])
    table_wall = [[r["zero_stage"], r["processes"], r["stage_wall_s"]] for r in rows]
    return {
        "title": "Prior training throughput: the train_prior stage",
        "measures": f"Tokens/s of the real train_prior stage (streaming reader, engine, checkpoints) on demo "
                    f"codes (`rq-demo`, 4x4x4 codes, K=256), DeepSpeed ZeRO 0/2/3 x 1/2 processes, global "
                    f"batch {args['batch_size']}, {args['threads']} CPU threads shared by the processes, gloo; "
                    f"the median of the per-step scalar over steps {args['warmup'] + 1}-{args['steps']}.",
        "tables": [{"caption": "tokens/s", "columns": ["ZeRO"] + [f"{n} process(es)" for n in nprocs], "rows": table},
                   {"caption": "stage wall time (s, start-up included)",
                    "columns": ["ZeRO", "processes", "wall s"], "rows": table_wall}],
        "order": 50,
    }


def step_section(rows: list[dict], args: dict) -> dict:
    """One row per attention backend of the bare engine step."""
    columns = ["backend", "step s", "forward s", "backward + optimizer s", "tokens/s", "MFU", "peak memory GiB",
               "error"]
    table = [[r["backend"], r.get("step_s"), r.get("forward_s"), r.get("backward_optimizer_s"),
              r.get("tokens_per_s"), r.get("mfu"), r.get("peak_memory_gib"), r.get("error", "")] for r in rows]
    return {
        "title": f"Prior training throughput: one {args['preset']} step, {args['device'].upper()}",
        "measures": f"One optimizer step after another on synthetic codes through the training engine (no "
                    f"reader): `{args['preset']}`, ZeRO-{args['zero_stage']}, micro-batch {args['micro_batch']}, "
                    f"activation checkpointing {'on' if args['grad_checkpointing'] else 'off'}, per attention "
                    f"backend; median of {args['steps']} steps after {args['warmup']}. MFU = model FLOPs per "
                    "sample x samples/s / device peak (target >= 45%).",
        "tables": [{"columns": columns, "rows": table}],
        "order": 51,
    }


def section(rows: list[dict], args: dict, command: str, machine: str) -> dict:
    build = stage_section if args["mode"] == "stage" else step_section
    return {**build(rows, args), "command": command, "machine": machine, "data": {"args": args, "rows": rows}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("stage")
    s.add_argument("--run-dir", default="/tmp/tessera-bench-codes")
    s.add_argument("--zero-stages", type=int, nargs="+", default=[0, 2, 3])
    s.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    s.add_argument("--steps", type=int, default=60)
    s.add_argument("--warmup", type=int, default=10)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--threads", type=int, default=2, help="CPU threads shared by the processes")
    s.add_argument("--slurm-nodes", type=int, default=0, help="run each stage through `tessera submit` on this "
                   "many nodes of the SLURM cluster here (0: torchrun on this machine)")
    s.add_argument("--tokenizer-steps", type=int, default=200, help="tokenizer steps of the codes run it makes "
                   "(0: the demo config's own, e.g. for a `make run` directory)")
    t = sub.add_parser("step")
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--preset", default="rq-1.4b")
    t.add_argument("--micro-batch", type=int, default=32)
    t.add_argument("--zero-stage", type=int, default=2)
    t.add_argument("--grad-checkpointing", type=int, default=1)
    t.add_argument("--codebook-size", type=int, default=16384)
    t.add_argument("--code-dim", type=int, default=256)
    t.add_argument("--steps", type=int, default=5)
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--profile", default=None, help="also profile two steps of the first backend (torch.profiler) "
                   "and append the top operators by device and CPU time to this text file")
    for q in (s, t):
        q.add_argument("--out", default=None,
                       help="result file (default: benchmarks/results/prior_training_<mode>_<device>.json)")
    args = p.parse_args()
    rows = run_stage_mode(args) if args.mode == "stage" else run_step_mode(args)
    device = getattr(args, "device", "cpu")
    across = f"_slurm{args.slurm_nodes}nodes" if getattr(args, "slurm_nodes", 0) else ""
    out = Path(args.out) if args.out else RESULTS / f"prior_training_{args.mode}_{device}{across}.json"
    threads = getattr(args, "threads", torch.get_num_threads())
    result = section(rows, vars(args), command_line("benchmarks/prior_training.py"), describe_machine(device, threads))
    for table in result["tables"]:
        print(markdown_table(table["columns"], table["rows"]))
    write_section(out, result)

if __name__ == "__main__":
    main()
