"""DQ budget loss: keeps the learned router's fraction of fine regions near the target."""
from __future__ import annotations

import torch


def budget_loss(fine_ratio: torch.Tensor, target_ratio: float, weight: float) -> torch.Tensor:
    """gamma * (mean fraction of fine regions - target_ratio)^2.

    `fine_ratio` must carry the router's gradient (hard Gumbel-softmax gates are straight-through),
    otherwise the loss cannot move the router.
    """
    return weight * (fine_ratio - target_ratio) ** 2
