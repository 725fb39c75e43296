"""TokenizerLoss: everything the tokenizer trainer adds up, in one module.

generator step:     total = recon + lpips_weight * LPIPS + quant_loss + budget
                            + gan_weight * lambda * (-mean D(recon))      [from disc_start_step]
discriminator step: hinge(D(images), D(recon.detach()))                  [from disc_start_step]
quant_loss (beta * commitment) arrives already weighted in the model's aux (DQ with the authors'
weighting: (1+beta) x commitment in value, beta x in gradient); budget is the DQ budget loss
gamma * (fine_ratio - target)^2 (the paper's; the authors' released configs amount to 2*gamma,
see pipeline.losses.budget), for DQ with the learned router only (the entropy router has nothing
to train).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .budget import budget_loss
from .discriminator import PatchGANDiscriminator, adaptive_gan_weight, generator_gan_loss, hinge_d_loss
from .perceptual import LPIPSLoss


def reconstruction_loss(images_BCHW: torch.Tensor, recon_BCHW: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    if kind == "l1":
        return F.l1_loss(recon_BCHW, images_BCHW)
    if kind == "l2":
        return F.mse_loss(recon_BCHW, images_BCHW)
    raise ValueError(f"tokenizer.recon_loss: unknown kind {kind!r}; choose 'l1' or 'l2'")


class TokenizerLoss(nn.Module):
    """Holds the frozen LPIPS net and the (trainable) discriminator; the trainer owns the optimisers."""

    def __init__(self, cfg):
        super().__init__()
        self.recon_kind, self.lpips_weight, self.gan_weight = cfg.recon_loss, cfg.lpips_weight, cfg.gan_weight
        self.disc_start_step, self.adaptive_weight_max = cfg.disc_start_step, cfg.adaptive_weight_max
        self.budget = cfg.kind == "dq" and cfg.router == "learned"
        self.target_ratio, self.budget_weight = cfg.target_ratio, cfg.budget_weight
        self.lpips = LPIPSLoss(cfg.lpips_weights) if cfg.lpips_weight > 0 else None
        self.discriminator = (PatchGANDiscriminator(3, cfg.disc_ndf, cfg.disc_layers) if cfg.gan_weight > 0
                              else None)

    def gan_active(self, step: int) -> bool:
        """Whether the GAN terms (and the discriminator update) are on at this step."""
        return self.discriminator is not None and step >= self.disc_start_step

    def generator_loss(self, images_BCHW: torch.Tensor, recon_BCHW: torch.Tensor, aux, step: int,
                       last_layer: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        """Total generator-side loss and float logs. `last_layer`: tokenizer.get_last_layer()."""
        recon = reconstruction_loss(images_BCHW, recon_BCHW, self.recon_kind)
        nll = recon
        logs = {"recon_loss": float(recon.detach())}
        if self.lpips is not None:
            perceptual = self.lpips(images_BCHW, recon_BCHW)
            nll = nll + self.lpips_weight * perceptual
            logs["lpips"] = float(perceptual.detach())
        total = nll + aux.quant_loss
        if self.budget:
            budget = budget_loss(aux.fine_ratio, self.target_ratio, self.budget_weight)
            total = total + budget
            logs["budget_loss"] = float(budget.detach())
        if self.gan_active(step):
            g_loss = generator_gan_loss(self.discriminator(recon_BCHW))
            # The adaptive weight needs gradients; under no_grad (validation) the GAN term is logged only.
            if last_layer is not None and torch.is_grad_enabled() and g_loss.requires_grad and nll.requires_grad:
                lam = adaptive_gan_weight(nll, g_loss, last_layer, self.adaptive_weight_max)
            else:
                lam = g_loss.new_zeros(())
            total = total + self.gan_weight * lam * g_loss
            logs.update(g_loss=float(g_loss.detach()), adaptive_weight=float(lam))
        logs.update(aux.logs())
        logs["total_loss"] = float(total.detach())
        return total, logs

    def discriminator_loss(self, images_BCHW: torch.Tensor, recon_detached_BCHW: torch.Tensor,
                           step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Hinge loss of D. Before disc_start_step (or with gan_weight 0) a zero tensor without grad:
        the trainer should skip the discriminator's backward/step when `gan_active(step)` is False."""
        if not self.gan_active(step):
            return images_BCHW.new_zeros(()), {}
        logits_real = self.discriminator(images_BCHW.detach())
        logits_fake = self.discriminator(recon_detached_BCHW.detach())
        loss = hinge_d_loss(logits_real, logits_fake)
        return loss, {"d_loss": float(loss.detach()), "logits_real": float(logits_real.detach().mean()),
                      "logits_fake": float(logits_fake.detach().mean())}
