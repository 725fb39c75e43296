"""RQ-VAE items 1-2 of docs/fidelity.md: our default training step against a float64 re-derivation of the
authors' RQBottleneck / VQEmbedding (kakaobrain/rq-vae-transformer, rqvae/models/rqvae/quantizations.py).

The re-derivation below is written from their formulas, not copied: per depth, argmin search on the
codebook as it stands, code vector read BEFORE this depth's update, EMA of counts and sums of this
depth's inputs, restart of codes whose EMA size < 1 from row k of a permutation of this depth's
inputs (EMA sum = vector, size = 1), then codebook = EMA sum / Laplace-smoothed size.
"""
import math

import pytest
import torch
from einops import rearrange

from pipeline.config.schema import build_section
from pipeline.models.quantizer import ResidualQuantizer
from pipeline.models.registry import build_tokenizer
from pipeline.models.tokenizer_config import TokenizerConfig

K, C, D = 16, 4, 3


def authors_rq_step(z_NC, book, cluster, embed_sum, depth, decay, eps, restart, perm=lambda n: torch.arange(n)):
    """float64 authors' shared-codebook training forward on one batch.

    Returns codes_ND, partial sums (N, D, C), commitment loss, and the new (book, cluster, embed_sum).
    `perm(n)` stands for their torch.randperm (fixed here so both sides draw the same rows).
    """
    z = z_NC.double()
    book, cluster, ema = book.double().clone(), cluster.double().clone(), embed_sum.double().clone()
    Kb = book.shape[0]
    r, agg, codes, partials = z.clone(), torch.zeros_like(z), [], []
    for _ in range(depth):
        dist = r.pow(2).sum(1, keepdim=True) + book.pow(2).sum(1)[None] - 2 * r @ book.T
        k = dist.argmin(1)
        quant = book[k]  # read before this depth's update
        onehot = torch.nn.functional.one_hot(k, Kb).double()
        cluster = decay * cluster + (1 - decay) * onehot.sum(0)
        ema = decay * ema + (1 - decay) * onehot.T @ r
        if restart:
            assert r.shape[0] >= Kb, "this re-derivation leaves out the noise tiling (tested separately)"
            rows = r[perm(r.shape[0])][:Kb]
            used = (cluster >= 1).double()
            ema = ema * used[:, None] + rows * (1 - used[:, None])
            cluster = cluster * used + (1 - used)
        n = cluster.sum()
        book = ema / (n * (cluster + eps) / (n + Kb * eps))[:, None]
        r = r - quant
        agg = agg + quant
        codes.append(k)
        partials.append(agg.clone())
    partial = torch.stack(partials, 1)
    commit = torch.stack([(z - partial[:, d]).pow(2).mean() for d in range(depth)]).mean()
    return torch.stack(codes, 1), partial, commit, book, cluster, ema


def _identity_perm(n, generator):
    return torch.arange(n)


def _state(q):
    return q.embed[0].clone(), q.cluster_size[0].clone(), q.embed_sum[0].clone()


