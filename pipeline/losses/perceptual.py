"""LPIPS (VGG16) perceptual loss with locally supplied backbone weights.

The `lpips` package ships its linear calibration layers, but fetches the VGG16 backbone through
torchvision's downloader, which cannot work offline. So the backbone is built without weights
(`pnet_rand=True`) and loaded from `tokenizer.lpips_weights`: a state_dict file holding either a
torchvision VGG16 state_dict (`features.N.*` keys; the classifier is ignored) or the lpips
backbone's own keys (`sliceK.N.*`).
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import nn

# lpips' vgg16 splits torchvision's `features` into slices at these layer indices.
_VGG_SLICES = ((1, 0, 4), (2, 4, 9), (3, 9, 16), (4, 16, 23), (5, 23, 30))


def _slice_key(features_key: str) -> str | None:
    _, idx, param = features_key.split(".", 2)
    for k, lo, hi in _VGG_SLICES:
        if lo <= int(idx) < hi:
            return f"slice{k}.{idx}.{param}"
    return None


def load_vgg_backbone_state(path: str) -> dict[str, torch.Tensor]:
    """Read a VGG16 backbone state_dict and return it keyed like lpips' `vgg16` module."""
    if not path:
        raise FileNotFoundError("tokenizer.lpips_weights is empty: LPIPS needs VGG16 backbone weights "
                                "(a state_dict file); set tokenizer.lpips_weights or tokenizer.lpips_weight: 0")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer.lpips_weights: file not found: {path!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with objects, wrong format
        raise RuntimeError(f"tokenizer.lpips_weights: cannot read a state_dict from {path!r}: {exc}") from exc
    if not isinstance(state, dict):
        raise RuntimeError(f"tokenizer.lpips_weights: {path!r} holds a {type(state).__name__}, not a state_dict")
    out = {}
    for key, value in state.items():
        if key.startswith("features."):
            new = _slice_key(key)
            if new is not None:
                out[new] = value
        elif key.startswith("slice"):
            out[key] = value
    return out


class LPIPSLoss(nn.Module):
    """Mean LPIPS distance between two image batches in [-1, 1]; frozen, always in eval mode."""

    def __init__(self, weights_path: str):
        super().__init__()
        import lpips

        backbone = load_vgg_backbone_state(weights_path)
        with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=` argument
            warnings.simplefilter("ignore", UserWarning)
            self.model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        try:
            missing, unexpected = self.model.net.load_state_dict(backbone, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise RuntimeError(f"tokenizer.lpips_weights: not a VGG16 backbone state_dict: {exc}") from exc
        if missing or unexpected:
            raise RuntimeError(f"tokenizer.lpips_weights: not a VGG16 backbone state_dict "
                               f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
        self.model.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        # Dropout in the lpips linear heads must stay off; the module is a fixed metric.
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, x_BCHW: torch.Tensor, y_BCHW: torch.Tensor) -> torch.Tensor:
        return self.model(x_BCHW.float(), y_BCHW.float()).mean()
