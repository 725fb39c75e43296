"""DQ budget loss: keeps the learned router's fraction of fine regions near the target."""
from __future__ import annotations

import torch


def budget_loss(fine_ratio: torch.Tensor, target_ratio: float, weight: float) -> torch.Tensor:
    """gamma * (mean fraction of fine regions - target_ratio)^2, as the DQ-VAE paper writes it.

    `fine_ratio` must carry the router's gradient (hard Gumbel-softmax gates are straight-through),
    otherwise the loss cannot move the router.

    The authors' released dual-grain configs (BudgetConstraint_RatioMSE_DualGrain with
    calculate_all: True) return gamma*((1-r) - (1-t))^2 added to itself, i.e. 2*gamma*(r - t)^2:
    to train like them, double `tokenizer.budget_weight` (their gamma 10 -> 20). Their ratio
    (sum(g_coarse + 4 g_fine)/B - HW) / (3 HW) equals r in value and, since the two straight-through
    gate entries sum to 1, gives the router logits the same gradient (tests/unit/test_fidelity_dq.py).
    """
    return weight * (fine_ratio - target_ratio) ** 2
