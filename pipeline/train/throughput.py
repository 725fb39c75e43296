"""Model FLOPs and device peaks for tokens/s and MFU.

MFU = achieved model FLOP/s / peak FLOP/s, with model FLOPs = 3 x forward (forward + backward)
counting every matmul (2 FLOPs per multiply-add) and the attention scores and mixing (QK^T, AV),
as in the PaLM / Megatron accounting; activation recomputation is not counted (it is overhead).
"""
from __future__ import annotations

import torch

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s.
_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def device_peak_flops(device: torch.device) -> float | None:
    """bf16 peak of the GPU `device`, or None (CPU, or a GPU not in the table: no MFU reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in _PEAK_BF16.items():
        if key in name:
            return peak
    return None


def _stack_forward_flops(stack, tokens: int, seq_len: int) -> float:
    """Forward FLOPs of a TransformerStack over `tokens` tokens in sequences of `seq_len`."""
    params = sum(m.weight.numel() for b in stack.blocks for m in b.modules() if isinstance(m, torch.nn.Linear))
    E = stack.cfg.embed_dim
    attention = 2 * 2 * seq_len * E * len(stack.blocks)  # QK^T and AV, per token
    return tokens * (2 * params + attention)


def prior_flops_per_sample(model, spec, dq_tokens: int | None = None) -> float:
    """Training FLOPs (3 x forward) for one image's codes. DQ: `dq_tokens` per image (default: the
    sequence at a fine ratio of 0.5, the paper's setting)."""
    if spec.kind == "rq":
        T, D = spec.height * spec.width, spec.depth
        fwd = _stack_forward_flops(model.spatial, T, T) + _stack_forward_flops(model.depth, T * D, D)
        fwd += 2 * model.head.weight.numel() * T * D
        if hasattr(model, "input_mlp"):
            fwd += 2 * (model.input_mlp.weight.numel() + model.head_mlp.weight.numel()) * T * D
        return 3 * fwd
    cells = spec.height * spec.width
    L = dq_tokens or int(cells * 0.5 + 4 * cells * 0.5) + 4
    fwd = _stack_forward_flops(model.position_transformer, L, L) + _stack_forward_flops(model.content_transformer, L, L)
    heads = sum(m.weight.numel() for name in ("position_head", "content_head")
                for m in getattr(model, name).modules() if isinstance(m, torch.nn.Linear))
    return 3 * (fwd + 2 * heads * L)
