"""DQ-Transformer and its KV-cached sampler: layout, causality, cached == full forward, padding,
loss, sampling masks (every sample a valid tiling), guidance, greedy, batch independence, and the
preset parameter counts against the authors' StackGPT."""
import pytest
import torch

from pipeline.data.code_reader import collate_codes
from pipeline.generation.dq_sampler import _run, cached_logits, sample_dq
from pipeline.generation.sampling import SamplingOptions, per_sample_uniforms
from pipeline.models.dq_order import dq_codes_from_tokens, from_dq_order, to_dq_order
from pipeline.models.dq_transformer import DQTransformer
from pipeline.models.prior_config import PRIOR_PRESETS, CodeSpec, PriorConfig

# The authors' StackGPT (modules/dynamic_modules/stackgpt.py) with configs/stage2/class_imagenet_p6c18.yml
# (vocab 2026, coarse positions 1258, fine positions 2026, block_size 2048, 2 segments), counted on the
# meta device by a scratch script: 1024 wide, 6 + 18 layers (their model) and, for dq-large, the same
# code at 1280 wide, 16 heads, 6 + 24 layers.
AUTHORS_DQ_BASE = 313_999_360
AUTHORS_DQ_LARGE = 604_935_680

K, SIDE, CLASSES = 16, 4, 5  # tiny: Nc = 16 coarse cells, Nf = 64 fine cells, longest sequence 68 tokens
SPEC = CodeSpec("dq", K, 8, SIDE, SIDE, 1)


def tiny_cfg(**kw) -> PriorConfig:
    base = dict(kind="dq", embed_dim=32, n_head=4, position_layers=2, content_layers=2, num_classes=CLASSES,
                dropout=0.0, attn_dropout=0.0, embed_dropout=0.0, class_dropout=0.1)
    return PriorConfig(**{**base, **kw})


