"""DQ-VAE items 3-7 of docs/fidelity.md: our default against float64 re-derivations of the authors' formulas
(CrossmodalGroup/DynamicVectorQuantization: EncoderDual, budget, quantize2_mask, RouterDual,
DecoderPositional / fourier_embedding, dqvae_dual_entropy's Entropy), written from the formulas.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from testkit import trace_dq_forward

from pipeline.config.schema import build_section
from pipeline.losses import budget_loss
from pipeline.models.dq import AuthorsPositionEmbedding, DQTokenizer, patch_entropy
from pipeline.models.quantizer import VectorQuantizer
from pipeline.models.registry import build_tokenizer
from pipeline.models.tokenizer_config import TokenizerConfig

K, C = 16, 4


def _cfg(**over):
    base = dict(kind="dq", ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[], z_channels=32,
                codebook_size=K, depth=1, lpips_weight=0.0, gan_weight=0.0)
    base.update(over)
    return build_section(TokenizerConfig, base, "tokenizer")


def _hard_gate(logits, noise):
    """Straight-through hard Gumbel-softmax with fixed noise: one-hot forward, soft gradient."""
    soft = torch.softmax(logits + noise, -1)
    hard = F.one_hot(soft.argmax(-1), 2).to(soft.dtype)
    return hard - soft.detach() + soft


# ---- item 3: router gradient -------------------------------------------------------------------
def test_item3_gate_gradient_is_inner_product_with_the_chosen_features():
    g = torch.Generator().manual_seed(0)
    B, Hc = 2, 3
    h_fine = torch.randn(B, C, 2 * Hc, 2 * Hc, generator=g, dtype=torch.float64)
    h_coarse = torch.randn(B, C, Hc, Hc, generator=g, dtype=torch.float64)
    upstream = torch.randn(B, C, 2 * Hc, 2 * Hc, generator=g, dtype=torch.float64)
    logits = torch.randn(B, Hc, Hc, 2, generator=g, dtype=torch.float64, requires_grad=True)
    noise = -torch.log(-torch.log(torch.rand(B, Hc, Hc, 2, generator=g, dtype=torch.float64)))
    gate = _hard_gate(logits, noise)
    gate.retain_grad()
    merged = DQTokenizer.merge(h_fine, h_coarse, gate)  # default: gate_on_chosen
    (merged * upstream).sum().backward()
    # Authors: h_dual = where(fine, h_fine, up(h_coarse)) * max(gate): d/dgate[chosen] = <g, h_chosen>.
    idx = gate.detach().argmax(-1)
    coarse_up = h_coarse.repeat_interleave(2, -1).repeat_interleave(2, -2)
    fine_up = repeat(idx == 1, "b h w -> b 1 (h p) (w q)", p=2, q=2)
    chosen = torch.where(fine_up, h_fine, coarse_up)
    torch.testing.assert_close(merged.detach(), chosen)  # same forward as ours before
    per_region = rearrange(upstream * chosen, "b c (h p) (w q) -> b h w (c p q)", p=2, q=2).sum(-1)
    expected = F.one_hot(idx, 2).double() * per_region[..., None]
    torch.testing.assert_close(gate.grad, expected, atol=1e-12, rtol=1e-10)
    # The alternative (ours before): d/dgate_fine = <g, h_fine - up(h_coarse)>, nothing on coarse.
    gate2 = _hard_gate(logits.detach(), noise).requires_grad_(True)
    (DQTokenizer.merge(h_fine, h_coarse, gate2, gate_on_chosen=False) * upstream).sum().backward()
    diff = rearrange(upstream * (h_fine - coarse_up), "b c (h p) (w q) -> b h w (c p q)", p=2, q=2).sum(-1)
    torch.testing.assert_close(gate2.grad[..., 1], diff)
    assert not torch.allclose(gate2.grad, expected)


def test_item3_model_uses_the_gate_on_chosen_by_default():
    torch.manual_seed(0)
    model = build_tokenizer(_cfg(), 16).train()
    assert model.gate_on_chosen
    recon, aux = model(torch.rand(2, 3, 16, 16) * 2 - 1)
    (recon.square().mean() + aux.quant_loss).backward()
    assert model.router_mlp[0].weight.grad.abs().sum() > 0  # the reconstruction trains the router
    assert not build_tokenizer(_cfg(dq_gate_on_chosen=False), 16).gate_on_chosen


# ---- item 4: budget loss -----------------------------------------------------------------------
def test_item4_released_configs_amount_to_twice_gamma():
    g = torch.Generator().manual_seed(1)
    B, Hc, gamma, target = 3, 4, 10.0, 0.5
    logits = torch.randn(B, Hc, Hc, 2, generator=g, dtype=torch.float64, requires_grad=True)
    noise = -torch.log(-torch.log(torch.rand(B, Hc, Hc, 2, generator=g, dtype=torch.float64)))
    gate = _hard_gate(logits, noise)
    # Authors (BudgetConstraint_RatioMSE_DualGrain, calculate_all=True): ratio from both gate entries,
    # gamma * ((1 - ratio) - (1 - target))^2 returned added to itself.
    hw = Hc * Hc
    ratio = ((gate[..., 0] + 4.0 * gate[..., 1]).sum() / B - hw) / (4 * hw - hw)
    last = gamma * ((1 - ratio) - (1 - target)) ** 2
    theirs = last + last
    ours_paper = budget_loss(gate[..., 1].mean(), target, gamma)
    ours_doubled = budget_loss(gate[..., 1].mean(), target, 2 * gamma)
    assert theirs.item() == pytest.approx(2 * ours_paper.item(), rel=1e-12)
    assert theirs.item() == pytest.approx(ours_doubled.item(), rel=1e-12)
    grad_theirs, = torch.autograd.grad(theirs, logits, retain_graph=True)
    grad_ours, = torch.autograd.grad(ours_doubled, logits)
    torch.testing.assert_close(grad_ours, grad_theirs, atol=1e-12, rtol=1e-9)  # same router gradient


# ---- item 5: VQ loss weighting and unweighted EMA ---------------------------------------------
def test_item5_vq_loss_and_ema_follow_the_authors_weighting():
    torch.manual_seed(2)
    decay, eps, beta = 0.9, 1e-5, 0.25
    q = VectorQuantizer(C, K, decay=decay, eps=eps, beta=beta, dead_code_threshold=0.0).train()
    assert q.authors_weighting
    book, cluster = q.embed[0].double().clone(), q.cluster_size[0].double().clone()
    ema = q.embed_sum[0].double().clone()
    z = torch.randn(2, C, 4, 4, requires_grad=True)
    w = repeat((torch.rand(2, 2, 2) < 0.5).float(), "b h w -> b (h p) (w q)", p=2, q=2) * 0.75 + 0.25
    out = q(z, w)
    out.loss.backward()
    z_NC = rearrange(z.detach(), "b c h w -> (b h w) c").double()
    w_N = rearrange(w, "b h w -> (b h w)").double()
    k = torch.cdist(z_NC, book).argmin(1)
    x_q = book[k]
    N = z_NC.shape[0]
    # Authors: beta*mean(w*(sg[x_q]-x)^2) + mean(w*(x_q-sg[x])^2) over N*C elements; x_q has no grad.
    value = beta * (w_N[:, None] * (x_q - z_NC) ** 2).mean() + (w_N[:, None] * (x_q - z_NC) ** 2).mean()
    grad = beta * 2 * w_N[:, None] * (z_NC - x_q) / (N * C)
    assert out.loss.item() == pytest.approx(value.item(), rel=1e-5)
    torch.testing.assert_close(rearrange(z.grad, "b c h w -> (b h w) c").double(), grad, atol=1e-8, rtol=1e-5)
    # EMA counts every cell once, whatever its weight (a coarse region counts like its 4 fine cells).
    onehot = F.one_hot(k, K).double()
    cluster = decay * cluster + (1 - decay) * onehot.sum(0)
    ema = decay * ema + (1 - decay) * onehot.T @ z_NC
    n = cluster.sum()
    torch.testing.assert_close(q.cluster_size[0].double(), cluster, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(q.embed[0].double(), ema / (n * (cluster + eps) / (n + K * eps))[:, None],
                               atol=1e-5, rtol=1e-5)
    # The alternative (ours before): loss normalised by sum(w), EMA weighted.
    ours = VectorQuantizer(C, K, decay=decay, eps=eps, beta=beta, dead_code_threshold=0.0,
                           authors_weighting=False).train()
    ours.embed.copy_(book[None].float())
    ours.embed_sum.copy_(book[None].float())
    ours.cluster_size.fill_(1.0)
    out_ours = ours(z.detach(), w)
    err = ((x_q - z_NC) ** 2).mean(1)
    assert out_ours.loss.item() == pytest.approx(beta * ((w_N * err).sum() / w_N.sum()).item(), rel=1e-5)
    assert out_ours.loss.item() != pytest.approx(out.loss.item(), rel=1e-3)


@pytest.mark.parametrize("authors", [True, False])
def test_item5_dq_model_loss_weighs_its_coarse_cells(authors):
    """The VQ loss the DQ model reports, recomputed from its own latent, codebook and router gates:
    coarse copies weigh a quarter, fine cells 1, in the authors' form or in ours (dq_unweighted_vq)."""
    torch.manual_seed(0)
    model = build_tokenizer(_cfg(dq_unweighted_vq=authors), 16).train()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    seen, aux = trace_dq_forward(model, images)
    fine_N = rearrange(seen["fine_BHW"], "b h w -> (b h w)")
    assert 0 < fine_N.double().mean() < 1  # both kinds of region, so the weights matter
    w_N = torch.where(fine_N, 1.0, 0.25).double()
    z_NC = rearrange(seen["z"], "b c h w -> (b h w) c")
    err_N = ((seen["book"][torch.cdist(z_NC, seen["book"]).argmin(1)] - z_NC) ** 2).mean(1)
    beta = 0.25
    expected = (1 + beta) * (w_N * err_N).mean() if authors else beta * (w_N * err_N).sum() / w_N.sum()
    assert aux.quant_loss.item() == pytest.approx(expected.item(), rel=1e-5)


