"""RQ-Transformer: causality, KV-cached generation == full forward, guidance, per-sample seeds,
preset sizes against the authors' models, and importing a checkpoint in the authors' layout."""

import pytest
import torch
import yaml
from authors_reference import their_prior_logits, write_their_prior_checkpoint

from pipeline.config.schema import ConfigError, build_section
from pipeline.generation.rq_sampler import sample_rq, teacher_forced_logits
from pipeline.generation.sampling import SamplingOptions
from pipeline.importers.rq_official_prior import CheckpointMismatch, load_rq_official_prior
from pipeline.models.prior_config import CodeSpec, PriorConfig
from pipeline.models.registry import build_prior

SPEC = CodeSpec("rq", codebook_size=32, code_dim=8, height=3, width=3, depth=4)


def tiny(**kw) -> torch.nn.Module:
    values = dict(preset="rq-demo", embed_dim=32, n_head=4, spatial_layers=2, depth_layers=2, num_classes=10)
    values.update(kw)
    torch.manual_seed(0)
    return build_prior(build_section(PriorConfig, values, "prior"), SPEC, torch.randn(32, 8)).eval()


def random_codes(B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, SPEC.codebook_size, (B, SPEC.height, SPEC.width, SPEC.depth), generator=g)


@pytest.mark.parametrize("variant", [{}, dict(input_embedding="learned", norm="rmsnorm", mlp="swiglu")])
def test_changing_a_code_never_changes_earlier_logits(variant):
    model, codes, labels = tiny(**variant), random_codes(), torch.tensor([0, 4, 9])
    base = model(codes, labels).flatten(1, 3)  # (B, T*D, K) in generation order
    T, D = SPEC.height * SPEC.width, SPEC.depth
    for t, d in [(0, 0), (0, 3), (4, 1), (8, 3)]:
        changed = codes.clone().view(3, T, D)
        changed[:, t, d] = (changed[:, t, d] + 1) % SPEC.codebook_size
        out = model(changed.view_as(codes), labels).flatten(1, 3)
        step = t * D + d
        # The logits at step s predict code s: they may depend only on codes before s.
        assert torch.equal(out[:, :step + 1], base[:, :step + 1]), (t, d)
        if step + 1 < T * D:
            assert not torch.allclose(out[:, step + 1:], base[:, step + 1:])


def test_kv_cached_logits_equal_full_forward():
    model, codes, labels = tiny(), random_codes(), torch.tensor([1, 2, 3])
    full = model(codes, labels)
    cached = teacher_forced_logits(model, codes, labels)
    torch.testing.assert_close(cached, full, atol=2e-5, rtol=1e-5)


def test_top_k_1_is_greedy_and_guidance_scale_1_is_conditional():
    model, labels = tiny(), torch.tensor([3, 7])
    greedy = sample_rq(model, labels, [0, 1], seed=0, opts=SamplingOptions(top_k=[1]))
    assert torch.equal(model(greedy, labels).argmax(-1), greedy)
    plain = sample_rq(model, labels, [5, 6], seed=3)
    assert torch.equal(sample_rq(model, labels, [5, 6], seed=3, opts=SamplingOptions(cfg_scale=1.0)), plain)
    guided = sample_rq(model, labels, [5, 6], seed=3, opts=SamplingOptions(cfg_scale=4.0))
    assert not torch.equal(guided, plain)
    # The linear schedule starts at scale 1: the first code is the unguided one.
    ramp = sample_rq(model, labels, [5, 6], seed=3, opts=SamplingOptions(cfg_scale=4.0, cfg_schedule="linear"))
    assert torch.equal(ramp[:, 0, 0, 0], plain[:, 0, 0, 0])


def test_samples_do_not_depend_on_the_batch():
    model = tiny()
    labels = torch.arange(16) % 10
    batch = sample_rq(model, labels, range(100, 116), seed=7, opts=SamplingOptions(top_p=[0.9], cfg_scale=2.0))
    for i in (0, 5, 15):
        alone = sample_rq(model, labels[i:i + 1], [100 + i], seed=7, opts=SamplingOptions(top_p=[0.9], cfg_scale=2.0))
        assert torch.equal(alone[0], batch[i])
    assert not torch.equal(batch[0], batch[1])
    assert not torch.equal(sample_rq(model, labels[:1], [100], seed=8), sample_rq(model, labels[:1], [100], seed=7))


def test_label_dropout_and_conditioning_checks():
    model = tiny(class_dropout=0.5)
    labels = torch.zeros(1000, dtype=torch.long)
    dropped = model.drop_labels(labels, torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0, model.null_class} and 400 < int((dropped == 10).sum()) < 600
    with pytest.raises(ValueError, match="labels"):
        sample_rq(model, torch.tensor([10]), [0], seed=0)
    uncond = tiny(num_classes=0)
    assert uncond.class_emb.weight.shape[0] == 1 and uncond.drop_labels(labels) is labels
    assert sample_rq(uncond, None, [0, 1], seed=0).shape == (2, 3, 3, 4)
    with pytest.raises(ValueError, match="guidance"):
        sample_rq(uncond, None, [0], seed=0, opts=SamplingOptions(cfg_scale=2.0))


# Parameter counts of the authors' models (their code on the meta device, from their released configs).
AUTHORS = {"rq-480m": (16384, 480_921_088), "rq-821m": (16384, 820_899_328), "rq-1.4b": (16384, 1_387_529_728),
           "rq-3.8b": (16384, 3_822_488_064), "rq-ffhq-355m": (2048, 355_393_536)}