def _assert_matches(q, out, z_BCHW, ref):
    codes, partial, commit, book, cluster, ema = ref
    assert torch.equal(rearrange(out.codes_BHWD, "b h w d -> (b h w) d"), codes)
    zq = rearrange(out.zq_BCHW, "b c h w -> (b h w) c").double()
    torch.testing.assert_close(zq, partial[:, -1], atol=1e-5, rtol=0)
    assert out.loss.item() == pytest.approx(q.beta * commit.item(), rel=1e-5)
    torch.testing.assert_close(q.cluster_size[0].double(), cluster, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(q.embed_sum[0].double(), ema, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q.embed[0].double(), book, atol=1e-5, rtol=1e-5)


def _batch(seed, scale=1.0):
    return torch.randn(2, C, 6, 6, generator=torch.Generator().manual_seed(seed)) * scale


def test_item1_shared_codebook_is_updated_after_each_depth():
    """No restarts: depth d+1 searches the codebook updated by depth d's assignments (authors)."""
    torch.manual_seed(0)
    decay, eps = 0.5, 1e-5  # a fast EMA makes the within-batch update visible in the codes
    q = ResidualQuantizer(C, K, D, decay=decay, eps=eps, dead_code_threshold=0.0).train()
    assert q.per_depth_update and bool((q.cluster_size == 1).all())  # no restarts: sizes start at 1
    legacy = ResidualQuantizer(C, K, D, decay=decay, eps=eps, dead_code_threshold=0.0, per_depth_update=False).train()
    legacy.load_state_dict(q.state_dict())
    for step in range(3):
        z = _batch(step)
        ref = authors_rq_step(rearrange(z, "b c h w -> (b h w) c"), *_state(q), D, decay, eps, restart=False)
        out, out_legacy = q(z), legacy(z)
        _assert_matches(q, out, z, ref)
    # The test can fail: one step after all depths (ours before) differs from it on these batches.
    assert not torch.equal(out_legacy.codes_BHWD, out.codes_BHWD) or not torch.allclose(legacy.embed, q.embed)


def test_items1_2_default_training_step_matches_authors_with_restarts():
    """Default settings (restarts after every depth, sizes from 0, code = vector / smoothed size) over
    three batches, with the restart permutation fixed to the identity on both sides."""
    torch.manual_seed(1)
    decay, eps = 0.99, 1e-5
    q = ResidualQuantizer(C, K, D, decay=decay, eps=eps).train()
    assert bool((q.cluster_size == 0).all()), "the authors' EMA sizes start at 0"
    q._permutation = _identity_perm
    first_books = []
    for step in range(3):
        z = _batch(10 + step, scale=1.0 + step)
        ref = authors_rq_step(rearrange(z, "b c h w -> (b h w) c"), *_state(q), D, decay, eps, restart=True)
        out = q(z)
        _assert_matches(q, out, z, ref)
        first_books.append(q.embed[0].clone())
    assert int(q.update_step) == 3
    # The first batch restarted every code (sizes from 0: 0.01 x hits < 1), from the LAST depth's
    # inputs (each depth restarts again from its own), as stored EMA sums over smoothed sizes.
    assert not torch.equal(first_books[0], first_books[1])


def test_item2_restarted_code_is_the_vector_over_its_smoothed_size():
    q = ResidualQuantizer(C, K, 1, eps=1e-2).train()  # large eps makes the division visible
    q._permutation = _identity_perm
    q.cluster_size.fill_(5.0)
    dead = torch.tensor([1, 4, 9])
    q.cluster_size[0, dead] = 0.5
    pool = torch.randn(20, C, dtype=torch.float64)
    q._restart_dead_codes(0, pool.float(), salt=0)
    size = q.cluster_size[0].double()
    n = size.sum()
    smoothed = n * (size + 1e-2) / (n + K * 1e-2)
    torch.testing.assert_close(q.embed[0][dead].double(), pool[dead] / smoothed[dead, None], atol=1e-6, rtol=1e-6)
    assert (q.cluster_size[0][dead] == 1.0).all()
    # Ours keeps the vector itself (the alternative stays reachable).
    ours = ResidualQuantizer(C, K, 1, eps=1e-2, authors_restart=False).train()
    ours.cluster_size.fill_(5.0)
    ours.cluster_size[0, dead] = 0.5
    ours._permutation = _identity_perm
    ours._restart_dead_codes(0, pool.float(), salt=0)
    torch.testing.assert_close(ours.embed[0][dead].double(), pool[:3], atol=1e-6, rtol=0)


def test_item2_small_pool_is_tiled_with_noise_and_every_dead_code_restarts():
    torch.manual_seed(2)
    q = ResidualQuantizer(C, K, 1).train()
    q.cluster_size.fill_(0.5)  # every code dead
    pool = torch.randn(5, C)
    q._restart_dead_codes(0, pool, salt=0)
    assert (q.cluster_size[0] == 1.0).all()
    n = float(q.cluster_size[0].sum())
    vecs = q.embed[0].double() * (n * (1 + q.eps) / (n + K * q.eps))  # undo the smoothed-size division
    # Each restarted row is a pool vector plus per-channel noise in [0, 0.01 / sqrt(C)).
    diff = vecs[:, None, :] - pool.double()[None]
    ok = ((diff >= -1e-6) & (diff < 0.01 / math.sqrt(C) + 1e-6)).all(-1)
    assert ok.any(1).all(), "every restarted code is a noisy copy of a pool vector"
    assert torch.unique(q.embed[0], dim=0).shape[0] == K, "the noise separates the copies"


def test_item2_default_restart_without_replacement_is_reproducible_and_resume_exact():
    torch.manual_seed(3)
    q = ResidualQuantizer(C, K, D).train()
    twin = ResidualQuantizer(C, K, D).train()
    twin.load_state_dict(q.state_dict())
    z = _batch(20)
    q(z)
    twin(z)
    assert all(torch.equal(a, b) for a, b in zip(q.state_dict().values(), twin.state_dict().values()))
    # 72 inputs >= K: the restarted codes of the first batch are distinct rows (no replacement).
    assert torch.unique(q.embed[0], dim=0).shape[0] == K
    resumed = ResidualQuantizer(C, K, D).train()
    resumed.load_state_dict(q.state_dict())
    z2 = _batch(21, 3.0)
    q(z2)
    resumed(z2)
    assert all(torch.equal(a, b) for a, b in zip(q.state_dict().values(), resumed.state_dict().values()))


def test_per_depth_update_leaves_inference_alone():
    torch.manual_seed(4)
    q = ResidualQuantizer(C, K, D).eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    z = _batch(30)
    out = q(z)
    assert torch.equal(out.codes_BHWD, q.encode(z))
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def _cfg(**over):
    return build_section(TokenizerConfig, dict({"preset": "rq-demo", "codebook_size": 16}, **over), "tokenizer")


def test_config_switches_reach_the_quantizer():
    q = build_tokenizer(_cfg(), 32).quantizer
    assert q.per_depth_update and q.authors_restart and bool((q.cluster_size == 0).all())
    q = build_tokenizer(_cfg(reference_behaviour=False), 32).quantizer
    assert not q.per_depth_update and not q.authors_restart and bool((q.cluster_size == 1).all())
    q = build_tokenizer(_cfg(reference_behaviour=False, ema_per_depth=True), 32).quantizer
    assert q.per_depth_update and not q.authors_restart
    q = build_tokenizer(_cfg(authors_restart=False), 32).quantizer
    assert q.per_depth_update and not q.authors_restart
    vq = build_tokenizer(_cfg(preset="vq-demo"), 32).quantizer
    assert vq.depth == 1 and vq.authors_restart
