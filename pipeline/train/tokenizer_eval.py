"""Tokenizer evaluation on the val shards: PSNR, codebook usage, code length, and the two
trivial baselines the demo must beat (per-image mean colour; a blurred downsample that spends
the same number of bits as the codes)."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F


def psnr_per_image(x_BCHW: torch.Tensor, y_BCHW: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [-1, 1], measured on the [0, 1] scale (peak 1)."""
    mse_B = ((x_BCHW.float().clamp(-1, 1) - y_BCHW.float().clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return -10.0 * torch.log10(mse_B.clamp_min(1e-10))


def mean_colour_baseline(x_BCHW: torch.Tensor) -> torch.Tensor:
    return x_BCHW.mean(dim=(2, 3), keepdim=True).expand_as(x_BCHW)


def downsample_side_for_bits(bits: float) -> int:
    """Largest side s with an s x s RGB image at 8 bits per channel within `bits`."""
    return max(1, int(math.floor(math.sqrt(bits / 24.0))))


def downsample_baseline(x_BCHW: torch.Tensor, bits_per_image: float) -> torch.Tensor:
    side = downsample_side_for_bits(bits_per_image)
    small = F.interpolate(x_BCHW, size=(side, side), mode="area")
    small = torch.round((small.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1  # 8-bit storage
    return F.interpolate(small, size=x_BCHW.shape[-2:], mode="bilinear", align_corners=False)


def code_maps_by_depth(codes) -> list[torch.Tensor]:
    """Flat code indices per depth: RQ/VQ codes (B,H,W,D) or DQ codes (their flat variable-length lists)."""
    if isinstance(codes, torch.Tensor):
        return [codes[..., d].reshape(-1) for d in range(codes.shape[-1])]
    return [torch.cat([c.reshape(-1) for c in codes.sequences])]


@torch.no_grad()
def evaluate_tokenizer(model, batches, *, codebook_size: int, max_images: int,
                       device: torch.device) -> tuple[dict, tuple[torch.Tensor, torch.Tensor] | None]:
    """Returns (metrics, (originals, reconstructions) of the first batch for image grids).

    `batches` yields (images_BCHW, labels_B, ...); each rank passes its own shard of the val split and
    the sums are all-reduced, so the numbers cover `max_images` in total whatever the world size.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64)  # psnr, psnr_mean_colour, psnr_downsample, code_len, images
    histograms: list[torch.Tensor] = []
    preview = None
    world = dist.get_world_size() if dist.is_initialized() else 1
    budget = math.ceil(max_images / world)
    for batch in batches:  # (images, labels, ...) tuples
        if sums[4] >= budget:
            break
        images = batch[0][: int(budget - sums[4])].to(device)
        codes = model.encode(images)
        recon = model.decode(codes)
        lengths_B = model.codes_per_image(codes).to(torch.float64).cpu()
        bits_B = lengths_B * math.log2(codebook_size)
        down = torch.stack([downsample_baseline(img[None], float(b))[0] for img, b in zip(images, bits_B)])
        sums += torch.stack([psnr_per_image(recon, images).double().sum().cpu(),
                             psnr_per_image(mean_colour_baseline(images), images).double().sum().cpu(),
                             psnr_per_image(down, images).double().sum().cpu(),
                             lengths_B.sum(), torch.tensor(float(images.shape[0]), dtype=torch.float64)])
        for d, flat in enumerate(code_maps_by_depth(codes)):
            h = torch.bincount(flat.cpu(), minlength=codebook_size).double()
            if d < len(histograms):
                histograms[d] += h
            else:
                histograms.append(h)
        if preview is None:
            preview = (images[:16].cpu(), recon[:16].float().cpu())
    hist_DK = torch.stack(histograms) if histograms else torch.zeros(1, codebook_size, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(sums)
        dist.all_reduce(hist_DK)
    model.train(was_training)
    n = max(1.0, float(sums[4]))
    metrics = {
        "psnr": float(sums[0] / n),
        "psnr_baseline_mean_colour": float(sums[1] / n),
        "psnr_baseline_downsample": float(sums[2] / n),
        "codes_per_image": float(sums[3] / n),
        "eval_images": int(sums[4]),
    }
    for d in range(hist_DK.shape[0]):
        p = hist_DK[d] / hist_DK[d].sum().clamp_min(1)
        metrics[f"usage_d{d}"] = float((hist_DK[d] > 0).double().mean() * 100)
        metrics[f"perplexity_d{d}"] = float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))
    return metrics, preview