# ---- item 6: entropy statistic -----------------------------------------------------------------
def authors_entropy(images, patch):
    """float64: gray 0.2989/0.5870/0.1140, non-overlapping patches, Gaussian kernel sigma 0.01 on
    32 bins over [-1, 1], mean over the patch, normalised (+1e-40), +1e-40, -sum p log p."""
    x = images.double()
    gray = 0.2989 * x[:, 0:1] + 0.5870 * x[:, 1:2] + 0.1140 * x[:, 2:]
    B, _, H, W = gray.shape
    values = F.unfold(gray, kernel_size=patch, stride=patch).transpose(1, 2).reshape(-1, patch * patch)
    bins = torch.linspace(-1, 1, 32, dtype=torch.float64)
    kern = torch.exp(-0.5 * ((values[:, :, None] - bins[None, None]) / 0.01) ** 2)
    pdf = kern.mean(1)
    pdf = pdf / (pdf.sum(1, keepdim=True) + 1e-40) + 1e-40
    ent = -(pdf * torch.log(pdf)).sum(1)
    return ent.reshape(B, H // patch, W // patch)


def test_item6_entropy_is_the_gaussian_kernel_histogram():
    g = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 16, 16, generator=g) * 2.2 - 1.1  # a little outside [-1, 1] too: no clamp
    images[0, :, :4, :4] = 0.3  # flat patches: ~0 for the authors, not for triangular bins
    images[1, :, 4:8, :4] = -1 + 1 / 31  # flat, half-way between two bin centres
    ref = authors_entropy(images, 4)
    ours = patch_entropy(images, 4)  # defaults: kernel="gaussian", sigma=0.01, 32 bins
    torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=1e-5)
    assert float(ref[0, 0, 0]) < 1e-3
    assert not torch.allclose(patch_entropy(images, 4, kernel="triangular").double(), ref, atol=1e-2)
    model = build_tokenizer(_cfg(router="entropy"), 16)
    torch.testing.assert_close(model.patch_entropy(images).double(), ref, atol=1e-5, rtol=1e-5)
    assert build_tokenizer(_cfg(router="entropy", dq_gaussian_entropy=False), 16).entropy_kernel == "triangular"