@pytest.mark.parametrize("preset", sorted(AUTHORS))
def test_presets_match_the_authors_parameter_counts(preset):
    K, theirs = AUTHORS[preset]
    cfg = build_section(PriorConfig, {"preset": preset}, "prior")
    with torch.device("meta"):
        model = build_prior(cfg, CodeSpec("rq", K, 256, 8, 8, 4))
    ours = sum(p.numel() for p in model.parameters())
    assert abs(ours - theirs) / theirs < 0.005, (ours, theirs)
    # The only difference: our null-class row for guidance.
    assert ours - theirs == (cfg.embed_dim if cfg.num_classes else 0)


def test_unknown_preset_and_bad_heads_are_clear_errors():
    with pytest.raises(ConfigError, match="rq-1.4b"):
        build_section(PriorConfig, {"preset": "rq-1.4"}, "prior")
    with pytest.raises(ConfigError, match="n_head"):
        build_section(PriorConfig, {"embed_dim": 30, "n_head": 4}, "prior")
    with pytest.raises(ConfigError, match="prior.kind"):
        build_prior(build_section(PriorConfig, {"kind": "rq"}, "prior"), CodeSpec("dq", 16, 4, 2, 2))


def test_authors_layout_checkpoint_imports_with_identical_logits(tmp_path):
    sd, book = write_their_prior_checkpoint(tmp_path / "stage2")
    model, cfg, spec = load_rq_official_prior(tmp_path / "stage2", book, ema=False)
    assert (spec.height, spec.width, spec.depth, spec.codebook_size, cfg.num_classes) == (2, 3, 3, 40, 5)
    codes = torch.randint(0, 40, (4, 2, 3, 3), generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 4, 2])
    expected = their_prior_logits(sd, codes, labels, book, n_head=3, n_body=2, n_head_layers=2)
    with torch.no_grad():
        torch.testing.assert_close(model(codes, labels), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(teacher_forced_logits(model, codes, labels), expected, atol=1e-5, rtol=1e-5)
    ema, _, _ = load_rq_official_prior(tmp_path / "stage2", book)  # default: the EMA weights
    torch.testing.assert_close(ema.pos_hw, sd["pos_emb_hw"] + 0.01)


def test_authors_checkpoint_mismatches_name_the_tensor(tmp_path):
    sd, book = write_their_prior_checkpoint(tmp_path / "s")
    for broken, match in ((dict(sd, **{"head_mlp.weight": torch.zeros(3, 3)}), "head_mlp.weight.*\\(3, 3\\)"),
                          ({k: v for k, v in sd.items() if k != "pos_emb_d"}, "missing.*pos_d"),
                          (dict(sd, extra=torch.zeros(1)), "unexpected.*extra")):
        torch.save({"state_dict": broken}, tmp_path / "s" / "model.pt")
        with pytest.raises(CheckpointMismatch, match=match):
            load_rq_official_prior(tmp_path / "s", book)
    config = yaml.safe_load((tmp_path / "s" / "config.yaml").read_text())
    config["arch"]["cumsum_depth_ctx"] = False
    (tmp_path / "s" / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match="cumsum_depth_ctx"):
        load_rq_official_prior(tmp_path / "s", book)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_attention_backends_agree_on_gpu():
    """flash-attn (when installed) and SDPA's flash kernel against the fp32 math reference, and the
    bf16 KV-cached sampler path against the full forward on the GPU."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pipeline.models import attention

    torch.manual_seed(0)
    attn = attention.SelfAttention(attention.BlockConfig(embed_dim=256, n_head=4, resid_dropout=0.0)).cuda().eval()
    x = torch.randn(2, 300, 256, device="cuda")
    attn.use_flash_attn = False
    with sdpa_kernel(SDPBackend.MATH):
        reference = attn(x)
    bf16 = attn.to(torch.bfloat16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        torch.testing.assert_close(bf16(x.bfloat16()).float(), reference, atol=3e-2, rtol=3e-2)
    if attention.flash_attn_func is not None:
        bf16.use_flash_attn = True
        torch.testing.assert_close(bf16(x.bfloat16()).float(), reference, atol=3e-2, rtol=3e-2)
    model = tiny().cuda()
    codes, labels = random_codes().cuda(), torch.tensor([1, 2, 3], device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        full = model(codes, labels).float()
        cached = teacher_forced_logits(model, codes, labels).float()
    torch.testing.assert_close(cached, full, atol=5e-2, rtol=5e-2)


def test_sampling_with_and_without_the_kv_cache_gives_the_same_codes():
    model, labels = tiny(), torch.tensor([2, 5])
    opts = SamplingOptions(top_k=[8], cfg_scale=1.5)
    assert torch.equal(sample_rq(model, labels, [0, 1], seed=1, opts=opts),
                       sample_rq(model, labels, [0, 1], seed=1, opts=opts, use_cache=False))


def test_a_plain_raster_transformer_is_the_depth_1_case():
    spec = CodeSpec("rq", 32, 8, 4, 4, 1)
    cfg = build_section(PriorConfig, dict(preset="rq-demo", embed_dim=32, spatial_layers=3, depth_layers=0,
                                          num_classes=10), "prior")
    model = build_prior(cfg, spec, torch.randn(32, 8)).eval()
    codes = torch.randint(0, 32, (2, 4, 4, 1))
    torch.testing.assert_close(teacher_forced_logits(model, codes, torch.tensor([1, 2])),
                               model(codes, torch.tensor([1, 2])), atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="depth 1"):
        build_prior(cfg, SPEC)
