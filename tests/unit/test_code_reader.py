"""DQ-Transformer order helpers and code batch collation (no tokenizer run needed)."""
import pytest
import torch

from pipeline.data.code_reader import collate_codes
from pipeline.models.dq import DQCodes
from pipeline.models.dq_order import dq_codes_from_tokens, from_dq_order, to_dq_order


def random_dq(seed: int, side: int = 4, K: int = 50) -> DQCodes:
    g = torch.Generator().manual_seed(seed)
    gran = torch.randint(0, 2, (3, side, side), generator=g)
    fine_map = torch.randint(0, K, (3, 2 * side, 2 * side), generator=g)
    coarse = torch.randint(0, K, (3, side, side), generator=g).repeat_interleave(2, 1).repeat_interleave(2, 2)
    fine_cells = gran.repeat_interleave(2, 1).repeat_interleave(2, 2) == 1
    return DQCodes.from_code_map(torch.where(fine_cells, fine_map, coarse), gran)


@pytest.mark.parametrize("seed", range(5))
def test_dq_order_round_trips_to_granularity_and_code_map(seed):
    codes = random_dq(seed)
    tokens = [to_dq_order(codes.code_map_BHW[b], codes.granularity_BHcWc[b]) for b in range(3)]
    for b, (pos, content, gran) in enumerate(tokens):
        assert pos.numel() == int(codes.lengths()[b]) == codes.sequences[b].numel()
        assert sorted(content.tolist()) == sorted(codes.sequences[b].tolist())  # same codes, another order
        code_map, gran_map = from_dq_order(pos, content, gran, 4)
        assert torch.equal(code_map, codes.code_map_BHW[b]) and torch.equal(gran_map, codes.granularity_BHcWc[b])
    back = dq_codes_from_tokens(tokens, 4)
    assert torch.equal(back.code_map_BHW, codes.code_map_BHW)
    assert all(torch.equal(a, b) for a, b in zip(back.sequences, codes.sequences))


def test_all_coarse_and_all_fine_extremes():
    for value in (0, 1):
        gran = torch.full((1, 2, 2), value)
        coarse = torch.tensor([[7, 8], [9, 6]]).repeat_interleave(2, 0).repeat_interleave(2, 1)[None]
        codes = DQCodes.from_code_map(torch.arange(16).view(1, 4, 4) if value else coarse, gran)
        pos, content, g = to_dq_order(codes.code_map_BHW[0], gran[0])
        assert pos.tolist() == list(range(4 if value == 0 else 16)) and (g == value).all()
        assert torch.equal(from_dq_order(pos, content, g, 2)[0], codes.code_map_BHW[0])


def test_tokens_that_do_not_tile_the_image_are_rejected():
    codes = random_dq(0, side=2)
    pos, content, gran = to_dq_order(codes.code_map_BHW[0], codes.granularity_BHcWc[0])
    with pytest.raises(ValueError, match="tile"):
        from_dq_order(pos[:-1], content[:-1], gran[:-1], 2)  # a region left uncovered
    fine = DQCodes.from_code_map(torch.arange(16).view(1, 4, 4), torch.ones(1, 2, 2, dtype=torch.long))
    fpos, fcontent, fgran = to_dq_order(fine.code_map_BHW[0], fine.granularity_BHcWc[0])
    fpos[1] = fpos[0]  # region 0 gets 4 fine tokens, but one cell twice and another never
    with pytest.raises(ValueError, match="tile"):
        from_dq_order(fpos, fcontent, fgran, 2)
    extra = (torch.cat([pos, torch.tensor([0])]), torch.cat([content, torch.tensor([1])]),
             torch.cat([gran, torch.tensor([0])]))
    with pytest.raises(ValueError, match="tile"):
        from_dq_order(*extra, 2)  # region 0 coded twice


def test_collate_pads_sequences_and_masks_them():
    samples = [{"positions_L": torch.arange(n), "contents_L": torch.arange(n) + 1, "granularity_L": torch.zeros(n),
                "label": n, "key": f"k{n}"} for n in (3, 5)]
    batch = collate_codes(samples)
    assert batch["positions_L"].shape == (2, 5) and batch["mask_L"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    assert batch["label"].tolist() == [3, 5] and batch["key"] == ["k3", "k5"]
    assert collate_codes(samples, pad_to=8)["contents_L"].shape == (2, 8)


def test_tencrop_views_follow_llamagen():
    from pipeline.data.codes_writer import VIEW_NAMES, make_views

    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert [len(make_views(x, a, 1.1)) for a in ("none", "hflip", "tencrop")] == [1, 2, 11] == \
        [len(VIEW_NAMES[a]) for a in ("none", "hflip", "tencrop")]
    same = make_views(x, "tencrop", 1.0)  # no upscale: every crop is the image (or its flip)
    assert all(torch.allclose(v, x, atol=1e-5) for v in same[:6]) and all(torch.allclose(v, x.flip(-1), atol=1e-5)
                                                                         for v in same[6:])
    views = make_views(x, "tencrop", 1.5)  # upscaled to 12: corners at offsets 0 / 4, center at 2
    big = torch.nn.functional.interpolate(x, size=(12, 12), mode="bicubic", align_corners=False).clamp(-1, 1)
    assert torch.equal(views[1], big[..., :8, :8]) and torch.equal(views[4], big[..., 4:, 4:])
    assert torch.equal(views[5], big[..., 2:10, 2:10]) and torch.equal(views[7], big.flip(-1)[..., :8, 4:])
