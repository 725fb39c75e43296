"""Codes -> uint8 images through the tokenizer, in batches."""
from __future__ import annotations

import torch


def to_uint8(images_BCHW: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> (B, H, W, 3) uint8, rounded (the PNG-quantized form FID is computed on)."""
    x = ((images_BCHW.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu()


@torch.no_grad()
def decode_to_uint8(tokenizer, codes, batch_size: int = 64) -> torch.Tensor:
    """RQ codes (B, H, W, D) or a list of DQ token triples -> (B, R, R, 3) uint8 images."""
    from ..models.dq_order import dq_codes_from_tokens

    n = len(codes)
    out = []
    for start in range(0, n, batch_size):
        chunk = codes[start:start + batch_size]
        if isinstance(chunk, list):  # DQ: (positions, contents, granularity) per image
            chunk = dq_codes_from_tokens(chunk, tokenizer.coarse_side)
            chunk.code_map_BHW = chunk.code_map_BHW.to(next(tokenizer.parameters()).device)
        else:
            chunk = chunk.to(next(tokenizer.parameters()).device)
        out.append(to_uint8(tokenizer.decode(chunk)))
    return torch.cat(out) if out else torch.zeros(0, tokenizer.resolution, tokenizer.resolution, 3, dtype=torch.uint8)
