"""pipeline.evaluation.metrics against their formulas; evaluate_tokenizer with a rank that has no val batch."""
import math
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from testkit import free_port

from pipeline.evaluation.metrics import (
    downsample_baseline,
    downsample_side_for_bits,
    feature_statistics,
    frechet_distance,
    frechet_distance_from_statistics,
    mean_colour_baseline,
    psnr_per_image,
)
from pipeline.train.tokenizer_eval import evaluate_tokenizer


# ---------------------------------------------------------------------------------------------
# PSNR and baselines
def test_psnr_matches_formula_on_the_unit_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.tensor([0.1, 0.02, 0.5]).view(3, 1, 1, 1) * torch.randn(3, 3, 8, 8, generator=g)
    y = (x + noise).clamp(-1, 1)
    mse = (((x.double() + 1) / 2 - (y.double() + 1) / 2) ** 2).flatten(1).mean(1)  # on [0, 1], peak 1
    torch.testing.assert_close(psnr_per_image(x, y).double(), 10 * torch.log10(1 / mse), rtol=1e-5, atol=1e-4)
    # Uniform error of 0.1 on the [-1, 1] scale is 0.05 on [0, 1]: 20 log10(1 / 0.05) = 26.02 dB.
    z = torch.zeros(1, 3, 4, 4)
    assert psnr_per_image(z, z + 0.1).item() == pytest.approx(20 * math.log10(20), abs=1e-4)
    assert psnr_per_image(x, y.double()).dtype == torch.float32  # mixed dtypes are fine
    assert psnr_per_image(x, x).tolist() == pytest.approx([100.0] * 3)  # MSE clamped at 1e-10


def test_baselines():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    m = mean_colour_baseline(x)
    assert m.shape == x.shape and torch.allclose(m[:, :, 5, 7], x.mean(dim=(2, 3)))
    assert downsample_side_for_bits(24 * 16) == 4 and downsample_side_for_bits(24 * 16 - 1) == 3
    assert downsample_side_for_bits(1.0) == 1
    flat = torch.full((1, 3, 16, 16), 0.2)
    assert torch.allclose(downsample_baseline(flat, 24 * 16), flat, atol=1 / 127.5)  # 8-bit rounding only


# ---------------------------------------------------------------------------------------------
# Frechet distance
def _gaussian(n, mean, std, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, len(mean), generator=g, dtype=torch.float64) * torch.tensor(std) + torch.tensor(mean)


def test_frechet_from_statistics_diagonal_closed_form():
    # Diagonal covariances commute: Tr((Sa Sb)^1/2) = sum sqrt(a_i b_i), so
    # d^2 = |mu_a - mu_b|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    mu_a, mu_b = torch.tensor([0.0, 1.0, -2.0, 0.5]), torch.tensor([1.0, 1.0, 0.0, -0.5])
    var_a, var_b = torch.tensor([1.0, 4.0, 0.25, 2.0]), torch.tensor([9.0, 1.0, 0.25, 0.5])
    expected = float(((mu_a - mu_b) ** 2).sum() + ((var_a.sqrt() - var_b.sqrt()) ** 2).sum())
    got = frechet_distance_from_statistics(mu_a, torch.diag(var_a), mu_b, torch.diag(var_b))
    assert got == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx((1 + 0 + 4 + 1) + (4 + 1 + 0 + 0.5), rel=1e-12)  # the numbers above, by hand


