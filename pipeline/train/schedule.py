"""Learning-rate schedule: linear warm-up, then cosine decay to `min_lr_ratio` of the peak."""
from __future__ import annotations

import math

import torch


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier at optimizer step `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                  min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    # A plain function (not a lambda closure) keeps LambdaLR.state_dict() free of callables.
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, _Factor(total_steps, warmup_steps, min_lr_ratio))


class _Factor:
    def __init__(self, total_steps: int, warmup_steps: int, min_lr_ratio: float):
        self.total_steps, self.warmup_steps, self.min_lr_ratio = total_steps, warmup_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        return warmup_cosine_factor(step, self.total_steps, self.warmup_steps, self.min_lr_ratio)
