"""Prior training losses.

RQ: cross-entropy of the logits (B, H, W, D, K) against the stored codes, or against the soft
targets Q_tau(k | r_{d-1}) = softmax(-||r_{d-1} - e_k||^2 / tau) of the stored latents (the
authors' `soft_target_cross_entropy`, tau 0.5, with stochastic codes as inputs); both averaged over
every code, reported per depth too. DQ: the model's own loss (content CE + mean position CE).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_target_cross_entropy(logits_NK: torch.Tensor, targets_NK: torch.Tensor) -> torch.Tensor:
    """-sum_k q_k log softmax(logits)_k per row, (N,). Equals F.cross_entropy for one-hot targets."""
    return -(targets_NK * F.log_softmax(logits_NK.float(), dim=-1)).sum(-1)


def rq_prior_loss(logits_BHWDK: torch.Tensor, codes_BHWD: torch.Tensor,
                  soft_targets_BHWDK: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(mean loss, {"loss_d{d}": per-depth mean}) over every code of the batch."""
    D, K = logits_BHWDK.shape[-2:]
    logits = logits_BHWDK.reshape(-1, D, K).float()
    if soft_targets_BHWDK is None:
        per_code = F.cross_entropy(logits.reshape(-1, K), codes_BHWD.reshape(-1), reduction="none").view(-1, D)
    else:
        per_code = soft_target_cross_entropy(logits.reshape(-1, K),
                                             soft_targets_BHWDK.reshape(-1, K).float()).view(-1, D)
    per_depth = per_code.mean(0)
    return per_code.mean(), {f"loss_d{d}": per_depth[d].detach() for d in range(D)}