def tiny_model(seed: int = 0, **kw) -> DQTransformer:
    """A random model whose logits vary a lot (std 0.3 weights, incl. the zero-initialised seq table)."""
    torch.manual_seed(seed)
    model = DQTransformer(tiny_cfg(**kw), SPEC).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def random_batch(seed: int, n: int, fine_ratios=None):
    """n random images' codes in the stored format, batched by collate_codes."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for b in range(n):
        ratio = fine_ratios[b] if fine_ratios is not None else float(torch.rand(1, generator=g))
        gran = (torch.rand(SIDE, SIDE, generator=g) < ratio).long()
        code_map = torch.randint(0, K, (2 * SIDE, 2 * SIDE), generator=g)
        p, c, gr = to_dq_order(code_map, gran)
        samples.append(dict(positions_L=p, contents_L=c, granularity_L=gr, label=b % CLASSES))
    batch = collate_codes(samples)
    return batch["positions_L"], batch["contents_L"], batch["granularity_L"], batch["mask_L"], batch["label"]


def test_pack_layout():
    model = DQTransformer(tiny_cfg(), SPEC)
    Nc, Nf = model.Nc, model.Nf
    # Row 0: coarse cells 0, 5 then the fine cells of regions 1..; here just 4 fine cells of region 1.
    pos = torch.tensor([[0, 5, 2, 3, 10, 11, 0], [7, 0, 0, 0, 0, 0, 0]])
    con = torch.tensor([[1, 2, 3, 4, 5, 6, 0], [9, 0, 0, 0, 0, 0, 0]])
    gran = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0, 0]]).bool()
    p = model.pack(pos, con, gran, mask, torch.tensor([3, 1]))
    E, S = K, K + 1  # content EOS, first SOS
    assert p.content_BT[0].tolist() == [S + 3, 1, 2, E, S + 3, 3, 4, 5, 6, E]
    assert p.position_BT[0].tolist() == [Nc + 1 + 3, 0, 5, Nc, Nf + 1 + 3, 2, 3, 10, 11, Nf]
    assert p.segment_BT[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert p.content_BT[1].tolist() == [S + 1, 9, E, S + 1, E] + [E] * 5
    assert p.position_BT[1].tolist() == [Nc + 2, 7, Nc, Nf + 2, Nf] + [Nf] * 5
    coarse, fine, content = p.target_masks()
    assert coarse[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]        # tokens 1, 2 and EOS_c
    assert fine[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1]          # fine tokens and EOS_f
    assert content[0].tolist() == [1, 1, 0, 0, 1, 1, 1, 1, 0]       # codes only
    assert (coarse[1].tolist(), fine[1].tolist(), content[1].tolist()) == (
        [1, 1] + [0] * 7, [0, 0, 0, 1] + [0] * 5, [1] + [0] * 8)
    # Head indices: coarse cell p -> p, EOS_c -> Nf (shared with EOS_f).
    assert model.head_index(p.position_BT, p.segment_BT)[0, 1:4].tolist() == [0, 5, Nf]


def test_causality_both_transformers(model):
    pos, con, gran, mask, labels = random_batch(1, 3)
    packed = model.pack(pos, con, gran, mask, labels)
    with torch.no_grad():
        ref_p, ref_c = model.forward_packed(packed)
        T = packed.content_BT.shape[1]
        for j in (2, T // 2, T - 2):
            changed = type(packed)(**{k: v.clone() for k, v in vars(packed).items()})
            changed.content_BT[:, j] = (changed.content_BT[:, j] + 3) % K
            changed.position_BT[:, j] = (changed.position_BT[:, j] + 1) % model.Nc
            out_p, out_c = model.forward_packed(changed)
            # Token j is predicted at j-1: position logits up to there never see it; content
            # logits at j-1 see its position (that is the design), earlier ones nothing of it.
            torch.testing.assert_close(out_p[:, :j], ref_p[:, :j], rtol=0, atol=0)
            torch.testing.assert_close(out_c[:, :j - 1], ref_c[:, :j - 1], rtol=0, atol=0)
            assert not torch.allclose(out_p[:, j:], ref_p[:, j:]) and not torch.allclose(out_c[:, j:], ref_c[:, j:])


def test_cached_logits_equal_full_forward(model):
    pos, con, gran, mask, labels = random_batch(2, 4)
    with torch.no_grad():
        full = model(pos, con, gran, mask, labels)
    cached_p, cached_c = cached_logits(model, pos, con, gran, mask, labels)
    torch.testing.assert_close(cached_p, full["position_logits"], rtol=0, atol=1e-5)
    torch.testing.assert_close(cached_c, full["content_logits"], rtol=0, atol=1e-5)


def test_padding_invariance(model):
    pos, con, gran, mask, labels = random_batch(3, 2, fine_ratios=[0.2, 1.0])  # row 1 is longer
    n0 = int(mask[0].sum())
    with torch.no_grad():
        alone = model(pos[:1, :n0], con[:1, :n0], gran[:1, :n0], mask[:1, :n0], labels[:1])
        # Batched with a longer row, with extra padding columns holding garbage.
        extra = 5
        pad = lambda x, v: torch.cat([x, torch.full((2, extra), v, dtype=x.dtype)], 1)
        pos2, con2, gran2 = pad(pos, 3), pad(con, 7), pad(gran, 1)
        pos2[0, n0:], con2[0, n0:], gran2[0, n0:] = 9, 11, 0
        batched = model(pos2, con2, gran2, pad(mask, False), labels)
    T = alone["position_logits"].shape[1]
    for key in ("position_logits", "content_logits"):
        torch.testing.assert_close(batched[key][:1, :T], alone[key], rtol=0, atol=1e-5)
    for key in ("position_target", "content_target", "coarse_position_mask", "fine_position_mask", "content_mask"):
        assert torch.equal(batched[key][:1, :T], alone[key])
    for key in ("coarse_position_mask", "fine_position_mask", "content_mask"):
        assert not batched[key][:1, T:].any()


def test_loss_ignores_padding_and_trains(model):
    pos, con, gran, mask, labels = random_batch(4, 3)
    ref = model.loss(pos, con, gran, mask, labels)
    assert set(ref) == {"loss", "content_loss", "position_loss", "coarse_position_loss", "fine_position_loss"}
    torch.testing.assert_close(ref["loss"], ref["content_loss"] + (ref["coarse_position_loss"]
                                                                  + ref["fine_position_loss"]) / 2)
    # Garbage in the padding and extra padding columns change nothing.
    pad = ~mask
    garbage = model.loss(pos.masked_fill(pad, 5), con.masked_fill(pad, 9), gran.masked_fill(pad, 0),
                         mask, labels)
    wide = [torch.cat([x, torch.ones(3, 4, dtype=x.dtype)], 1) for x in (pos, con, gran)]
    wider = model.loss(*wide, torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], 1), labels)
    for other in (garbage, wider):
        for key in ref:
            torch.testing.assert_close(other[key], ref[key], rtol=1e-6, atol=1e-6)
    # The content loss counts only the codes: it equals CE over them computed by hand.
    out = model(pos, con, gran, mask, labels)
    logits = out["content_logits"][out["content_mask"]]
    assert logits.shape[0] == int(mask.sum())
    torch.testing.assert_close(ref["content_loss"], torch.nn.functional.cross_entropy(
        logits, out["content_target"][out["content_mask"]]))
    # Gradients reach every parameter, and a few steps reduce the loss.
    train = tiny_model(seed=5).train()
    opt = torch.optim.Adam(train.parameters(), lr=3e-3)
    first = None
    for _ in range(8):
        loss = train.loss(pos, con, gran, mask, labels)["loss"]
        opt.zero_grad()
        loss.backward()
        if first is None:
            first = loss.item()
            assert all(p.grad is not None for p in train.parameters())
        opt.step()
    assert loss.item() < first


def test_drop_labels():
    model = DQTransformer(tiny_cfg(class_dropout=0.25), SPEC)
    labels = torch.zeros(4000, dtype=torch.long)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    dropped = model.drop_labels(labels, g1)
    assert torch.equal(dropped, model.drop_labels(labels, g2))
    assert set(dropped.unique().tolist()) == {0, model.null_class} and model.null_class == CLASSES
    assert abs(float((dropped == model.null_class).float().mean()) - 0.25) < 0.03
    uncond = DQTransformer(tiny_cfg(num_classes=0), SPEC)
    assert uncond.null_class == 0 and torch.equal(uncond.drop_labels(labels), labels)


def assert_valid(model, samples, max_len=None):
    for p, c, g in samples:
        from_dq_order(p, c, g, SIDE)  # raises on an invalid tiling
        assert int(c.min()) >= 0 and int(c.max()) < K
        n, m = int((g == 0).sum()), int((g == 1).sum())
        assert n + m + 4 <= (max_len or model.max_tokens)
    dq_codes_from_tokens(samples, SIDE)


def eos_biased(bias: float) -> DQTransformer:
    """A model whose position logits are constant, with EOS at +-bias (tests the EOS rules)."""
    m = tiny_model(seed=7)
    with torch.no_grad():
        ln, head = m.position_head
        ln.weight.zero_()
        ln.bias.zero_()
        ln.bias[0] = 1.0
        head.weight[:, 0] = torch.randn(head.weight.shape[0]) * 0.1
        head.weight[m.eos_head, 0] = bias
    return m


def test_samples_always_valid(model):
    labels = torch.arange(12) % CLASSES
    opts = SamplingOptions(temperature=1.5, position_temperature=2.0)
    assert_valid(model, sample_dq(model, labels, range(12), seed=0, opts=opts))
    guided = SamplingOptions(cfg_scale=3.0, cfg_schedule="linear", top_k=[5], top_p=[0.9], position_top_p=0.8)
    assert_valid(model, sample_dq(model, labels, range(12), seed=1, opts=guided))
    # EOS always wanted: the coarse part still ends only when the sequence fits max_len, and the
    # fine part only when complete; EOS never wanted: every region coarse, then EOS forced.
    for bias, max_len in ((30.0, 40), (30.0, None), (-30.0, None)):
        m = eos_biased(bias)
        samples = sample_dq(m, labels[:6], range(6), seed=2, max_len=max_len)
        assert_valid(m, samples, max_len)
        n_coarse = [int((g == 0).sum()) for _, _, g in samples]
        if bias < 0:
            assert n_coarse == [SIDE * SIDE] * 6
        elif max_len == 40:  # 4 * 16 - 3 n + 4 <= 40  ->  n >= 10: the smallest allowed
            assert n_coarse == [10] * 6
        else:
            assert n_coarse == [0] * 6
    # Unconditional model, many seeds.
    uncond = tiny_model(seed=3, num_classes=0)
    for seed in range(3):
        assert_valid(uncond, sample_dq(uncond, None, range(8), seed=seed))
    with pytest.raises(ValueError):
        sample_dq(model, labels, range(12), seed=0, max_len=SIDE * SIDE + 3)
    with pytest.raises(ValueError):
        sample_dq(model, None, range(2), seed=0)
    with pytest.raises(ValueError):
        sample_dq(uncond, None, range(2), seed=0, opts=SamplingOptions(cfg_scale=2.0))


def test_batch_size_1_vs_16_identical(model):
    labels = torch.arange(16) % CLASSES
    indices = list(range(100, 116))
    opts = SamplingOptions(cfg_scale=2.0, top_k=[8], position_top_p=0.95)
    together = sample_dq(model, labels, indices, seed=9, opts=opts)
    for b in (0, 5, 11, 15):
        alone = sample_dq(model, labels[b:b + 1], indices[b:b + 1], seed=9, opts=opts)[0]
        for x, y in zip(alone, together[b]):
            assert torch.equal(x, y)
    # A different order of the batch gives the same samples per index.
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    shuffled = sample_dq(model, labels[perm], [indices[i] for i in perm], seed=9, opts=opts)
    for j, i in enumerate(perm.tolist()):
        assert all(torch.equal(x, y) for x, y in zip(shuffled[j], together[i]))


def test_cfg_scale_one_equals_conditional(model):
    labels = torch.arange(6) % CLASSES
    opts = SamplingOptions(cfg_scale=1.0, top_k=[6])
    plain = sample_dq(model, labels, range(6), seed=4, opts=opts)
    # The guided path (batch doubled with the null class) at scale 1 draws the same tokens.
    uniforms = per_sample_uniforms(4, range(6), 2 * (model.max_tokens - 1))
    doubled = _run(model, labels, 6, opts, uniforms, model.max_tokens, guided=True)
    for a, b in zip(plain, doubled):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # And guidance does change samples (the null class matters).
    guided = sample_dq(model, labels, range(6), seed=4, opts=SamplingOptions(cfg_scale=4.0, top_k=[6]))
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(plain, guided))


def greedy_reference(model: DQTransformer, label: int):
    """Argmax decoding by full forward passes over the growing packed sequence, with the masks
    written out independently of the sampler."""
    Nc, Nf = model.Nc, model.Nf
    c, p, s = [K + 1 + label], [Nc + 1 + label], [0]
    used, fine_left, phase, out = set(), set(), "coarse", []
    while True:
        pk = lambda: type_packed(torch.tensor([c + [0]]), torch.tensor([p + [0]]), torch.tensor([s + [s[-1]]]))
        with torch.no_grad():
            pos_logits = model.forward_packed(pk())[0][0, -1]
        if phase == "transition":
            c, p, s, phase = c + [K + 1 + label], p + [Nf + 1 + label], s + [1], "fine"
            continue
        if phase == "coarse":
            allowed = [i for i in range(Nc) if i not in used] + [Nf]
        else:
            allowed = sorted(fine_left) or [Nf]
        best = max(allowed, key=lambda i: float(pos_logits[i]))
        seg = 0 if phase == "coarse" else 1
        own = (Nc if seg == 0 else Nf) if best == Nf else best
        if best == Nf:
            if phase == "fine":
                return out
            fine_left = {(2 * (r // SIDE) + a) * 2 * SIDE + 2 * (r % SIDE) + b
                         for r in range(Nc) if r not in used for a in (0, 1) for b in (0, 1)}
            c, p, s, phase = c + [K], p + [own], s + [0], "transition"
            continue
        p2, s2 = p + [own], s + [seg]
        with torch.no_grad():
            con_logits = model.forward_packed(type_packed(torch.tensor([c + [0]]), torch.tensor([p2]),
                                                          torch.tensor([s2])))[1][0, -1]
        code = int(con_logits[:K].argmax())
        out.append((own, code, seg))
        if seg == 0:
            used.add(own)
        else:
            fine_left.discard(own)
        c, p, s = c + [code], p2, s2


def type_packed(c, p, s):
    from pipeline.models.dq_transformer import DQPacked
    return DQPacked(c, p, s, torch.tensor([c.shape[1]]), torch.tensor([0]))


def test_top_k_1_is_greedy(model):
    labels = torch.tensor([0, 3])
    opts = SamplingOptions(top_k=[1], position_top_k=1)
    samples = sample_dq(model, labels, [0, 1], seed=123, opts=opts)
    other_seed = sample_dq(model, labels, [5, 6], seed=7, opts=opts)
    for b, label in enumerate(labels.tolist()):
        ref = greedy_reference(model, label)
        got = list(zip(*(x.tolist() for x in samples[b])))
        assert got == ref
        assert all(torch.equal(x, y) for x, y in zip(samples[b], other_seed[b]))


def _count(name: str) -> int:
    with torch.device("meta"):
        m = DQTransformer(PriorConfig(**PRIOR_PRESETS[name]), CodeSpec("dq", 1024, 256, 16, 16, 1))
    return sum(p.numel() for p in m.parameters())


def test_preset_parameter_counts():
    base, large, big = _count("dq-base"), _count("dq-large"), _count("dq-1.4b")
    assert abs(base / AUTHORS_DQ_BASE - 1) < 0.005, base
    assert abs(large / AUTHORS_DQ_LARGE - 1) < 0.005, large
    assert 1.3e9 < big < 1.5e9, big
    assert _count("dq-demo") < 5e6
