"""Tokenizer evaluation on the val shards: PSNR, codebook usage, code length, and the two
trivial baselines the demo must beat (per-image mean colour; a blurred downsample that spends
the same number of bits as the codes; both live in pipeline.metrics)."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..metrics import downsample_baseline, mean_colour_baseline, psnr_per_image


def code_maps_by_depth(codes) -> list[torch.Tensor]:
    """Flat code indices per depth: RQ/VQ codes (B,H,W,D) or DQ codes (their flat variable-length lists)."""
    if isinstance(codes, torch.Tensor):
        return [codes[..., d].reshape(-1) for d in range(codes.shape[-1])]
    return [torch.cat([c.reshape(-1) for c in codes.sequences])]


def _all_reduce(t: torch.Tensor, device: torch.device, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """Sum (or `op`) over ranks, on `device` (NCCL reduces CUDA tensors only); returns a CPU tensor."""
    if not dist.is_initialized():
        return t
    t = t.to(device)
    dist.all_reduce(t, op=op)
    return t.cpu()


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
    # Every rank must all-reduce a histogram of the same shape, including a rank whose shard of the
    # val split gave it no batch (it cannot know the code depth from data): the ranks first agree on
    # the number of rows (the code depth; 1 for DQ) and a rank with fewer pads with zero rows.
    rows = int(_all_reduce(torch.tensor([len(histograms)]), device, dist.ReduceOp.MAX))
    hist_DK = torch.zeros(max(rows, 1), codebook_size, dtype=torch.float64)  # no batch anywhere: one zero row
    if histograms:
        hist_DK[: len(histograms)] = torch.stack(histograms)
    sums = _all_reduce(sums, device)
    hist_DK = _all_reduce(hist_DK, device)
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
