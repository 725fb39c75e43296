"""kernels/ on CPU: codebook search against a float64 brute force (the exactness rule in
tests/kernel_checks.py), ties, non-finite inputs, memory, the dispatch switches and the build
loader. The CUDA paths: tests/unit/test_kernels_cuda.py."""
import pytest
import torch
from kernel_checks import SHAPES, assert_exact, f64_sqdist, rand

import kernels
from kernels import cpu, loader
from kernels import reference as ref


@pytest.fixture(params=["default", "tiny"])
def chunking(request, monkeypatch):
    """Run with the shipped chunk sizes and with tiny ones that force many N- and K-chunks."""
    if request.param == "tiny":
        monkeypatch.setattr(cpu, "CHUNK_BYTES", 4 * 96)
        monkeypatch.setattr(cpu, "MAX_K_CHUNK", 37)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,K,C", SHAPES)
def test_nearest_code_matches_float64(N, K, C, dtype, chunking):
    x, cb = rand(N, C, dtype=dtype), rand(K, C, dtype=dtype, seed=K * 7 + C)
    idx, sqdist = kernels.nearest_code(x, cb)
    assert_exact(x, cb, idx, sqdist)


def test_cpu_equals_reference_and_sqnorm_argument(chunking):
    x, cb = rand(257, 40), rand(300, 40)
    idx, sq = kernels.nearest_code(x, cb)
    ridx, rsq = ref.nearest_code(x, cb)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(sq, rsq)
    idx2, _ = kernels.nearest_code(x, cb, codebook_sqnorm_K=ref.codebook_sqnorm(cb))
    assert torch.equal(idx2, idx)


