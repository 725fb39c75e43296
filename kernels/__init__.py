"""Codebook search for vector / residual quantisation: nearest code, residual quantisation, soft codes.

Public API (all ops are inference-style: inputs are detached, nothing is differentiable; gather
`codebook[codes]` yourself where a gradient is needed):

    nearest_code(x_NC, codebook_KC, *, codebook_sqnorm_K=None) -> (index_N int64, sqdist_N float32)
    residual_quantize(x_NC, codebook, depth) -> (codes_ND int64, partial_sums_NDC float32)
    soft_codes(residual_NC, codebook_KC, tau, *, sample=False, generator=None)
        -> (probs_NK float32, sampled_N int64 or None)

Dispatch: CUDA tensors use the compiled extension (kernels/csrc), CPU tensors an exact chunked
GEMM path (kernels/cpu.py), anything else the plain-torch reference. Read at each call,
`TESSERA_KERNELS=reference` forces the reference everywhere and `TESSERA_KERNELS=gemm` sends CUDA
tensors through the chunked GEMM path too (on an H200 plain torch addmm + argmin ran 1.5-7x faster
than the extension; docs/kernels.md). Tie, NaN and precision rules are defined in
kernels/reference.py and are the same on every backend.
"""
from __future__ import annotations

import contextlib
import os

import torch

from . import _checks
from . import cpu as _cpu
from . import reference as _reference
from .loader import KernelBuildError

__all__ = ["nearest_code", "residual_quantize", "soft_codes", "sample_rows", "KernelBuildError", "backend_name"]

_MODES = ("", "auto", "reference", "gemm")


def backend_name(device) -> str:
    """Which implementation serves tensors on `device`: 'reference', 'cpu' (the chunked GEMM path,
    also on CUDA under TESSERA_KERNELS=gemm) or 'cuda' (the extension)."""
    mode = os.environ.get("TESSERA_KERNELS", "").strip().lower()
    if mode not in _MODES:
        raise ValueError(f"TESSERA_KERNELS={mode!r} is not one of 'auto', 'reference', 'gemm' (or unset)")
    if mode == "reference":
        return "reference"
    device_type = device.type if hasattr(device, "type") else str(device).split(":")[0]
    if device_type == "cuda":
        return "cpu" if mode == "gemm" else "cuda"
    if device_type == "cpu":
        return "cpu"
    return "reference"


def _backend(device):
    name = backend_name(device)
    if name == "cuda":
        from . import cuda as _cuda  # imported lazily: CPU users never touch the CUDA loader

        return _cuda
    return _cpu if name == "cpu" else _reference


@contextlib.contextmanager
def _full_fp32_products(device):
    """The searches are exact with full fp32 products only (the GEMM paths use torch matmuls): TF32
    off while one runs on CUDA, whatever set_float32_matmul_precision the caller chose."""
    if device.type != "cuda":
        yield
        return
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def _call(op: str, device, *args, **kwargs):
    with _full_fp32_products(device):
        return getattr(_backend(device), op)(*args, **kwargs)


def nearest_code(x_NC, codebook_KC, *, codebook_sqnorm_K=None):
    """Index of the nearest code (squared L2) for every row of x, and that squared distance.

    x_NC: N x C, codebook_KC: K x C, fp32/bf16/fp16 (mixed dtypes are promoted, never rounded down).
    codebook_sqnorm_K: optional precomputed ||e_k||^2 (fp32) to skip recomputing it per call.
    Ties go to the lowest index. Codes with NaN/inf entries are never chosen; a row with NaN/inf
    (or whose every distance overflows) gets index -1 and sqdist NaN.
    """
    x_NC, codebook_KC, codebook_sqnorm_K = _checks.check_nearest(x_NC, codebook_KC, codebook_sqnorm_K)
    return _call("nearest_code", x_NC.device, x_NC, codebook_KC, codebook_sqnorm_K)


def residual_quantize(x_NC, codebook, depth):
    """Greedy residual quantisation with `depth` levels.

    codebook: K x C shared by all depths, or D x K x C with one codebook per depth (D == depth).
    Returns codes_ND and partial_sums_NDC (fp32) with partial_sums[:, d] = sum_{i<=d} e_i(codes[:, i]);
    depth d searches the fp32 residual x - partial_sums[:, d-1]. An index -1 (see nearest_code)
    makes its partial sums NaN, so the rest of that row is -1 too.
    """
    x_NC, codebook = _checks.check_residual(x_NC, codebook, depth)
    return _call("residual_quantize", x_NC.device, x_NC, codebook, depth)


def sample_rows(probs_NK, u_N):
    """One index per row by inverse CDF from uniforms u_N in [0, 1) (any device; -1 for NaN rows)."""
    return _reference.sample_rows(probs_NK, u_N)


def soft_codes(residual_NC, codebook_KC, tau, *, sample=False, generator=None):
    """probs = softmax(-||r - e_k||^2 / tau) over codes, and optionally one sample per row.

    Memory: the N x K fp32 probs are the output; the CPU path builds them in place, block by block,
    with O(block) temporaries, and the CUDA path writes them once from on-chip tiles (no other
    N x K buffer). tau must be > 0; as tau -> 0 the probs become the one-hot argmin (ties split).
    With sample=True one index per row is drawn from probs using `generator` (same device) for
    reproducibility; rows with no finite distance get NaN probs and sample -1.
    """
    residual_NC, codebook_KC, tau = _checks.check_soft(residual_NC, codebook_KC, tau, sample, generator)
    return _call("soft_codes", residual_NC.device, residual_NC, codebook_KC, tau, sample=sample, generator=generator)
