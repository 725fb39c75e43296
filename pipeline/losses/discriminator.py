"""PatchGAN discriminator, hinge / non-saturating losses and the adaptive GAN weight.

BatchNorm across ranks: each rank normalises with its own batch statistics (the taming / RQ-VAE
behaviour); the discriminator only ever runs in training mode, so its running statistics are
never used and need no synchronisation. Its gradients are averaged across ranks by the trainer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchGANDiscriminator(nn.Module):
    """pix2pix-style PatchGAN: n_layers stride-2 convs -> one logit per overlapping patch."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1  # last hidden layer keeps resolution (receptive field 70 px at n=3)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False), nn.BatchNorm2d(ndf * mult),
                       nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.main(x_BCHW)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(G(z))))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_gan_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def adaptive_gan_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float) -> torch.Tensor:
    """lambda = ||grad L_nll|| / (||grad L_gan|| + 1e-4) on the decoder's last layer, clamped to [0, max].

    Balances the two gradients where they meet; detached so lambda itself is not trained.
    """
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