@pytest.mark.parametrize("K", [6, 40, 300])
def test_duplicate_codes_resolve_to_lowest_index(K, chunking):
    base = rand(K // 2, 9, seed=K)
    cb = torch.cat([base, base])  # code k and k + K/2 are identical
    x = torch.cat([base, rand(50, 9, seed=1)])  # exact hits (distance 0) and random rows
    idx, sqdist = kernels.nearest_code(x, cb)
    # Elementwise float64 (not a matmul): identical codes get bitwise identical distances.
    d64 = (x.double()[:, None] - cb.double()[None]).pow(2).sum(-1)
    lowest = torch.stack([torch.nonzero(row == row.min())[0, 0] for row in d64])
    assert torch.equal(idx, lowest)
    assert bool((idx < K // 2).all())
    assert torch.equal(sqdist[: K // 2], torch.zeros(K // 2))


def test_lowest_duplicate_edge_cases():
    one_hot = torch.eye(50)  # every ||e||^2 equal: all are candidates, none is a duplicate
    assert ref.lowest_duplicate(one_hot) is None
    signed = torch.tensor([[0.0, 1.0], [-0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # -0.0 == +0.0
    assert ref.lowest_duplicate(signed).tolist() == [0, 0, 2, 0]
    assert ref.lowest_duplicate(signed, hash_all=True).tolist() == [0, 0, 2, 0]
    idx, sqdist = kernels.nearest_code(torch.tensor([[0.0, 0.9], [0.9, 0.1]]), signed)
    assert idx.tolist() == [0, 2]


def test_nonfinite_rules_agree_between_reference_and_cpu(chunking):
    x, cb = rand(8, 5), rand(50, 5)
    x[1, 2] = float("nan")
    x[2, 0] = float("inf")
    cb[3] = x[4]  # row 4 would pick code 3 ...
    cb[3, 1] = float("nan")  # ... but a code with NaN is never selectable
    cb[7, 4] = float("-inf")
    for fn in (kernels.nearest_code, ref.nearest_code):
        idx, sqdist = fn(x, cb)
        assert idx[1] == -1 and idx[2] == -1
        assert torch.isnan(sqdist[1]) and torch.isnan(sqdist[2])
        assert not bool(((idx == 3) | (idx == 7)).any())
        clean = torch.tensor([0, 3, 4, 5, 6, 7])
        assert_exact(x[clean], cb[[k for k in range(50) if k not in (3, 7)]], *_remap(idx[clean], sqdist[clean]))
    all_bad = torch.full((4, 5), float("nan"))
    idx, sqdist = kernels.nearest_code(x, all_bad)
    assert bool((idx == -1).all()) and bool(torch.isnan(sqdist).all())


def _remap(idx, sqdist):
    # Index into the codebook with codes 3 and 7 removed.
    return idx - (idx > 3).long() - (idx > 7).long(), sqdist


def test_noncontiguous_and_mixed_dtype_inputs():
    x_full, cb_full = rand(64, 40), rand(30, 40)
    x, cb = x_full[:, ::2], cb_full[:, 1::2]  # strided views
    idx, sq = kernels.nearest_code(x, cb)
    idx_c, sq_c = kernels.nearest_code(x.contiguous(), cb.contiguous())
    assert torch.equal(idx, idx_c) and torch.equal(sq, sq_c)
    # bf16 x with an fp32 codebook is promoted to fp32, never rounded down.
    xb = x.contiguous().bfloat16()
    idx_m, _ = kernels.nearest_code(xb, cb)
    assert torch.equal(idx_m, kernels.nearest_code(xb.float(), cb.contiguous())[0])


def test_large_n_memory_is_bounded_by_the_chunk(monkeypatch):
    monkeypatch.setattr(cpu, "CHUNK_BYTES", 64 << 10)
    monkeypatch.setattr(cpu, "MAX_K_CHUNK", 1000)
    seen = []
    real = ref.surrogate_into

    def spy(out, *args):
        seen.append(out.numel())
        return real(out, *args)

    monkeypatch.setattr(ref, "surrogate_into", spy)
    x, cb = rand(50_000, 4), rand(2500, 4)
    idx, _ = kernels.nearest_code(x, cb)
    assert max(seen) * 4 <= 64 << 10 and len(seen) > 100
    # The workspace depends on K and the budget only, never on N.
    assert cpu.chunk_shape(10**9, 65536) == cpu.chunk_shape(10**4, 65536) == (16, 1000)
    sample = torch.arange(0, 50_000, 997)
    assert_exact(x[sample], cb, idx[sample], kernels.nearest_code(x[sample], cb)[1])


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_quantize_equals_sequential_searches(shared, dtype, chunking):
    N, K, C, D = 70, 45, 13, 4
    x = rand(N, C, dtype=dtype)
    cb = rand(K, C, dtype=dtype, seed=3) if shared else rand(D, K, C, dtype=dtype, seed=4)
    codes, partial = kernels.residual_quantize(x, cb, D)
    assert codes.shape == (N, D) and partial.shape == (N, D, C) and partial.dtype == torch.float32
    ps = torch.zeros(N, C)
    for d in range(D):
        cb_d = cb if shared else cb[d]
        residual = x.float() - ps
        idx, sqdist = kernels.nearest_code(residual, cb_d.float())
        assert torch.equal(codes[:, d], idx)
        assert_exact(residual, cb_d.float(), idx, sqdist)
        ps = ps + cb_d.float()[idx] if d else cb_d.float()[idx]
        assert torch.equal(partial[:, d], ps)
    emb = torch.stack([(cb if shared else cb[d]).float()[codes[:, d]] for d in range(D)], 1)
    torch.testing.assert_close(partial, emb.cumsum(1), rtol=1e-6, atol=1e-6)
    rcodes, rpartial = ref.residual_quantize(x.contiguous(), cb.contiguous(), D)
    assert torch.equal(codes, rcodes) and torch.equal(partial, rpartial)


def test_residual_quantize_nan_row_stays_invalid():
    x, cb = rand(5, 6), rand(20, 6)
    x[2, 3] = float("nan")
    codes, partial = kernels.residual_quantize(x, cb, 3)
    assert bool((codes[2] == -1).all()) and bool(torch.isnan(partial[2]).all())
    assert bool((codes[[0, 1, 3, 4]] >= 0).all())


def test_soft_codes_softmax_of_distances(chunking):
    r, cb = rand(90, 12), rand(33, 12)
    probs, sampled = kernels.soft_codes(r, cb, 2.0)
    assert sampled is None and probs.shape == (90, 33) and probs.dtype == torch.float32
    expect = torch.softmax(-f64_sqdist(r, cb) / 2.0, dim=1)
    torch.testing.assert_close(probs.double(), expect, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(probs.sum(1), torch.ones(90))


def test_soft_codes_small_tau_is_argmin():
    r, cb = rand(200, 16), rand(500, 16)
    probs, sampled = kernels.soft_codes(r, cb, 1e-30, sample=True, generator=torch.Generator().manual_seed(0))
    idx, _ = kernels.nearest_code(r, cb)
    assert torch.equal(probs.argmax(1), idx) and torch.equal(sampled, idx)
    assert torch.equal(probs.max(1).values, torch.ones(200))


def test_soft_codes_sampling_frequencies_match_probs(chunking):
    n, K = 40_000, 6
    cb = rand(K, 3, seed=11)
    r = rand(1, 3, seed=12).expand(n, 3)  # one distribution, n independent draws
    probs, sampled = kernels.soft_codes(r, cb, 1.5, sample=True, generator=torch.Generator().manual_seed(5))
    p = probs[0].double()
    assert torch.allclose(probs, probs[:1].expand_as(probs))
    counts = torch.bincount(sampled, minlength=K).double()
    # Per-bin binomial bound at 7 sigma: false-failure probability < 1e-10 per bin.
    sigma = (n * p * (1 - p)).sqrt()
    assert bool(((counts - n * p).abs() <= 7 * sigma + 1).all()), (counts, n * p)


def test_soft_codes_sampling_is_seeded_and_skips_invalid():
    r, cb = rand(300, 4), rand(10, 4)
    cb[2] = float("nan")
    r[7] = float("inf")
    a = kernels.soft_codes(r, cb, 0.7, sample=True, generator=torch.Generator().manual_seed(9))
    b = kernels.soft_codes(r, cb, 0.7, sample=True, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a[1], b[1])
    assert bool((a[0][:, 2][torch.arange(300) != 7] == 0).all()) and not bool((a[1] == 2).any())
    assert a[1][7] == -1 and bool(torch.isnan(a[0][7]).all())
    ra = ref.soft_codes(r, cb, 0.7, sample=True, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a[1], ra[1])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: kernels.nearest_code(torch.zeros(3), torch.zeros(4, 3)), "2-D"),
        (lambda: kernels.nearest_code(torch.zeros(2, 3), torch.zeros(4, 5)), "C=3"),
        (lambda: kernels.nearest_code(torch.zeros(2, 3, dtype=torch.int64), torch.zeros(4, 3)), "dtype"),
        (lambda: kernels.nearest_code(torch.zeros(2, 3), torch.zeros(4, 3, device="meta")), "device|meta"),
        (lambda: kernels.nearest_code(torch.zeros(2, 3), torch.zeros(0, 3)), "at least one code"),
        (lambda: kernels.nearest_code(torch.zeros(2, 3), torch.zeros(4, 3), codebook_sqnorm_K=torch.zeros(5)),
         "sqnorm"),
        (lambda: kernels.residual_quantize(torch.zeros(2, 3), torch.zeros(4, 3), 0), "depth"),
        (lambda: kernels.residual_quantize(torch.zeros(2, 3), torch.zeros(2, 4, 3), 3), "depth"),
        (lambda: kernels.soft_codes(torch.zeros(2, 3), torch.zeros(4, 3), 0.0), "tau"),
        (lambda: kernels.soft_codes(torch.zeros(2, 3), torch.zeros(4, 3), float("nan")), "tau"),
        (lambda: kernels.soft_codes(torch.zeros(2, 3), torch.zeros(4, 3), 1.0, sample=True, generator=3), "generator"),
    ],
)
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_env_forces_reference(monkeypatch):
    monkeypatch.setenv("TESSERA_KERNELS", "reference")

    def boom(*args, **kwargs):
        raise AssertionError("chunked CPU path used despite TESSERA_KERNELS=reference")

    for name in ("nearest_code", "residual_quantize", "soft_codes"):
        monkeypatch.setattr(cpu, name, boom)
    assert kernels.backend_name(torch.device("cpu")) == "reference"
    assert kernels.backend_name(torch.device("cuda", 0)) == "reference"
    x, cb = rand(10, 4), rand(6, 4)
    assert_exact(x, cb, *kernels.nearest_code(x, cb))
    kernels.residual_quantize(x, cb, 2)
    kernels.soft_codes(x, cb, 1.0)
    monkeypatch.setenv("TESSERA_KERNELS", "fastest")
    with pytest.raises(ValueError, match="TESSERA_KERNELS"):
        kernels.nearest_code(x, cb)


def test_env_gemm_sends_cuda_tensors_through_the_chunked_path(monkeypatch):
    """TESSERA_KERNELS=gemm: CUDA tensors use the chunked GEMM path (plain torch ops on their own
    device: every tensor it allocates follows the input), never the extension."""
    monkeypatch.setenv("TESSERA_KERNELS", "gemm")
    assert kernels.backend_name(torch.device("cuda", 0)) == "cpu"
    assert kernels.backend_name(torch.device("cpu")) == "cpu"
    monkeypatch.delenv("TESSERA_KERNELS")
    assert kernels.backend_name(torch.device("cuda", 0)) == "cuda"
    allocated = []
    for factory in ("empty", "full"):
        real = getattr(torch, factory)

        def spy(*args, _real=real, **kwargs):
            allocated.append(kwargs.get("device"))
            return _real(*args, **kwargs)

        monkeypatch.setattr(cpu.torch, factory, spy)
    monkeypatch.setattr(cpu, "CHUNK_BYTES", 4 * 5 * 3)  # several row and code chunks
    monkeypatch.setattr(cpu, "MAX_K_CHUNK", 3)
    x, cb = rand(12, 4), rand(7, 4)
    assert_exact(x, cb, *cpu.nearest_code(x, cb))
    cpu.soft_codes(x, cb, 1.0, sample=True, generator=torch.Generator().manual_seed(0))
    assert allocated and all(device == x.device for device in allocated), allocated


def test_failed_build_raises_with_log_path(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    def failing_load(**kwargs):
        raise RuntimeError("Error building extension: nvcc fatal : fake failure")

    monkeypatch.setattr(cpp_extension, "load", failing_load)
    monkeypatch.setenv("TESSERA_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setattr(loader, "AOT_MODULE", "kernels._no_such_module")
    loader.reset()
    try:
        for _ in range(2):  # the failure is remembered, not retried
            with pytest.raises(kernels.KernelBuildError, match=str(tmp_path / "build.log")) as info:
                loader.get_cuda_extension()
            assert "fake failure" in info.value.log_path.read_text()
        x, cb = rand(4, 3), rand(5, 3)
        assert_exact(x, cb, *kernels.nearest_code(x, cb))  # CPU path unaffected
    finally:
        loader.reset()


class FakeExtension:
    """Stands in for the compiled module so the CUDA wrappers' glue runs on CPU: it answers like
    the kernels but picks the highest index among duplicates, which the wrappers must undo."""

    def __init__(self, fits):
        self.fits = fits

    @staticmethod
    def _highest_duplicate(idx, cb):
        same = (cb[idx][:, None, :] == cb[None]).all(-1)  # N x K: codes identical to the choice
        return torch.where(idx >= 0, cb.shape[0] - 1 - same.flip(1).int().argmax(1), idx)

    def nearest_code(self, x, cb, sq):
        idx, sqdist = ref.nearest_code(x, cb, sq)
        return self._highest_duplicate(idx, cb), sqdist

    def residual_fits(self, n_feat, device):
        return self.fits

    def residual_quantize(self, x, cb, sq, depth):
        codes, partial = ref.residual_quantize(x, cb, depth)
        cbs = [cb if cb.dim() == 2 else cb[d] for d in range(depth)]
        return torch.stack([self._highest_duplicate(codes[:, d], cbs[d]) for d in range(depth)], 1), partial

    def soft_codes(self, r, cb, sq, tau, sample, seed):
        probs, sampled = ref.soft_codes(r, cb, tau, sample, torch.Generator().manual_seed(seed))
        return probs, sampled if sample else torch.empty(0, dtype=torch.int64)


@pytest.mark.parametrize("fits", [True, False])
def test_cuda_wrapper_glue_with_fake_extension(fits, monkeypatch):
    import contextlib

    from kernels import cuda as cuda_path

    monkeypatch.setattr(cuda_path, "get_cuda_extension", lambda: FakeExtension(fits))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    base = rand(10, 6, seed=1)
    cb = torch.cat([base, base, base])
    x = torch.cat([base, rand(40, 6, seed=2)])
    idx, sqdist = cuda_path.nearest_code(x, cb)
    assert torch.equal(idx, kernels.nearest_code(x, cb)[0]) and bool((idx < 10).all())
    for codebook in (cb, torch.stack([cb, cb.flip(0)])):
        codes, partial = cuda_path.residual_quantize(x, codebook, 2)
        expect = kernels.residual_quantize(x, codebook, 2)
        assert torch.equal(codes, expect[0])
        torch.testing.assert_close(partial, expect[1])
    g = torch.Generator().manual_seed(3)
    probs, sampled = cuda_path.soft_codes(x, cb, 0.5, sample=True, generator=g)
    assert sampled.shape == (50,) and cuda_path.soft_codes(x, cb, 0.5)[1] is None
    torch.testing.assert_close(probs, kernels.soft_codes(x, cb, 0.5)[0])