def test_frechet_from_statistics_full_covariance_matches_scalar_case_rotated():
    # Rotating both Gaussians by the same orthogonal Q leaves the distance unchanged; with a
    # non-diagonal covariance this exercises the matrix square root, not just its diagonal.
    torch.manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    mu_a, mu_b = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    var_a, var_b = torch.rand(5, dtype=torch.float64) + 0.1, torch.rand(5, dtype=torch.float64) + 0.1
    expected = float(((mu_a - mu_b) ** 2).sum() + ((var_a.sqrt() - var_b.sqrt()) ** 2).sum())
    got = frechet_distance_from_statistics(q @ mu_a, q @ torch.diag(var_a) @ q.T, q @ mu_b, q @ torch.diag(var_b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)
    # A non-commuting pair against a direct eigen-decomposition of Sa Sb (real, non-negative eigenvalues).
    sa, sb = q @ torch.diag(var_a) @ q.T, torch.diag(var_b)
    trace_sqrt = torch.linalg.eigvals(sa @ sb).real.clamp_min(0).sqrt().sum()
    expected = float(((mu_a - mu_b) ** 2).sum() + torch.trace(sa) + torch.trace(sb) - 2 * trace_sqrt)
    assert frechet_distance_from_statistics(mu_a, sa, mu_b, sb) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_on_samples_of_two_gaussians():
    mean_a, std_a = [0.0, 0.0, 1.0], [1.0, 2.0, 0.5]
    mean_b, std_b = [1.0, 0.0, 1.0], [1.0, 1.0, 1.5]
    a, b = _gaussian(200_000, mean_a, std_a, seed=1), _gaussian(150_000, mean_b, std_b, seed=2)
    exact = sum((ma - mb) ** 2 + (sa - sb) ** 2 for ma, mb, sa, sb in zip(mean_a, mean_b, std_a, std_b))
    assert exact == pytest.approx(3.0)
    assert frechet_distance(a, b) == pytest.approx(exact, abs=0.03)
    # Exactly the statistics formula on the sample mean / unbiased sample covariance.
    mu, sigma = feature_statistics(a)
    torch.testing.assert_close(mu, a.mean(0))
    torch.testing.assert_close(sigma, torch.cov(a.T))
    assert frechet_distance(a, b) == pytest.approx(frechet_distance_from_statistics(*feature_statistics(a),
                                                                                   *feature_statistics(b)), rel=1e-12)


def test_frechet_distance_identical_symmetric_and_float32_input():
    a = _gaussian(500, [0.0] * 16, [1.0] * 16, seed=3) @ torch.randn(16, 16, dtype=torch.float64)
    b = _gaussian(400, [0.3] * 16, [0.7] * 16, seed=4)
    assert abs(frechet_distance(a, a)) < 1e-8
    assert abs(frechet_distance(a, a[torch.randperm(500)])) < 1e-8  # order does not matter
    d_ab, d_ba = frechet_distance(a, b), frechet_distance(b, a)
    assert d_ab > 1.0 and d_ab == pytest.approx(d_ba, rel=1e-9)
    assert frechet_distance(a.float(), b.float()) == pytest.approx(d_ab, rel=1e-5)  # computed in float64
    # Fewer samples than features: singular covariances stay finite and non-negative.
    few = frechet_distance(a[:5], b[:7])
    assert math.isfinite(few) and few >= -1e-9


def test_frechet_distance_agrees_with_torch_fidelity():
    fid = pytest.importorskip("torch_fidelity.metric_fid")
    a = _gaussian(300, [0.0] * 8, [1.0] * 8, seed=5) @ torch.randn(8, 8, dtype=torch.float64)
    b = _gaussian(250, [0.5] * 8, [2.0] * 8, seed=6)
    stats_a, stats_b = fid.fid_features_to_statistics(a), fid.fid_features_to_statistics(b)
    reference = fid.fid_statistics_to_metric(stats_a, stats_b, verbose=False)[fid.KEY_METRIC_FID]
    assert frechet_distance(a, b) == pytest.approx(float(reference), rel=1e-6)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError):
        frechet_distance(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ValueError):
        frechet_distance(torch.randn(1, 3), torch.randn(10, 3))


# ---------------------------------------------------------------------------------------------
# evaluate_tokenizer under DDP with a rank that has no val batch
class _FakeTokenizer(torch.nn.Module):
    """Codes (B, 2, 2, DEPTH) read off the images; decode is a fixed blur-free map."""

    DEPTH, K = 3, 16

    def encode(self, images):
        cells = torch.nn.functional.adaptive_avg_pool2d(images[:, 0], 2)  # (B, 2, 2) in [-1, 1]
        base = ((cells + 1) / 2 * (self.K - 1)).round().long()
        return torch.stack([(base + d) % self.K for d in range(self.DEPTH)], dim=-1)

    def decode(self, codes):
        x = codes[..., 0].float() / (self.K - 1) * 2 - 1
        return torch.nn.functional.interpolate(x[:, None].expand(-1, 3, -1, -1), size=(8, 8), mode="nearest")

    def codes_per_image(self, codes):
        return torch.full((codes.shape[0],), float(codes[0].numel()))


def _val_batches(seed, n_batches):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.zeros(4, dtype=torch.int64)) for _ in range(n_batches)]


def _eval_worker(rank, world, port, out_dir):
    import datetime

    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    batches = _val_batches(0, 2) if rank == 0 else []  # rank 1's shard of the val split is empty
    try:
        metrics, _ = evaluate_tokenizer(_FakeTokenizer(), batches, codebook_size=_FakeTokenizer.K, max_images=100,
                                        device=torch.device("cpu"))
        result = {"metrics": metrics}
    except Exception as exc:  # reported to the test instead of a bare spawn failure
        result = {"error": f"{type(exc).__name__}: {exc}"}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_evaluate_tokenizer_with_an_empty_rank_matches_one_process():
    single, _ = evaluate_tokenizer(_FakeTokenizer(), _val_batches(0, 2), codebook_size=_FakeTokenizer.K,
                                   max_images=100, device=torch.device("cpu"))
    assert single["eval_images"] == 8 and {f"usage_d{d}" for d in range(3)} <= set(single)
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_eval_worker, args=(2, free_port(), out_dir), nprocs=2, join=True)
        results = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank}: {result.get('error')}"
        assert result["metrics"] == pytest.approx(single), f"rank {rank}"
