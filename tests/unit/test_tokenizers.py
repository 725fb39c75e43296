"""Tokenizers: every preset builds, encode/decode shapes, DQ code lengths, routers and budget loss."""
import dataclasses

import pytest
import torch
from testkit import trace_dq_forward

from pipeline.config.schema import ConfigError, build_section
from pipeline.losses import budget_loss
from pipeline.models.dq import DQCodes, DQTokenizer, calibrate_entropy_threshold, patch_entropy
from pipeline.models.registry import build_tokenizer
from pipeline.models.tokenizer_config import TOKENIZER_PRESETS, TokenizerConfig
from pipeline.models.tokenizers import RQTokenizer, Tokenizer

PAPER = [n for n in TOKENIZER_PRESETS if "demo" not in n]
DEMO = [n for n in TOKENIZER_PRESETS if "demo" in n]


def cfg_of(preset, **over):
    return build_section(TokenizerConfig, dict({"preset": preset}, **over), "tokenizer")


def structured_images(n, side, seed=0, patch=8):
    """Flat coloured backgrounds with a few small high-frequency textured patches."""
    g = torch.Generator().manual_seed(seed)
    imgs = (torch.rand(n, 3, 1, 1, generator=g) * 1.6 - 0.8).expand(n, 3, side, side).clone()
    for i in range(n):
        for _ in range(2):
            y, x = (torch.randint(0, side // patch, (2,), generator=g) * patch).tolist()
            imgs[i, :, y:y + patch, x:x + patch] = torch.rand(3, patch, patch, generator=g) * 2 - 1
    return imgs


@pytest.mark.parametrize("preset", DEMO)
def test_demo_presets_train_step_and_roundtrip(preset):
    torch.manual_seed(0)
    model = build_tokenizer(cfg_of(preset), 32)
    assert isinstance(model, Tokenizer)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, aux = model(x)
    assert recon.shape == x.shape
    (recon.pow(2).mean() + aux.quant_loss).backward()
    assert model.get_last_layer().grad is not None
    assert set(aux.logs()) >= {"quant_loss", "usage_d0", "perplexity_d0"}
    model.eval()
    codes = model.encode(x)
    assert model.decode(codes).shape == x.shape
    if isinstance(model, RQTokenizer):
        D = model.depth
        assert codes.shape == (2, 4, 4, D) and codes.dtype == torch.long
        assert model.codes_per_image(codes).tolist() == [16 * D] * 2
    else:
        assert isinstance(codes, DQCodes)
        g = codes.granularity_BHcWc
        expected = (g == 0).sum((1, 2)) + 4 * (g == 1).sum((1, 2))
        assert model.codes_per_image(codes).tolist() == expected.tolist()
        assert [len(s) for s in codes.sequences] == expected.tolist()


@pytest.mark.parametrize("preset", PAPER)
def test_paper_presets_build_on_meta_with_latent_shapes(preset):
    cfg = cfg_of(preset)
    with torch.device("meta"):
        model = build_tokenizer(cfg, 256)
        x = torch.empty(1, 3, 256, 256)
        if isinstance(model, RQTokenizer):
            z = model.encode_latent(x)
            side = 256 // cfg.downsample_factor
            assert z.shape == (1, cfg.z_channels, side, side)
            assert model.decode_latent(z).shape == (1, 3, 256, 256)
        else:
            levels = model.trunk(x)
            fine, coarse = model.fine_head(levels[-2]), model.coarse_head(levels[-1])
            assert coarse.shape == (1, 256, 16, 16) and fine.shape == (1, 256, 32, 32)
            assert model.router_logits(fine, coarse).shape == (1, 16, 16, 2)
            assert model.decode_latent(fine).shape == (1, 3, 256, 256)
    n_params = sum(p.numel() for p in model.parameters())
    assert 3e7 < n_params < 2e8


@pytest.mark.parametrize("preset", PAPER)
def test_paper_architectures_encode_decode_at_256px_when_narrowed(preset):
    # Same levels / attention / code grid as the paper preset, narrowed so a CPU forward is cheap.
    torch.manual_seed(0)
    model = build_tokenizer(cfg_of(preset, ch=8, z_channels=8, codebook_size=64, num_res_blocks=1,
                                   grad_checkpointing=False), 256).eval()
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    codes = model.encode(x)
    assert model.decode(codes).shape == x.shape
    if isinstance(model, RQTokenizer):
        assert codes.shape == (1, *model.code_shape)
    else:
        assert codes.granularity_BHcWc.shape == (1, 16, 16) and codes.code_map_BHW.shape == (1, 32, 32)


@pytest.mark.parametrize("kind", ["rq", "dq"])
def test_patch_size_folds_pixel_patches_into_channels(kind):
    over = dict(ch=8, ch_mult=[1, 2], z_channels=8, codebook_size=16, patch_size=2)
    cfg = cfg_of("rq-demo" if kind == "rq" else "dq-demo", **over)
    assert cfg.downsample_factor == 4  # patch_size x 2 ** (len(ch_mult) - 1)
    torch.manual_seed(0)
    model = build_tokenizer(cfg, 16)
    trunk = model.encoder.trunk if kind == "rq" else model.trunk
    assert trunk.conv_in.in_channels == 3 * 2 * 2 and trunk.level_sides == [8, 4]
    assert model.decoder.conv_out.out_channels == 3 * 2 * 2
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    # The stem is a pure rearrangement: channel (c, i, j) of stem cell (y, x) is pixel (c, 2y+i, 2x+j).
    folded = trunk.stem(x)
    assert torch.equal(folded[:, 3 * 2 * 2 - 1, 1, 2], x[:, 2, 3, 5])
    recon, aux = model(x)
    assert recon.shape == x.shape
    (recon.square().mean() + aux.quant_loss).backward()
    assert trunk.conv_in.weight.grad.abs().sum() > 0
    codes = model.eval().encode(x)
    if kind == "rq":
        assert codes.shape == (2, 4, 4, cfg.depth)
    else:
        assert codes.granularity_BHcWc.shape == (2, 4, 4) and codes.code_map_BHW.shape == (2, 8, 8)
    assert model.decode(codes).shape == x.shape
    with pytest.raises(ConfigError, match="patch_size"):
        build_tokenizer(cfg, 18)


def _tiny_dq(**over):
    base = dict(kind="dq", ch=8, ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[], z_channels=8,
                codebook_size=32, depth=1, lpips_weight=0.0, gan_weight=0.0)
    base.update(over)
    return build_section(TokenizerConfig, base, "tokenizer")


def test_dq_sequences_roundtrip_and_lengths():
    torch.manual_seed(0)
    model = build_tokenizer(_tiny_dq(), 16)
    codes = model.encode(structured_images(3, 16))
    rebuilt = DQCodes.from_sequences(codes.sequences, codes.granularity_BHcWc)
    assert torch.equal(rebuilt.code_map_BHW, codes.code_map_BHW)
    g = codes.granularity_BHcWc
    assert rebuilt.lengths().tolist() == ((g == 0).sum((1, 2)) + 4 * g.sum((1, 2))).tolist()
    torch.testing.assert_close(model.decode(rebuilt), model.decode(codes))
    with pytest.raises(ValueError, match="coarse regions"):
        DQCodes.from_sequences([s[:-1] for s in codes.sequences], g)
    # Coarse regions carry one code copied to their 4 fine cells.
    blocks = codes.code_map_BHW.unfold(1, 2, 2).unfold(2, 2, 2).reshape(3, 4, 4, 4)
    coarse = g == 0
    assert (blocks[coarse] == blocks[coarse][:, :1]).all()


def test_dq_budget_loss_moves_fine_ratio_to_target():
    torch.manual_seed(0)
    model = build_tokenizer(_tiny_dq(target_ratio=0.1, budget_weight=10.0), 16)
    images = structured_images(16, 16, seed=1)

    def eval_ratio():
        model.eval()
        with torch.no_grad():
            return float(model.encode(images).granularity_BHcWc.float().mean())

    model.router_mlp[-1].bias.data = torch.tensor([0.0, 1.0])  # start biased toward fine
    start = eval_ratio()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(200):
        recon, aux = model(images)
        loss = (recon - images).abs().mean() + aux.quant_loss + budget_loss(aux.fine_ratio, 0.1, 10.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = eval_ratio()
    assert start > 0.6 and abs(end - 0.1) < 0.15, (start, end)


@pytest.mark.parametrize("coarse_weight", [0.25, 0.4])
def test_dq_coarse_cells_weigh_coarse_vq_weight_in_vq_loss(coarse_weight):
    """Each fine-grid cell that copies a coarse code weighs tokenizer.coarse_vq_weight in the
    quantizer, each cell of a fine region 1: checked cell by cell against the router's own gates."""
    torch.manual_seed(0)
    model = build_tokenizer(_tiny_dq(coarse_vq_weight=coarse_weight), 16).train()
    seen, _ = trace_dq_forward(model, structured_images(2, 16))
    fine_BHW = seen["fine_BHW"]
    assert 0 < fine_BHW.float().mean() < 1  # both kinds of region occur, so the map below says something
    expected_BHW = torch.where(fine_BHW, 1.0, coarse_weight)
    torch.testing.assert_close(seen["w"], expected_BHW, rtol=0, atol=1e-7)


def test_entropy_router_calibration_hits_target_and_picks_textured_patches():
    model = build_tokenizer(_tiny_dq(router="entropy", target_ratio=0.25), 16).eval()
    images = structured_images(8, 16, seed=2, patch=4)
    with pytest.raises(RuntimeError, match="calibrate_entropy_threshold"):
        model.encode(images)
    thr = calibrate_entropy_threshold(model, iter([images[:4], (images[4:], None)]))
    assert float(model.entropy_threshold) == thr and "entropy_threshold" in model.state_dict()
    gran = model.encode(images).granularity_BHcWc
    ent = patch_entropy(images, 4)
    assert (ent[gran == 1] > ent[gran == 0].max()).all()  # textured patches go fine, flat ones coarse
    assert abs(float(gran.float().mean()) - 0.25) <= 0.15
    recon, aux = model.train()(images)
    assert not aux.fine_ratio.requires_grad and recon.shape == images.shape  # nothing for a budget loss to train


def test_grad_checkpointing_gives_same_gradients():
    cfg = cfg_of("rq-demo", ch=8, z_channels=8, codebook_size=16)
    torch.manual_seed(0)
    a = build_tokenizer(cfg, 16)
    b = build_tokenizer(dataclasses.replace(cfg, grad_checkpointing=True), 16)
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    for m in (a, b):
        recon, aux = m(x)
        (recon.square().mean() + aux.quant_loss).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_state_dict_holds_codebook_buffers():
    keys = build_tokenizer(cfg_of("rq-demo"), 32).state_dict().keys()
    for k in ("embed", "cluster_size", "embed_sum", "update_step", "initialized"):
        assert f"quantizer.{k}" in keys


def test_config_rejects_triple_granularity_and_bad_depths():
    with pytest.raises(ConfigError, match="granularities"):
        cfg_of("dq-demo", granularities=3)
    with pytest.raises(ConfigError, match="depth"):
        cfg_of("dq-demo", depth=2)
    with pytest.raises(ConfigError, match="depth"):
        cfg_of("vq-demo", depth=4)
    with pytest.raises(ConfigError, match="divisible"):
        build_tokenizer(cfg_of("rq-demo"), 36)
    with pytest.raises(ValueError):
        DQTokenizer(dataclasses.replace(cfg_of("dq-demo"), granularities=3), 32)
