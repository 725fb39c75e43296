"""A small image classifier: the demo's measure of whether images keep what makes their class.

Trained once per dataset on its train shards (pipeline/train/classifier.py), it scores original
val images, their tokenizer reconstructions and, later, generated samples: a reconstruction (or a
sample) that a classifier trained on real images still recognises has kept the class's content,
which PSNR does not tell (a blurred blob on the right background scores well in PSNR).
"""
from __future__ import annotations

import torch
from torch import nn


class ProbeClassifier(nn.Module):
    """conv stem -> three stride-2 stages -> global average pool -> linear. ~0.1M parameters."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()

        def block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.GroupNorm(8, c_out), nn.SiLU())

        self.features = nn.Sequential(block(3, width, 1), block(width, width, 2), block(width, 2 * width, 2),
                                      block(2 * width, 2 * width, 2))
        self.head = nn.Linear(2 * width, num_classes)
        self.num_classes, self.width = num_classes, width

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """images in [-1, 1] -> logits (B, num_classes)."""
        return self.head(self.features(images_BCHW).mean(dim=(2, 3)))

    @torch.no_grad()
    def predict(self, images_BCHW: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        was_training = self.training
        self.eval()
        preds = [self(images_BCHW[i:i + batch_size]).argmax(-1) for i in range(0, len(images_BCHW), batch_size)]
        self.train(was_training)
        return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
