"""Residual / vector quantizer math against float64 references, EMA, restarts, soft codes, DDP.

Tests of the one-step EMA and of our restart pin `OURS` (per_depth_update / authors_restart off);
the authors' variants (the default) are checked in tests/unit/test_fidelity_rq.py.
"""
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from einops import rearrange
from testkit import free_port

from pipeline.models.quantizer import ResidualQuantizer, VectorQuantizer

OURS = dict(per_depth_update=False, authors_restart=False)


def _ref_rq(z_NC, books, depth):
    """float64 residual quantization: returns codes_ND, partial_NDC, residuals (r_0..r_{D-1})."""
    z = z_NC.double()
    r, zhat, codes, partial, residuals = z.clone(), torch.zeros_like(z), [], [], []
    for d in range(depth):
        book = books[d].double()
        residuals.append(r.clone())
        k = torch.cdist(r, book).argmin(1)
        codes.append(k)
        zhat = zhat + book[k]
        partial.append(zhat.clone())
        r = r - book[k]
    return torch.stack(codes, 1), torch.stack(partial, 1), residuals


def _books(q):
    return [q.codebook(d).clone() for d in range(q.depth)]


@pytest.mark.parametrize("shared", [True, False])
def test_rq_codes_partial_sums_and_commitment_match_float64(shared):
    torch.manual_seed(0)
    q = ResidualQuantizer(8, 32, 3, shared_codebook=shared, beta=0.25).eval()
    z = torch.randn(2, 8, 4, 4)
    out = q(z)
    z_NC = rearrange(z, "b c h w -> (b h w) c")
    codes, partial, _ = _ref_rq(z_NC, _books(q), 3)
    assert torch.equal(rearrange(out.codes_BHWD, "b h w d -> (b h w) d"), codes)
    commit = ((z_NC.double()[:, None] - partial) ** 2).mean(-1).mean()
    assert out.loss.item() == pytest.approx(0.25 * commit.item(), rel=1e-5)
    zq_NC = rearrange(out.zq_BCHW, "b c h w -> (b h w) c")
    torch.testing.assert_close(zq_NC.double(), partial[:, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(q.lookup(out.codes_BHWD), out.zq_BCHW, atol=1e-5, rtol=0)
    assert torch.equal(q.encode(z), out.codes_BHWD)


def test_straight_through_gradient_and_commitment_gradient():
    torch.manual_seed(1)
    q = ResidualQuantizer(4, 16, 2).eval()
    z = torch.randn(1, 4, 3, 3, requires_grad=True)
    out = q(z)
    out.zq_BCHW.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # STE: identity gradient
    z.grad = None
    out = q(z)
    out.loss.backward()
    z_NC = rearrange(z.detach(), "b c h w -> (b h w) c").double()
    _, partial, _ = _ref_rq(z_NC, _books(q), 2)
    N, C = z_NC.shape
    expected = 0.25 * (2 * (z_NC[:, None] - partial) / (N * C)).mean(1)
    torch.testing.assert_close(rearrange(z.grad, "b c h w -> (b h w) c").double(), expected, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("shared", [True, False])
def test_ema_update_matches_formula(shared):
    torch.manual_seed(2)
    K, C, D, decay, eps = 16, 4, 2, 0.9, 1e-3
    q = ResidualQuantizer(C, K, D, shared_codebook=shared, decay=decay, eps=eps, dead_code_threshold=0.0,
                          **OURS).train()
    cluster, embed_sum = q.cluster_size.double().clone(), q.embed_sum.double().clone()
    books = _books(q)
    z = torch.randn(2, C, 4, 4)
    q(z)
    codes, _, residuals = _ref_rq(rearrange(z, "b c h w -> (b h w) c"), books, D)
    for d in range(D):  # one EMA step per depth, on that depth's residuals, in depth order
        b = 0 if shared else d
        onehot = torch.nn.functional.one_hot(codes[:, d], K).double()
        cluster[b] = decay * cluster[b] + (1 - decay) * onehot.sum(0)
        embed_sum[b] = decay * embed_sum[b] + (1 - decay) * onehot.T @ residuals[d]
    n = cluster.sum(-1, keepdim=True)
    smoothed = (cluster + eps) / (n + K * eps) * n
    torch.testing.assert_close(q.cluster_size.double(), cluster, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(q.embed_sum.double(), embed_sum, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q.embed.double(), embed_sum / smoothed[..., None], atol=1e-5, rtol=1e-5)
    assert int(q.update_step) == 1


def test_eval_mode_never_touches_the_codebook():
    q = ResidualQuantizer(4, 8, 2).eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q(torch.randn(2, 4, 3, 3))
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def test_dead_code_restart_revives_codes_reproducibly_and_resume_exact():
    torch.manual_seed(3)
    q = ResidualQuantizer(4, 32, 2, dead_code_threshold=1.0, **OURS).train()
    q.embed.mul_(100.0)  # far from the data: almost every code is dead after one EMA step
    q.embed_sum.copy_(q.embed[0])
    z = torch.randn(2, 4, 4, 4)
    twin = ResidualQuantizer(4, 32, 2, dead_code_threshold=1.0, **OURS).train()
    twin.load_state_dict(q.state_dict())
    codes, _, residuals = _ref_rq(rearrange(z, "b c h w -> (b h w) c"), _books(q), 2)
    q(z)
    pool = torch.cat(residuals).float()  # shared codebook: residuals of every depth are candidates
    dist = torch.cdist(q.embed[0].double(), pool.double()).min(1).values
    revived = dist < 1e-3 * (1 + pool.norm(dim=1).max())
    unused = torch.ones(32, dtype=torch.bool)
    unused[codes.flatten()] = False
    assert unused.sum() >= 20 and revived[unused].all(), "unused codes must be replaced by batch residuals"
    assert (q.cluster_size[0][revived] >= 1.0).all()
    twin(z)
    assert all(torch.equal(a, b) for a, b in zip(q.state_dict().values(), twin.state_dict().values()))
    # Resume: a fresh module loaded from the state_dict continues bitwise identically.
    resumed = ResidualQuantizer(4, 32, 2, dead_code_threshold=1.0, **OURS).train()
    resumed.load_state_dict(q.state_dict())
    z2 = torch.randn(2, 4, 4, 4) * 50
    q(z2)
    resumed(z2)
    assert all(torch.equal(a, b) for a, b in zip(q.state_dict().values(), resumed.state_dict().values()))


def _with_dead_codes(dead, K=64, C=4, seed=0):
    q = ResidualQuantizer(C, K, 1, dead_code_threshold=1.0, seed=seed, **OURS).train()
    q.cluster_size[0, dead] = 0.0
    return q


def _rows_in(rows_MC, pool_NC):
    """index into pool_NC of each row (exact match), -1 where none."""
    eq = (rows_MC[:, None, :] == pool_NC[None, :, :]).all(-1)
    return torch.where(eq.any(1), eq.float().argmax(1), torch.full((rows_MC.shape[0],), -1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dead_code_restart_draws_distinct_pool_vectors(seed):
    # 20 dead codes, 24 distinct pool vectors: drawing with replacement would repeat one almost surely.
    dead = torch.arange(0, 40, 2)[:20]
    q = _with_dead_codes(dead, seed=seed)
    before = q.embed[0].clone()
    pool = torch.randn(24, 4, generator=torch.Generator().manual_seed(10 + seed))
    q._restart_dead_codes(0, pool)
    picked = _rows_in(q.embed[0][dead], pool)
    assert (picked >= 0).all(), "every dead code is restarted from the pool"
    assert len(set(picked.tolist())) == len(dead), f"duplicate restart vectors: {sorted(picked.tolist())}"
    alive = torch.ones(64, dtype=torch.bool)
    alive[dead] = False
    assert torch.equal(q.embed[0][alive], before[alive])
    assert (q.cluster_size[0][dead] == 1.0).all()
    # Seeded by (seed, update_step): a twin restarts identically.
    twin = _with_dead_codes(dead, seed=seed)
    twin.embed.copy_(before[None])
    twin._restart_dead_codes(0, pool)
    assert torch.equal(twin.embed, q.embed)


def test_dead_code_restart_with_a_pool_smaller_than_the_dead_codes():
    # 20 dead codes, 8 pool vectors: the 8 lowest-index dead codes get the 8 vectors once each; the
    # other 12 stay dead (untouched) for the next update.
    dead = torch.arange(1, 41, 2)[:20]
    q = _with_dead_codes(dead)
    before_embed, before_sizes = q.embed[0].clone(), q.cluster_size[0].clone()
    pool = torch.randn(8, 4, generator=torch.Generator().manual_seed(3))
    q._restart_dead_codes(0, pool)
    picked = _rows_in(q.embed[0][dead[:8]], pool)
    assert sorted(picked.tolist()) == list(range(8))
    assert torch.equal(q.embed[0][dead[8:]], before_embed[dead[8:]])
    assert torch.equal(q.cluster_size[0][dead[8:]], before_sizes[dead[8:]])
    assert (q.cluster_size[0][dead[:8]] == 1.0).all()


def test_soft_codes_rows_sum_to_one_and_small_tau_is_argmin():
    torch.manual_seed(4)
    q = ResidualQuantizer(4, 16, 3).eval()
    z = torch.randn(2, 4, 3, 3)
    probs, codes = q.soft_codes(z, 0.5)
    assert probs.shape == (2, 3, 3, 3, 16)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 3, 3))
    assert torch.equal(codes, q.encode(z))
    probs_cold, _ = q.soft_codes(z, 1e-6)
    assert torch.equal(probs_cold.argmax(-1), q.encode(z))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    _, s1 = q.soft_codes(z, 2.0, sample=True, generator=g1)
    _, s2 = q.soft_codes(z, 2.0, sample=True, generator=g2)
    assert torch.equal(s1, s2) and s1.shape == (2, 3, 3, 3)


def test_soft_codes_from_per_sample_uniforms_do_not_depend_on_the_batch():
    """The prior trainer's stochastic codes: sample b's draws come from its own uniforms, so the
    codes are the same in a batch of 3 and alone (as on 1 rank vs 3), and follow Q_tau."""
    torch.manual_seed(4)
    q = ResidualQuantizer(4, 16, 3).eval()
    z = torch.randn(3, 4, 2, 2)
    u = torch.rand(3, 2, 2, 3, dtype=torch.float64)
    probs, codes = q.soft_codes(z, 2.0, sample=True, uniforms_BHWD=u)
    for b in range(3):
        _, alone = q.soft_codes(z[b:b + 1], 2.0, sample=True, uniforms_BHWD=u[b:b + 1])
        assert torch.equal(alone[0], codes[b])
    # Inverse CDF at depth 0: the code is the first whose cumulative probability exceeds u.
    cdf = probs[..., 0, :].cumsum(-1)
    expected = (cdf < u[..., 0:1].float()).sum(-1).clamp_max(15)
    assert torch.equal(codes[..., 0], expected)


def test_vq_is_exactly_rq_depth_one():
    torch.manual_seed(5)
    rq = ResidualQuantizer(6, 24, 1, kmeans_init=True)
    vq = VectorQuantizer(6, 24, kmeans_init=True)
    vq.load_state_dict(rq.state_dict())
    for step in range(3):
        z = torch.randn(3, 6, 4, 4) * (step + 1)
        a, b = rq(z), vq(z)
        assert torch.equal(a.codes_BHWD, b.codes_BHWD) and torch.equal(a.zq_BCHW, b.zq_BCHW)
        assert torch.equal(a.loss, b.loss) and torch.equal(a.perplexity_D, b.perplexity_D)
    assert all(torch.equal(x, y) for x, y in zip(rq.state_dict().values(), vq.state_dict().values()))
    with pytest.raises(ValueError):
        VectorQuantizer(6, 24, depth=2)


def test_kmeans_init_lowers_distortion():
    torch.manual_seed(6)
    z = torch.randn(4, 4, 8, 8) + 3.0
    plain = ResidualQuantizer(4, 16, 1, dead_code_threshold=0.0).eval()
    km = ResidualQuantizer(4, 16, 1, dead_code_threshold=0.0, kmeans_init=True, decay=1.0 - 1e-5).train()
    km.embed.copy_(plain.embed)
    km(z)
    assert bool(km.initialized)
    assert km.eval()(z).loss < plain(z).loss


def _ddp_worker(rank, world, port, out_dir, authors):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)  # identical initial codebook on every rank
    q = ResidualQuantizer(4, 32, 2, dead_code_threshold=1.0, **({} if authors else OURS)).train()
    torch.manual_seed(100 + rank)  # different data per rank
    for _ in range(3):
        q(torch.randn(2, 4, 4, 4) * 3)
    torch.save({k: v.clone() for k, v in q.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("authors", [True, False], ids=["authors", "ours"])
def test_ema_and_restarts_keep_two_ranks_identical(authors):
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_ddp_worker, args=(2, free_port(), out_dir, authors), nprocs=2, join=True)
        s0 = torch.load(os.path.join(out_dir, "rank0.pt"))
        s1 = torch.load(os.path.join(out_dir, "rank1.pt"))
    assert int(s0["update_step"]) == 3
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k


def test_kmeans_init_starts_from_distinct_batch_vectors():
    torch.manual_seed(0)
    q = ResidualQuantizer(4, 16, 1, dead_code_threshold=0.0, kmeans_init=True, kmeans_iters=0).train()
    vectors = torch.randn(24, 4)  # 24 distinct vectors for 16 codes
    q._kmeans_init(vectors)  # the starting centres (no Lloyd iterations, no EMA step after them)
    book = q.embed[0]
    assert torch.unique(book, dim=0).shape[0] == 16  # with replacement, duplicates appear (p ~ 0.99)
    assert all(any(torch.equal(code, v) for v in vectors) for code in book)
