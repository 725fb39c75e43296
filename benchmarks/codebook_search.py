"""Benchmark the codebook-search kernels against plain torch.

GPU (--device cuda): for N in {65536, 262144, 1048576}, K in {1024, 16384}, C=256, fp32/bf16, the
extension's nearest_code and the chunked GEMM path (TESSERA_KERNELS=gemm: the exact CPU algorithm on
cuBLAS GEMMs) vs torch cdist+argmin and addmm+argmin (the best plain-torch way), plus
residual_quantize at depth 4 vs four addmm+argmin searches, and the achieved TFLOP/s of each next
to a bare torch GEMM of the same shape. CUDA events, warm-up, median of --repeats. The torch
baselines run in row chunks of at most 2 GiB of distances, since N x K does not fit for the
largest shapes. A float64 check of the first 4096 rows counts rows whose choice is not within
rounding of the true minimum ("bad", must be 0).

CPU (--device cpu): the chunked exact path vs naive full-matrix cdist+argmin and addmm+argmin:
time (median of rounds that alternate between the methods, after a warm-up) and peak memory
(RSS high-water mark of a fresh process per measurement, minus the inputs).

    python benchmarks/codebook_search.py --device cpu [--quick]
    python benchmarks/codebook_search.py --device cuda [--quick]

Writes benchmarks/results/codebook_search_<device>.json (--out: elsewhere), a section of BENCHMARKS.md
(benchmarks/report.py).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import kernels  # noqa: E402
from kernels import reference as ref  # noqa: E402

from report import RESULTS, command_line, describe_machine, write_section  # noqa: E402

C = 256
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BASELINE_CHUNK_BYTES = 2 << 30


def inputs(n, k, dtype, device, seed=0):
    # Drawn directly in the target dtype: no fp32 temporary inflating the memory baseline.
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, C, generator=g, device=device, dtype=dtype)
    cb = torch.randn(k, C, generator=g, device=device, dtype=dtype)
    return x, cb


def torch_addmm_argmin(x, cb, chunk_rows):
    sq = ref.codebook_sqnorm(cb).to(x.dtype)
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for n0 in range(0, x.shape[0], chunk_rows):
        out[n0 : n0 + chunk_rows] = torch.addmm(sq, x[n0 : n0 + chunk_rows], cb.t(), alpha=-2).argmin(1)
    return out


def torch_cdist_argmin(x, cb, chunk_rows):
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for n0 in range(0, x.shape[0], chunk_rows):
        out[n0 : n0 + chunk_rows] = torch.cdist(x[n0 : n0 + chunk_rows], cb).argmin(1)
    return out


def torch_rq(x, cb, depth, chunk_rows):
    """Plain-torch residual quantisation with the same outputs as kernels.residual_quantize."""
    x_f, cb_f = x.float(), cb.float()
    codes = torch.empty(x.shape[0], depth, dtype=torch.int64, device=x.device)
    partial = torch.empty(x.shape[0], depth, C, dtype=torch.float32, device=x.device)
    ps = torch.zeros_like(x_f)
    for d in range(depth):
        codes[:, d] = torch_addmm_argmin(x_f - ps, cb_f, chunk_rows)
        ps = ps + cb_f[codes[:, d]]
        partial[:, d] = ps
    return codes, partial


def bare_gemm(x, cb, chunk_rows):
    for n0 in range(0, x.shape[0], chunk_rows):
        torch.mm(x[n0 : n0 + chunk_rows], cb.t())


def bad_rows(x, cb, idx, rows=4096):
    """Rows whose chosen code is further than rounding from the float64 minimum."""
    x64, cb64 = x[:rows].double().cpu(), cb.double().cpu()
    d = (x64 * x64).sum(1, keepdim=True) - 2 * x64 @ cb64.t() + (cb64 * cb64).sum(1)
    chosen = d.gather(1, idx[:rows].cpu().unsqueeze(1)).squeeze(1)
    scale = (x64 * x64).sum(1) + (cb64 * cb64).sum(1).max()
    return int((chosen - d.min(1).values > 32 * 2.0**-23 * C**0.5 * scale).sum())


# ---------------------------------------------------------------------------------------- GPU
def time_cuda(fn, warmup, repeats):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def maybe_time(fn, warmup, repeats):
    """Median ms, or NaN where a plain-torch baseline cannot run (out of memory, unsupported)."""
    try:
        return time_cuda(fn, warmup, repeats)
    except RuntimeError as exc:
        print(f"  (baseline failed: {str(exc).splitlines()[0][:120]})")
        torch.cuda.empty_cache()
        return float("nan")


def run_cuda(args):
    ns = args.n or ([65536] if args.quick else [65536, 262144, 1048576])
    ks = args.k or ([1024] if args.quick else [1024, 16384])
    dtypes = {name: DTYPES[name] for name in (args.dtype or DTYPES)}
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  C={C}  median of {args.repeats}")
    columns = ["op", "dtype", "N", "K", "ext ms", "chunked GEMM path ms", "addmm+argmin ms", "cdist+argmin ms",
               "vs addmm", "vs cdist", "ext TFLOP/s", "GEMM TFLOP/s", "bad", "bad (GEMM path)"]
    rows = []
    print_row(columns)
    for k in ks:
        for n in ns:
            for name, dtype in dtypes.items():
                for row in bench_cuda_shape(n, k, name, dtype, args):
                    rows.append(print_row(row))
                torch.cuda.empty_cache()  # the shape's inputs are gone: start the next one clean
    return columns, rows


def bench_cuda_shape(n, k, name, dtype, args):
    """Table rows (nearest, rq depth 4) for one shape; inputs live only inside this call."""
    x, cb = inputs(n, k, dtype, "cuda")
    chunk = max(1, BASELINE_CHUNK_BYTES // (4 * k))
    flop = 2.0 * n * k * C
    t_ext = time_cuda(lambda: kernels.nearest_code(x, cb), args.warmup, args.repeats)
    t_path = maybe_time(gemm_path(lambda: kernels.nearest_code(x, cb)), args.warmup, args.repeats)
    t_mm = maybe_time(lambda: torch_addmm_argmin(x, cb, chunk), args.warmup, args.repeats)
    t_cd = maybe_time(lambda: torch_cdist_argmin(x, cb, chunk), args.warmup, args.repeats)
    t_gemm = maybe_time(lambda: bare_gemm(x, cb, chunk), args.warmup, args.repeats)
    bad = bad_rows(x, cb, kernels.nearest_code(x, cb)[0])
    bad_path = bad_rows(x, cb, gemm_path(lambda: kernels.nearest_code(x, cb))()[0])
    t_rq = time_cuda(lambda: kernels.residual_quantize(x, cb, 4), args.warmup, args.repeats)
    t_rq_path = maybe_time(gemm_path(lambda: kernels.residual_quantize(x, cb, 4)), args.warmup, args.repeats)
    t_trq = maybe_time(lambda: torch_rq(x, cb, 4, chunk), args.warmup, args.repeats)
    return [
        ["nearest", name, n, k, f"{t_ext:.3f}", f"{t_path:.3f}", f"{t_mm:.3f}", f"{t_cd:.3f}", f"{t_mm / t_ext:.2f}x",
         f"{t_cd / t_ext:.2f}x", f"{flop / t_ext / 1e9:.1f}", f"{flop / t_gemm / 1e9:.1f}", bad, bad_path],
        ["rq depth 4", name, n, k, f"{t_rq:.3f}", f"{t_rq_path:.3f}", f"{t_trq:.3f}", "-", f"{t_trq / t_rq:.2f}x",
         "-", f"{4 * flop / t_rq / 1e9:.1f}", f"{flop / t_gemm / 1e9:.1f}", "-", "-"],
    ]


def gemm_path(fn):
    """fn with CUDA tensors sent through the chunked GEMM path (TESSERA_KERNELS=gemm, read per call)."""
    def run():
        with mock.patch.dict(os.environ, {"TESSERA_KERNELS": "gemm"}):
            return fn()
    return run


def print_row(cells: list) -> list:
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)
    return cells


# ---------------------------------------------------------------------------------------- CPU
def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_op(method, x, cb):
    if method == "chunked":
        return lambda: kernels.nearest_code(x, cb)
    if method == "cdist":
        return lambda: torch.cdist(x.float(), cb.float()).argmin(1)
    if method == "addmm":
        return lambda: torch.addmm(ref.codebook_sqnorm(cb), x.float(), cb.float().t(), alpha=-2).argmin(1)
    if method == "rq4":
        return lambda: kernels.residual_quantize(x, cb, 4)
    return lambda: torch_rq(x, cb, 4, x.shape[0])  # naive: four full-matrix addmm+argmin searches


def _peak_child(method, n, k, dtype_name, queue):
    x, cb = inputs(n, k, DTYPES[dtype_name], "cpu")
    fn = cpu_op(method, x, cb)
    # High-water mark of resident memory during the op minus resident memory with only the
    # inputs alive (VmHWM reset first, so creating the inputs does not hide the op's peak).
    have_hwm = _reset_peak_rss()
    base_kb = _status_kb("VmRSS") if have_hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    peak_kb = _status_kb("VmHWM") if have_hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put((peak_kb - base_kb) / 1024)


def peak_mb(method, n, k, dtype_name):
    ctx = mp.get_context("spawn")  # a fresh process per measurement: clean high-water mark
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=(method, n, k, dtype_name, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def interleaved_times(fns, repeats):
    """Median seconds per fn; rounds alternate between fns so a busy spell on a shared machine
    hits every method alike instead of whichever happened to run then."""
    for fn in fns.values():
        fn()  # warm-up (MKL/OpenMP start-up)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def run_cpu(args):
    shapes = [(4096, 1024)] if args.quick else [(4096, 1024), (65536, 1024), (4096, 16384), (16384, 16384)]
    print(f"CPU: {torch.get_num_threads()} torch threads  torch {torch.__version__}  C={C}  median of {args.repeats}")
    columns = ["op", "dtype", "N", "K", "chunked s", "peak MB", "cdist+argmin s", "peak MB", "addmm+argmin s",
               "peak MB", "bad"]
    rows = []
    print_row(columns)
    for n, k in shapes:
        for name in DTYPES:
            x, cb = inputs(n, k, DTYPES[name], "cpu")
            methods = ("chunked", "cdist", "addmm")
            t = interleaved_times({m: cpu_op(m, x, cb) for m in methods}, args.repeats)
            mem = {m: peak_mb(m, n, k, name) for m in methods}
            bad = bad_rows(x, cb, kernels.nearest_code(x, cb)[0])
            rows.append(print_row(["nearest", name, n, k, f"{t['chunked']:.3f}", f"{mem['chunked']:.0f}",
                                   f"{t['cdist']:.3f}", f"{mem['cdist']:.0f}", f"{t['addmm']:.3f}",
                                   f"{mem['addmm']:.0f}", bad]))
    for n, k in shapes[:2]:
        x, cb = inputs(n, k, torch.float32, "cpu")
        t = interleaved_times({m: cpu_op(m, x, cb) for m in ("rq4", "rq4_naive")}, args.repeats)
        m_r, m_n = peak_mb("rq4", n, k, "fp32"), peak_mb("rq4_naive", n, k, "fp32")
        rows.append(print_row(["rq depth 4", "fp32", n, k, f"{t['rq4']:.3f}", f"{m_r:.0f}", "-", "-",
                               f"{t['rq4_naive']:.3f}", f"{m_n:.0f}", "-"]))
    return columns, rows


MEASURES = {
    "cpu": "The exact chunked CPU path of `kernels.nearest_code` / `residual_quantize` against naive full-matrix "
           "torch (cdist+argmin, addmm+argmin), C = 256: time is the median of rounds that alternate between "
           "the methods after a warm-up; peak MB is the RSS high-water mark of a fresh process during one call "
           "minus the inputs; 'bad' counts rows of the first 4096 whose chosen code is not within fp32 rounding "
           "of the float64 minimum (must be 0).",
    "cuda": "The CUDA extension's nearest_code and residual_quantize (depth 4) against torch addmm+argmin and "
            "cdist+argmin (median of CUDA-event timings after a warm-up), C = 256, with the achieved TFLOP/s "
            "next to a bare torch GEMM of the same shape (the ceiling: the largest shape is compute-bound); "
            "'bad' as on CPU.",
}


def section(device: str, columns: list, rows: list, command: str, machine: str, title_suffix: str = "") -> dict:
    return {"title": f"Codebook search, {device.upper()}{title_suffix}", "order": 20,
            "measures": MEASURES[device], "command": command, "machine": machine,
            "tables": [{"columns": columns, "rows": rows}]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smallest shapes only, for a smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (GPU)")
    parser.add_argument("--n", type=int, action="append", help="GPU: only this N (repeatable)")
    parser.add_argument("--k", type=int, action="append", help="GPU: only this K (repeatable)")
    parser.add_argument("--dtype", choices=list(DTYPES), action="append", help="GPU: only this dtype")
    parser.add_argument("--out", type=Path, default=None,
                        help="result file (default: benchmarks/results/codebook_search_<device>.json)")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.device == "cpu" else 10
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda but torch.cuda.is_available() is False")
        columns, rows = run_cuda(args)
    else:
        columns, rows = run_cpu(args)
    suffix = f", K = {', '.join(map(str, args.k))}" if args.device == "cuda" and args.k else ""
    out = args.out or RESULTS / f"codebook_search_{args.device}.json"
    threads = torch.get_num_threads() if args.device == "cpu" else None
    write_section(out, section(args.device, columns, rows, command_line("benchmarks/codebook_search.py", argv),
                               describe_machine(args.device, threads), suffix))


if __name__ == "__main__":
    main()