# ---- item 7: router GroupNorm and decoder position embedding ----------------------------------
def _group_norm64(x, groups, weight, bias, eps=1e-6):
    B, Cx, H, W = x.shape
    xg = x.reshape(B, groups, -1)
    mean, var = xg.mean(-1, keepdim=True), xg.var(-1, unbiased=False, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(B, Cx, H, W)
    return y * weight.double()[None, :, None, None] + bias.double()[None, :, None, None]


def test_item7_router_groupnorm_has_32_groups_like_the_authors():
    torch.manual_seed(4)
    model = build_tokenizer(_cfg(), 16)  # z_channels 32: ours before used 8 groups of 4
    assert model.router_norm_fine.num_groups == 32 and model.router_norm_coarse.num_groups == 32
    for norm in (model.router_norm_fine, model.router_norm_coarse):
        norm.weight.data.uniform_(0.5, 1.5), norm.bias.data.uniform_(-0.5, 0.5)
    h_fine, h_coarse = torch.randn(2, 32, 4, 4), torch.randn(2, 32, 2, 2)
    logits = model.router_logits(h_fine, h_coarse)
    # Authors' DualGrainFeatureRouter: GroupNorm("group-32"), avgpool 2 on fine, cat [coarse, fine], MLP.
    fine = F.avg_pool2d(_group_norm64(h_fine.double(), 32, model.router_norm_fine.weight.detach(),
                                      model.router_norm_fine.bias.detach()), 2)
    coarse = _group_norm64(h_coarse.double(), 32, model.router_norm_coarse.weight.detach(),
                           model.router_norm_coarse.bias.detach())
    feats = torch.cat([coarse, fine], 1).permute(0, 2, 3, 1)
    lin1, lin2 = model.router_mlp[0], model.router_mlp[2]
    hidden = F.silu(feats @ lin1.weight.double().T + lin1.bias.double())
    expected = hidden @ lin2.weight.double().T + lin2.bias.double()
    torch.testing.assert_close(logits.detach().double(), expected, atol=1e-5, rtol=1e-5)
    assert build_tokenizer(_cfg(dq_authors_layers=False), 16).router_norm_fine.num_groups == 8


def test_item7_decoder_position_embedding_is_fourier_plus_row_column():
    torch.manual_seed(5)
    model = build_tokenizer(_cfg(), 16)
    pos = model.position_bias
    assert isinstance(pos, AuthorsPositionEmbedding) and not hasattr(model, "pos_embed")
    side, z = pos.side, 32
    h = torch.randn(2, z, side, side)
    # Authors: coords (x along the width, y along the height) on linspace(-1, 1); sin(1x1 conv);
    # then col_embed[j] + row_embed[i].
    t = torch.linspace(-1, 1, side, dtype=torch.float64)
    coords = torch.stack([t.view(1, -1).expand(side, side), t.view(-1, 1).expand(side, side)])  # (2, H, W)
    Wf, bf = pos.fourier.weight.detach().double()[:, :, 0, 0], pos.fourier.bias.detach().double()
    fourier = torch.sin(torch.einsum("oc,chw->ohw", Wf, coords) + bf[:, None, None])
    learned = (pos.col_embed.weight.detach().double()[None, :, :] + pos.row_embed.weight.detach().double()[:, None, :])
    expected = h.double() + fourier[None] + learned.permute(2, 0, 1)[None]
    torch.testing.assert_close(pos(h).double(), expected, atol=1e-5, rtol=1e-5)
    # Their initialisations: SIREN-style first layer, truncated normal (std 1, cut at +-2).
    assert float(Wf.abs().max()) <= math.sqrt(4.5)
    rows = pos.row_embed.weight.detach()
    assert float(rows.abs().max()) <= 2.0 and 0.7 < float(rows.std()) < 1.05
    # The decoder receives post_quant_conv(zq) plus that bias.
    zq = torch.randn(1, z, side, side)
    with torch.no_grad():
        torch.testing.assert_close(model.decode_latent(zq), model.decoder(pos(model.post_quant_conv(zq))))
    legacy = build_tokenizer(_cfg(dq_authors_layers=False), 16)
    assert hasattr(legacy, "pos_embed") and not hasattr(legacy, "position_bias")
    with pytest.raises(RuntimeError, match="dq_authors_layers"):
        model.load_state_dict(legacy.state_dict())


def test_reference_behaviour_false_restores_every_dq_item():
    model = build_tokenizer(_cfg(reference_behaviour=False), 16)
    assert not model.gate_on_chosen and model.entropy_kernel == "triangular" and not model.authors_layers
    assert not model.quantizer.authors_weighting and not model.quantizer.authors_restart
