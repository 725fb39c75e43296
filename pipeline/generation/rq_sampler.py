"""KV-cached RQ-Transformer sampling: position by position, depth by depth.

Per position t the spatial transformer takes one token (the class at t=0, else the codes of
t-1) through its static cache; the depth transformer then produces the D codes of t through its
own cache, reset per position. With guidance the batch is doubled: rows [cond; null class] share
every drawn code. `teacher_forced_logits` runs the same cached path on given codes (the test that
cached logits equal a full forward pass uses it).
"""
from __future__ import annotations

import torch

from ..models.rq_transformer import RQTransformer
from .sampling import SamplingOptions, draw, filter_logits, guidance_scale, guide, per_sample_uniforms


def _cache_dtype(model: RQTransformer) -> torch.dtype:
    """Keys/values are stored in the dtype the Linears produce (the autocast dtype under autocast)."""
    device_type = model.head.weight.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else model.head.weight.dtype


@torch.no_grad()
def _run(model: RQTransformer, labels_B: torch.Tensor | None, batch: int, opts: SamplingOptions,
         uniforms_BN: torch.Tensor | None, given_BTD: torch.Tensor | None,
         use_cache: bool = True) -> tuple[torch.Tensor, list]:
    device = model.pos_hw.device
    T, D = model.T, model.D
    guided = opts.guided and given_BTD is None
    rows_labels = labels_B
    if guided:
        if model.num_classes == 0:
            raise ValueError("classifier-free guidance needs a class-conditional prior (num_classes > 0)")
        rows_labels = torch.cat([labels_B, torch.full_like(labels_B, model.null_class)])
    rows = batch * (2 if guided else 1)
    caches = model.new_caches(rows, dtype=_cache_dtype(model), device=device) if use_cache else None
    codes = torch.zeros(batch, T, D, dtype=torch.long, device=device)
    all_logits = []
    for t in range(T):
        if use_cache:
            prev = None if t == 0 else codes[:, t - 1]
            h = model.spatial_step(caches, t, rows_labels, prev.repeat(2, 1) if guided and t else prev)
            for cache in caches.depth:
                cache.reset()
        for d in range(D):
            if use_cache:
                so_far = codes[:, t, :d]
                logits = model.depth_step(caches, d, h, so_far.repeat(2, 1) if guided else so_far)
            else:  # the whole prefix again (what the KV cache saves; the speed benchmark's baseline)
                prefix = codes[:, :t + 1]
                logits = model.forward_sequence(prefix.repeat(2, 1, 1) if guided else prefix, rows_labels)[:, t, d]
            if given_BTD is not None:
                all_logits.append(logits)
                codes[:, t, d] = given_BTD[:, t, d]
                continue
            if guided:
                logits = guide(logits, guidance_scale(opts, t * D + d, T * D))
            probs = filter_logits(logits, opts.temperature, opts.depth_top_k(d), opts.depth_top_p(d))
            codes[:, t, d] = draw(probs, uniforms_BN[:, t * D + d])
    return codes, all_logits


def sample_rq(model: RQTransformer, labels_B: torch.Tensor | None, sample_indices, seed: int,
              opts: SamplingOptions | None = None, *, use_cache: bool = True) -> torch.Tensor:
    """Draw codes (B, H, W, D); sample b uses only the randomness of (seed, sample_indices[b]).

    labels_B: int64 classes (None for an unconditional prior). The model should be in eval mode
    (dropout off) for reproducible samples. use_cache=False recomputes the whole prefix per code
    (same samples up to float rounding, much slower: the benchmark's baseline).
    """
    opts = opts or SamplingOptions()
    indices = [int(i) for i in sample_indices]
    B = len(indices)
    device = model.pos_hw.device
    if labels_B is not None:
        labels_B = labels_B.to(device).long()
        if labels_B.shape != (B,):
            raise ValueError(f"labels: expected shape ({B},), got {tuple(labels_B.shape)}")
        if model.num_classes and ((labels_B < 0) | (labels_B >= model.num_classes)).any():
            raise ValueError(f"labels must lie in [0, {model.num_classes})")
    elif model.num_classes:
        raise ValueError("this prior is class-conditional: pass labels")
    uniforms = per_sample_uniforms(seed, indices, model.T * model.D).to(device)
    codes, _ = _run(model, labels_B, B, opts, uniforms, None, use_cache)
    return codes.view(B, model.spec.height, model.spec.width, model.D)


def teacher_forced_logits(model: RQTransformer, codes_BHWD: torch.Tensor,
                          labels_B: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, H, W, D, K) of the cached generation path fed with the given codes."""
    B, H, W, D = codes_BHWD.shape
    _, logits = _run(model, labels_B, B, SamplingOptions(), None, codes_BHWD.reshape(B, H * W, D))
    return torch.stack(logits, 1).view(B, H, W, D, -1)
