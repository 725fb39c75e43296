"""Token drawing: top-k / top-p against their definitions, inverse-CDF draws, guidance, seeds."""
import pytest
import torch

from pipeline.generation.sampling import (
    SamplingOptions,
    draw,
    filter_logits,
    guidance_scale,
    guide,
    per_sample_uniforms,
    sample_seed,
)


def test_top_k_and_top_p_keep_what_their_definitions_keep():
    logits = torch.log(torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]]))
    assert (filter_logits(logits, top_k=2) > 0).tolist() == [[False, True, False, True, False]]
    # Nucleus: the most likely tokens until their mass reaches p, including the one crossing it.
    assert (filter_logits(logits, top_p=0.7) > 0).tolist() == [[False, True, False, True, False]]
    assert (filter_logits(logits, top_p=0.71) > 0).tolist() == [[False, True, False, True, True]]
    assert (filter_logits(logits, top_p=0.01) > 0).sum() == 1
    probs = filter_logits(logits, top_p=0.8)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1))
    torch.testing.assert_close(probs[0, [1, 3, 4]], torch.tensor([0.4, 0.3, 0.15]) / 0.85)
    hot = filter_logits(logits, temperature=0.5)
    torch.testing.assert_close(hot, torch.softmax(logits / 0.5, -1))


def test_draw_is_the_inverse_cdf_and_never_picks_a_zero():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5]]).repeat(4, 1)
    u = torch.tensor([0.0, 0.49, 0.5, 0.999999], dtype=torch.float64)
    assert draw(probs, u).tolist() == [1, 1, 3, 3]
    masked = filter_logits(torch.tensor([[0.0, float("-inf"), 2.0]]), top_k=1)
    assert draw(masked, torch.tensor([0.0])).item() == 2
    # Frequencies follow the probabilities.
    p = torch.tensor([[0.1, 0.6, 0.3]])
    picks = draw(p.repeat(20000, 1), torch.rand(20000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(torch.bincount(picks, minlength=3).float() / 20000, p[0], atol=0.015, rtol=0)


def test_uniforms_belong_to_the_sample():
    a = per_sample_uniforms(3, [10, 11, 12], 50)
    torch.testing.assert_close(per_sample_uniforms(3, [12], 50)[0], a[2])
    assert not torch.equal(a[0], a[1]) and not torch.equal(per_sample_uniforms(4, [10], 50)[0], a[0])
    assert len({sample_seed(s, i) for s in range(50) for i in range(50)}) == 2500


def test_guidance_combines_and_keeps_forbidden_tokens_forbidden():
    cond = torch.tensor([[1.0, 2.0, float("-inf")]])
    uncond = torch.tensor([[0.5, 3.0, float("-inf")]])
    out = guide(torch.cat([cond, uncond]), 2.0)
    assert out[0, :2].tolist() == [1.5, 1.0] and out[0, 2] == float("-inf")
    opts = SamplingOptions(cfg_scale=3.0, cfg_schedule="linear")
    assert [guidance_scale(opts, s, 5) for s in (0, 2, 4)] == [1.0, 2.0, 3.0]
    assert guidance_scale(SamplingOptions(cfg_scale=3.0), 0, 5) == 3.0
    with pytest.raises(ValueError, match="cfg_schedule"):
        SamplingOptions(cfg_schedule="cosine")
