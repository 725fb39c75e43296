"""Image-quality metrics shared by the stages and the benchmarks (one implementation each).

- `psnr_per_image`: PSNR of images in [-1, 1], measured on the [0, 1] scale.
- The two trivial baselines a tokenizer must beat: the per-image mean colour
  (`mean_colour_baseline`) and a blurred downsample stored at 8 bits per channel that spends the
  same number of bits as the codes (`downsample_baseline`, side from `downsample_side_for_bits`).
- `frechet_distance`: the Frechet distance between two sets of feature vectors, each summarised by
  a Gaussian (mean and covariance). On Inception-v3 pool features this is FID; the rate-distortion
  benchmark applies it to random-network features.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr_per_image(x_BCHW: torch.Tensor, y_BCHW: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [-1, 1], measured on the [0, 1] scale (peak 1): -10 log10(MSE)."""
    mse_B = ((x_BCHW.float().clamp(-1, 1) - y_BCHW.float().clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return -10.0 * torch.log10(mse_B.clamp_min(1e-10))


def mean_colour_baseline(x_BCHW: torch.Tensor) -> torch.Tensor:
    """Every pixel replaced by its image's mean colour (costs 3 numbers per image)."""
    return x_BCHW.mean(dim=(2, 3), keepdim=True).expand_as(x_BCHW)


def downsample_side_for_bits(bits: float) -> int:
    """Largest side s with an s x s RGB image at 8 bits per channel within `bits`."""
    return max(1, int(math.floor(math.sqrt(bits / 24.0))))


def downsample_baseline(x_BCHW: torch.Tensor, bits_per_image: float) -> torch.Tensor:
    """Area-downsample to the side `bits_per_image` affords, store at 8 bits, upsample bilinearly."""
    side = downsample_side_for_bits(bits_per_image)
    small = F.interpolate(x_BCHW, size=(side, side), mode="area")
    small = torch.round((small.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1  # 8-bit storage
    return F.interpolate(small, size=x_BCHW.shape[-2:], mode="bilinear", align_corners=False)


def feature_statistics(features_NF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean_F, covariance_FF) in float64; the covariance is unbiased (divides by N - 1)."""
    if features_NF.ndim != 2:
        raise ValueError(f"features must be (N, F), got shape {tuple(features_NF.shape)}")
    if features_NF.shape[0] < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {features_NF.shape[0]}")
    x = features_NF.detach().double()
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def frechet_distance_from_statistics(mu_a: torch.Tensor, sigma_a: torch.Tensor, mu_b: torch.Tensor,
                                     sigma_b: torch.Tensor) -> float:
    """Frechet (2-Wasserstein) distance squared between N(mu_a, sigma_a) and N(mu_b, sigma_b):

        d^2 = |mu_a - mu_b|^2 + Tr(sigma_a) + Tr(sigma_b) - 2 Tr((sigma_a sigma_b)^(1/2))

    The trace of the matrix square root is computed through a symmetric matrix with the same
    eigenvalues, M = sigma_a^(1/2) sigma_b sigma_a^(1/2) (PSD), as the sum of the square roots of
    its eigenvalues: eigh on symmetric float64 matrices is stable, unlike a general sqrtm of the
    non-symmetric product. Eigenvalues that round below zero (rank-deficient covariances, e.g.
    fewer samples than features) are clamped to 0. Reported as d^2, the convention of FID.
    """
    mu_a, mu_b = mu_a.double(), mu_b.double()
    sigma_a, sigma_b = sigma_a.double(), sigma_b.double()
    if mu_a.shape != mu_b.shape or sigma_a.shape != sigma_b.shape or sigma_a.shape != (mu_a.numel(),) * 2:
        raise ValueError(f"mismatched statistics: means {tuple(mu_a.shape)} / {tuple(mu_b.shape)}, "
                         f"covariances {tuple(sigma_a.shape)} / {tuple(sigma_b.shape)}")
    evals_a, evecs_a = torch.linalg.eigh((sigma_a + sigma_a.T) / 2)
    sqrt_a = (evecs_a * evals_a.clamp_min(0).sqrt()) @ evecs_a.T
    middle = sqrt_a @ sigma_b @ sqrt_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    diff = mu_a - mu_b
    return float(diff @ diff + torch.trace(sigma_a) + torch.trace(sigma_b) - 2 * trace_sqrt)


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Frechet distance (squared, as FID) between the Gaussians fitted to two (N, F) feature sets.

    See `frechet_distance_from_statistics` for the formula; everything runs in float64 on the
    features' device. The sets may have different sizes but must share the feature dimension.
    """
    if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"feature sets must be (N, F) with the same F, got {tuple(features_a.shape)} "
                         f"and {tuple(features_b.shape)}")
    return frechet_distance_from_statistics(*feature_statistics(features_a), *feature_statistics(features_b))
