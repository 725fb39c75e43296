"""Checks shared by the codebook-search tests (tests/unit/test_kernels*.py): a float64 brute force
and the exactness rule every backend is held to.

Exactness rule: a returned index may differ from the float64 argmin only where the float64
distance of the returned code is within a rounding tolerance of the float64 minimum (a near tie);
the returned sqdist must match the float64 distance of the returned code.
"""
import math

import torch


def f64_sqdist(x_NC, codebook_KC):
    """Exact-enough squared distances in float64 (error ~1e-16 relative, far under fp32's)."""
    x, cb = x_NC.double(), codebook_KC.double()
    return ((x * x).sum(1, keepdim=True) - 2 * x @ cb.t() + (cb * cb).sum(1)).clamp_min(0)


def near_tie_tol(x_NC, codebook_KC, rel_eps):
    """fp32 rounding bound of the surrogate: |x.e| and ||e||^2 are bounded by ||x||^2 + max ||e||^2."""
    scale_N = x_NC.double().pow(2).sum(1) + codebook_KC.double().pow(2).sum(1).max()
    return 32 * rel_eps * math.sqrt(x_NC.shape[1]) * scale_N + 1e-30


def assert_exact(x_NC, codebook_KC, idx_N, sqdist_N, rel_eps=2.0**-23):
    N = x_NC.shape[0]
    assert idx_N.shape == (N,) and idx_N.dtype == torch.int64
    assert sqdist_N.shape == (N,) and sqdist_N.dtype == torch.float32
    if N == 0:
        return
    d64 = f64_sqdist(x_NC, codebook_KC)
    best64 = d64.min(1).values
    idx = idx_N.cpu()
    assert bool((idx >= 0).all()) and bool((idx < codebook_KC.shape[0]).all())
    chosen64 = d64.gather(1, idx.unsqueeze(1)).squeeze(1)
    tol = near_tie_tol(x_NC, codebook_KC, rel_eps)
    mismatch = idx != d64.argmin(1)
    # Only near ties may differ, and those are rare on random data.
    assert bool((chosen64 - best64 <= tol).all()), (chosen64 - best64 - tol).max()
    assert int(mismatch.sum()) <= max(2, N // 50)
    torch.testing.assert_close(sqdist_N.cpu().double(), chosen64, rtol=1e-5 * max(1, x_NC.shape[1] / 64),
                               atol=tol.max().item())


def rand(*shape, dtype=torch.float32, device="cpu", seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else hash(shape) % 2**31)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=device)


SHAPES = [(0, 5, 3), (1, 1, 1), (1, 7, 5), (37, 65, 33), (300, 1000, 17), (129, 130, 64), (64, 4097, 8), (20, 3, 1024),
          (3, 65536, 2)]
