"""Drawing tokens from logits: temperature, top-k, top-p, classifier-free guidance, and randomness
that belongs to the sample, not to the batch.

Sample i of a run draws all its random numbers from its own generator seeded by (seed, i), taken
up front as a row of uniforms; a token is then the inverse-CDF pick of its uniform. So a sample
does not depend on the batch it was drawn in, the batch size, or the rank that drew it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class SamplingOptions:
    """How tokens are drawn. Per-depth lists (RQ) may be shorter than the depth: the last value repeats."""
    temperature: float = 1.0
    top_k: list[int] = field(default_factory=lambda: [0])      # 0 = no top-k
    top_p: list[float] = field(default_factory=lambda: [1.0])  # 1.0 = no nucleus cut
    # DQ: positions are drawn with their own filters (the authors: top-k 1024 positions, 300 contents).
    position_temperature: float = 1.0
    position_top_k: int = 0
    position_top_p: float = 1.0
    cfg_scale: float = 1.0          # classifier-free guidance; 1.0 = plain conditional sampling
    cfg_schedule: str = "constant"  # constant | linear (scale grows from 1 at the first token to cfg_scale)

    def __post_init__(self):
        if isinstance(self.top_k, int):
            self.top_k = [self.top_k]
        if isinstance(self.top_p, (int, float)):
            self.top_p = [float(self.top_p)]
        if self.cfg_schedule not in ("constant", "linear"):
            raise ValueError(f"cfg_schedule {self.cfg_schedule!r}: choose constant or linear")
        if self.temperature <= 0 or self.position_temperature <= 0:
            raise ValueError("temperature must be > 0 (use top_k=1 for greedy decoding)")

    def depth_top_k(self, d: int) -> int:
        return self.top_k[min(d, len(self.top_k) - 1)]

    def depth_top_p(self, d: int) -> float:
        return self.top_p[min(d, len(self.top_p) - 1)]

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0


def sample_seed(seed: int, *key: int) -> int:
    """A 63-bit seed for the key (seed, *key), e.g. sample `index` of a run seeded `seed` (a hash,
    so different keys don't collide)."""
    return int(np.random.SeedSequence([int(seed), *map(int, key)]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def keyed_uniforms(keys, n: int) -> torch.Tensor:
    """(B, n) float64 uniforms in [0, 1): row b from the generator seeded by keys[b] (a tuple of ints).
    Draws keyed by sample rather than by rank make a run independent of how batches are split."""
    rows = []
    for key in keys:
        g = torch.Generator(device="cpu")
        g.manual_seed(sample_seed(*key))
        rows.append(torch.rand(n, generator=g, dtype=torch.float64))
    return torch.stack(rows) if rows else torch.zeros(0, n, dtype=torch.float64)


def per_sample_uniforms(seed: int, indices, n: int) -> torch.Tensor:
    """(B, n) float64 uniforms in [0, 1): row b from the generator of sample indices[b]."""
    return keyed_uniforms([(seed, int(i)) for i in indices], n)


def filter_logits(logits_BK: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> torch.Tensor:
    """Probabilities (float32) after temperature, top-k (0 = off) and top-p (1.0 = off).

    Masked entries (-inf logits, e.g. forbidden DQ positions) stay at probability 0. Top-p keeps
    the smallest set of most likely tokens whose mass reaches p (the token that crosses p is kept).
    """
    logits = logits_BK.float()
    if temperature != 1.0:  # x / 1.0 == x: skip one full pass over the logits per drawn token
        logits = logits / temperature
    K = logits.shape[-1]
    if 0 < top_k < K:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw(probs_BK: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: token b is the first k with cdf_b[k] > u_b * total_b (int64, (B,)).

    Zero-probability tokens are never picked; with one nonzero token (top-k 1) this is the argmax.
    """
    cdf = torch.cumsum(probs_BK.double(), dim=-1)
    target = u_B.to(cdf.device, torch.float64)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(probs_BK.shape[-1] - 1)


def guidance_scale(opts: SamplingOptions, step: int, n_steps: int) -> float:
    """The CFG scale at token `step` of `n_steps` (linear: 1 at the first token, cfg_scale at the last)."""
    if opts.cfg_schedule == "constant" or n_steps <= 1:
        return opts.cfg_scale
    return 1.0 + (opts.cfg_scale - 1.0) * step / (n_steps - 1)


def guide(logits_2BK: torch.Tensor, scale: float) -> torch.Tensor:
    """Rows [conditional; unconditional] -> uncond + scale * (cond - uncond), shape (B, K).

    Forbidden tokens (-inf in the conditional half) stay forbidden.
    """
    cond, uncond = logits_2BK.float().chunk(2)
    out = uncond + scale * (cond - uncond)
    return out.masked_fill(torch.isinf(cond) & (cond < 0), float("-inf"))
