"""DQ codes in DQ-Transformer order, and back.

The tokenizer's `DQCodes.sequences` walk coarse regions in raster order, a fine region giving its
2x2 codes in place. The DQ-Transformer instead reads all coarse codes first (raster over the
coarse grid), then all fine codes (raster over the fine grid), so the prior can predict "where
next" separately per granularity. Per token we keep:

    positions_L    index into its own grid: r * Wc + c (coarse) or R * Wf + C (fine, Wf = 2 Wc)
    contents_L     the code
    granularity_L  0 coarse / 1 fine

EOS tokens between and after the two parts are the prior's business, not stored.
`from_dq_order(to_dq_order(m, g)) == (m, g)` exactly, which is what makes the stored sequence a
faithful replacement for the code map (tested).
"""
from __future__ import annotations

import torch
from einops import repeat

from .dq import DQCodes


def to_dq_order(code_map_HW: torch.Tensor, granularity_HcWc: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's fine-grid code map + granularity map -> (positions_L, contents_L, granularity_L)."""
    Hc, Wc = granularity_HcWc.shape
    gran = granularity_HcWc.long()
    coarse_pos = torch.nonzero(gran.flatten() == 0).flatten()  # nonzero is raster-ordered
    # A coarse region's code sits copied in all 4 of its cells; the top-left one is as good as any.
    coarse_codes = code_map_HW[0::2, 0::2].flatten()[coarse_pos]
    fine_cells = repeat(gran, "h w -> (h p) (w q)", p=2, q=2).flatten() == 1
    fine_pos = torch.nonzero(fine_cells).flatten()
    fine_codes = code_map_HW.flatten()[fine_pos]
    positions = torch.cat([coarse_pos, fine_pos])
    contents = torch.cat([coarse_codes, fine_codes]).long()
    granularity = torch.cat([torch.zeros_like(coarse_pos), torch.ones_like(fine_pos)])
    return positions, contents, granularity


def from_dq_order(positions_L: torch.Tensor, contents_L: torch.Tensor, granularity_L: torch.Tensor,
                  coarse_side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `to_dq_order`: -> (code_map_HW int64 on the fine grid, granularity_HcWc int64).

    Raises ValueError when the tokens do not tile the image exactly once (a region both coarse and
    fine, a fine region with missing cells, a region not covered), the mistakes a sampler can make.
    """
    side, fine_side = coarse_side, 2 * coarse_side
    positions, contents, granularity = positions_L.long().cpu(), contents_L.long().cpu(), granularity_L.long().cpu()
    coarse = granularity == 0
    cover = torch.zeros(side, side, dtype=torch.long)  # cells covered per coarse region (4 = complete)
    code_map = torch.zeros(fine_side, fine_side, dtype=torch.long)
    gran_map = torch.zeros(side, side, dtype=torch.long)

    cpos = positions[coarse]
    if cpos.numel() and (cpos.min() < 0 or cpos.max() >= side * side):
        raise ValueError(f"coarse position out of range [0, {side * side})")
    cr, cc = cpos // side, cpos % side
    cover.index_put_((cr, cc), torch.full_like(cr, 4), accumulate=True)
    code_map.view(side, 2, side, 2)[cr, :, cc, :] = contents[coarse][:, None, None]

    fpos = positions[~coarse]
    if fpos.numel() and (fpos.min() < 0 or fpos.max() >= fine_side * fine_side):
        raise ValueError(f"fine position out of range [0, {fine_side * fine_side})")
    fr, fc = fpos // fine_side, fpos % fine_side
    cover.index_put_((fr // 2, fc // 2), torch.ones_like(fr), accumulate=True)
    gran_map[fr // 2, fc // 2] = 1
    code_map[fr, fc] = contents[~coarse]

    if fpos.unique().numel() != fpos.numel() or not bool((cover == 4).all()):
        bad = torch.nonzero(cover != 4).tolist()[:4]
        raise ValueError(f"DQ tokens do not tile the {side}x{side} coarse grid exactly once (each region needs "
                         f"1 coarse or 4 distinct fine codes; wrong: {bad or 'a repeated fine position'})")
    return code_map, gran_map


def dq_codes_from_tokens(tokens: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], coarse_side: int) -> DQCodes:
    """A batch of (positions, contents, granularity) sequences -> DQCodes for `model.decode`."""
    maps, grans = zip(*(from_dq_order(p, c, g, coarse_side) for p, c, g in tokens))
    return DQCodes.from_code_map(torch.stack(maps), torch.stack(grans))
