"""Tokenizer evaluation on the val shards: PSNR, codebook usage, code length, the two trivial
baselines the demo must beat (per-image mean colour; a blurred downsample that spends the same
number of bits as the codes; both live in pipeline.evaluation.metrics) and, with a probe classifier, how
often the class of an original and of its reconstruction is recognised."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..evaluation.metrics import downsample_baseline, mean_colour_baseline, psnr_per_image
from ..runtime.io import atomic_path


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
def evaluate_tokenizer(model, batches, *, codebook_size: int, max_images: int, device: torch.device,
                       classifier=None) -> tuple[dict, tuple[torch.Tensor, torch.Tensor] | None]:
    """Returns (metrics, (originals, reconstructions) of the first batch for image grids).

    `batches` yields (images_BCHW, labels_B, ...); each rank passes its own shard of the val split and
    the sums are all-reduced, so the numbers cover `max_images` in total whatever the world size.
    With `classifier` (a ProbeClassifier on the CPU) the metrics add its accuracy on the originals
    and on their reconstructions, and the ratio of the two.
    """
    was_training = model.training
    model.eval()
    # psnr, psnr_mean_colour, psnr_downsample, code_len, images, classified right: originals, reconstructions
    sums = torch.zeros(7, dtype=torch.float64)
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
                             lengths_B.sum(), torch.tensor(float(images.shape[0]), dtype=torch.float64),
                             torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)])
        if classifier is not None:
            labels = batch[1][: images.shape[0]]
            sums[5] += float((classifier.predict(images.cpu()) == labels).sum())
            sums[6] += float((classifier.predict(recon.float().clamp(-1, 1).cpu()) == labels).sum())
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
    if classifier is not None:
        metrics["class_acc_originals"] = float(sums[5] / n)
        metrics["class_acc_reconstructions"] = float(sums[6] / n)
        metrics["class_acc_ratio"] = float(sums[6] / sums[5]) if sums[5] > 0 else 0.0
    for d in range(hist_DK.shape[0]):
        p = hist_DK[d] / hist_DK[d].sum().clamp_min(1)
        metrics[f"usage_d{d}"] = float((hist_DK[d] > 0).double().mean() * 100)
        metrics[f"perplexity_d{d}"] = float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))
    return metrics, preview


RECONSTRUCTIONS_PNG = "reconstructions.png"  # in the stage folder: originals above their reconstructions


def save_image_grid(preview: tuple[torch.Tensor, torch.Tensor], path, min_side: int = 128) -> None:
    """Originals in the top row, reconstructions below, as a PNG (written atomically); small
    images are enlarged (nearest neighbour) so a person can see them."""
    from PIL import Image
    from torchvision.utils import make_grid

    originals, recons = preview
    grid = make_grid(torch.cat([originals, recons.clamp(-1, 1)]), nrow=originals.shape[0], padding=2,
                     normalize=True, value_range=(-1, 1))
    scale = max(1, math.ceil(min_side / originals.shape[-1]))
    array = (grid.permute(1, 2, 0).numpy() * 255 + 0.5).clip(0, 255).astype("uint8")
    image = Image.fromarray(array).resize((grid.shape[2] * scale, grid.shape[1] * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
