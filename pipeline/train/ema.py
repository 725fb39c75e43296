"""Exponential moving average of a model's weights (exported instead of the raw weights)."""
from __future__ import annotations

import torch


class WeightEMA:
    """fp32 exponential moving average of the parameters (ZeRO 0-2: every rank holds them all)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for n, p in model.named_parameters():
            self.shadow[n].lerp_(p.detach().float(), 1 - self.decay)

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, state: dict) -> None:
        for n in self.shadow:
            self.shadow[n].copy_(state[n])
