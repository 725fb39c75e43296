"""kernels/ on CUDA, both paths: the compiled extension and the chunked GEMM path
(TESSERA_KERNELS=gemm), against the float64 brute force and the CPU path. `pytest -m gpu`
selects them (benchmarks/gpu_suite.sh); without CUDA they are skipped."""
import pytest
import torch
from kernel_checks import SHAPES, assert_exact, f64_sqdist, near_tie_tol, rand

import kernels

CUDA = torch.cuda.is_available()


def gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="no CUDA device")(test))


@pytest.fixture(params=["extension", "gemm"])
def cuda_path(request, monkeypatch):
    if request.param == "gemm":
        monkeypatch.setenv("TESSERA_KERNELS", "gemm")
    return request.param


# bf16/fp16 inputs are exact in the products; only an fp32 residual split into hi + lo halves
# loses bits (~2^-16), which bounds the near-tie tolerance of residual_quantize below.
SPLIT_EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-16, torch.float16: 2.0**-20}


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K,C", SHAPES + [(4096, 1024, 256), (1000, 16384, 64)])
def test_cuda_nearest_code_matches_float64(N, K, C, dtype, cuda_path):
    x, cb = rand(N, C, dtype=dtype), rand(K, C, dtype=dtype, seed=K + C)
    idx, sqdist = kernels.nearest_code(x.cuda(), cb.cuda())
    assert idx.is_cuda and sqdist.is_cuda
    assert_exact(x, cb, idx.cpu(), sqdist.cpu())


@gpu
def test_cuda_ties_and_nonfinite_agree_with_cpu(cuda_path):
    base = rand(40, 9, seed=2)
    cb = torch.cat([base, base])
    x = torch.cat([base, rand(30, 9, seed=3)])
    x[41, 1] = float("nan")
    cb[5, 2] = float("inf")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        xc, cbc = x.to(dtype), cb.to(dtype)
        gi, gs = kernels.nearest_code(xc.cuda(), cbc.cuda())
        ci, cs = kernels.nearest_code(xc, cbc)
        assert torch.equal(gi.cpu(), ci)
        torch.testing.assert_close(gs.cpu(), cs, rtol=1e-5, atol=1e-5, equal_nan=True)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("C", [7, 256, 1024])
def test_cuda_residual_quantize_is_greedy_optimal(dtype, shared, C, cuda_path):
    N, K, D = 777, 300, 4
    x = rand(N, C, dtype=dtype)
    cb = rand(K, C, dtype=dtype, seed=5) if shared else rand(D, K, C, dtype=dtype, seed=6)
    codes, partial = kernels.residual_quantize(x.cuda(), cb.cuda(), D)
    codes, partial = codes.cpu(), partial.cpu()
    ps = torch.zeros(N, C)
    for d in range(D):  # each depth must be a (near-)optimal choice for the residual it saw
        cb_d = (cb if shared else cb[d]).float()
        residual = x.float() - ps
        chosen = f64_sqdist(residual, cb_d).gather(1, codes[:, d : d + 1]).squeeze(1)
        slack = chosen - f64_sqdist(residual, cb_d).min(1).values
        assert bool((slack <= near_tie_tol(residual, cb_d, SPLIT_EPS[dtype])).all())
        ps = ps + cb_d[codes[:, d]]
        torch.testing.assert_close(partial[:, d], ps, rtol=1e-6, atol=1e-5)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_soft_codes(dtype, cuda_path):
    r, cb = rand(1000, 64, dtype=dtype), rand(700, 64, dtype=dtype)
    probs, sampled = kernels.soft_codes(r.cuda(), cb.cuda(), 3.0, sample=True,
                                        generator=torch.Generator("cuda").manual_seed(1))
    expect = torch.softmax(-f64_sqdist(r, cb) / 3.0, dim=1)
    torch.testing.assert_close(probs.cpu().double(), expect, rtol=1e-3, atol=1e-6)
    assert sampled.shape == (1000,) and bool((sampled >= 0).all())
    n, K = 200_000, 5
    cbs, rs = rand(K, 3, seed=21).cuda(), rand(1, 3, seed=22).cuda().expand(n, 3)
    probs, sampled = kernels.soft_codes(rs, cbs, 1.0, sample=True, generator=torch.Generator("cuda").manual_seed(2))
    p = probs[0].double().cpu()
    counts = torch.bincount(sampled.cpu(), minlength=K).double()
    assert bool(((counts - n * p).abs() <= 7 * (n * p * (1 - p)).sqrt() + 1).all())


@gpu
def test_cuda_gemm_path_stays_exact_when_the_caller_enabled_tf32(monkeypatch):
    """TF32 products lose 13 mantissa bits; the search turns them off while it runs, then restores them."""
    monkeypatch.setenv("TESSERA_KERNELS", "gemm")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    x, cb = rand(4096, 256), rand(1024, 256, seed=9)
    idx, sqdist = kernels.nearest_code(x.cuda(), cb.cuda())
    assert_exact(x, cb, idx.cpu(), sqdist.cpu())
    assert torch.backends.cuda.matmul.allow_tf32
