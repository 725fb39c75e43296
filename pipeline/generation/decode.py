"""Codes -> uint8 images through the tokenizer, in batches; uint8 images -> a PNG grid."""
from __future__ import annotations

import math
from pathlib import Path

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


def save_uint8_grid(images_BHWC: torch.Tensor, path: Path, nrow: int, min_side: int = 96) -> None:
    """uint8 images as one PNG grid (written atomically), enlarged so a person can see them."""
    from PIL import Image
    from torchvision.utils import make_grid

    from ..runtime.io import atomic_path

    grid = make_grid(images_BHWC.permute(0, 3, 1, 2), nrow=nrow, padding=2)
    scale = max(1, math.ceil(min_side / images_BHWC.shape[1]))
    image = Image.fromarray(grid.permute(1, 2, 0).numpy())
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
