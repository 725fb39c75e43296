"""Scoring generated images: Inception features (pipeline/evaluation/inception.py), a reference, and
torch-fidelity's metric functions (FID, Inception Score, KID, precision/recall).

A reference is a dict: "mu" / "sigma" (FID statistics, float64) and optionally "features"
((N, 2048) float32, needed by KID and precision/recall), plus where it came from. It is read from
  - an .npz: the ADM reference batch (`VIRTUAL_imagenet256_labeled.npz`: mu, sigma, arr_0 images;
    the images are featurised for KID / precision-recall), torch-fidelity-style or our own
    statistics (mu, sigma[, features]);
  - a split of the run's image shards, featurised once and cached next to the scores.
Uncalibrated extractors (no Inception weights) name every metric `*_uncalibrated`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ..generation.sample_files import iter_npz_images, read_npz_header
from ..runtime.errors import StageError
from ..runtime.io import atomic_path
from ..runtime.validate import check_reference_archive
from .inception import UNCALIBRATED, inception_features

METRIC_NAMES = {"fid": ("fid",), "isc": ("inception_score", "inception_score_std"), "kid": ("kid", "kid_std"),
                "prc": ("precision", "recall")}


def statistics(features_NF: torch.Tensor) -> dict:
    from torch_fidelity.metric_fid import fid_features_to_statistics

    stats = fid_features_to_statistics(features_NF.double())
    return {"mu": stats["mu"].astype(np.float64), "sigma": stats["sigma"].astype(np.float64)}


def features_of_npz(path: Path, extractor, batch: int, desc: str) -> dict[str, torch.Tensor]:
    shape, _ = read_npz_header(path)
    return inception_features(extractor, iter_npz_images(path, batch), total=shape[0], desc=desc)


def reference_from_npz(path: Path, extractor, *, batch: int, need_features: bool, resolution: int | None = None,
                       what: str = "score.reference") -> dict:
    """mu/sigma from the file (computed from its images when it has none); features when asked and
    the file has images (arr_0) or stored features. The file is checked first (pipeline/runtime/
    validate.py), its images against the samples' `resolution`."""
    path = Path(path)
    members = check_reference_archive(path, what, resolution)
    ref: dict = {"source": str(path)}
    with np.load(path) as archive:
        if {"mu", "sigma"} <= members:
            ref["mu"], ref["sigma"] = archive["mu"].astype(np.float64), archive["sigma"].astype(np.float64)
        if "features" in members:
            ref["features"] = torch.from_numpy(archive["features"].astype(np.float32))
    if "arr_0" in members and ("mu" not in ref or (need_features and "features" not in ref)):
        ref["features"] = features_of_npz(path, extractor, batch, "reference")["2048"]
        ref.setdefault("mu", statistics(ref["features"])["mu"])
        ref.setdefault("sigma", statistics(ref["features"])["sigma"])
    return ref


def save_reference(path: Path, features_NF: torch.Tensor, source: str) -> dict:
    """Our reference file (mu, sigma, features), written atomically; returns the reference."""
    ref = {**statistics(features_NF), "features": features_NF.float(), "source": source}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, mu=ref["mu"], sigma=ref["sigma"], features=ref["features"].numpy())
    return ref


PRC_BLOCK_BYTES = 1 << 30  # one block of float32 distances in precision/recall


def precision_recall(generated_NF: torch.Tensor, real_NF: torch.Tensor, *,
                     device: torch.device | str = "cpu") -> tuple[float, float]:
    """torch-fidelity's precision/recall (k=3 neighbourhoods), in row blocks of the distance matrix
    (its save_cpu_ram mode) sized to ~PRC_BLOCK_BYTES, computed on `device`: the full 50k x 50k
    float32 matrix would take 10 GB (20 GB peak) where one block takes 1 GB."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    rows = max(1, min(10000, PRC_BLOCK_BYTES // (4 * max(len(generated_NF), len(real_NF)))))
    r = prc_features_to_metric(generated_NF.to(device), real_NF.to(device), save_cpu_ram=True, prc_batch_size=rows,
                               prc_neighborhood=3, verbose=False)
    return r["precision"], r["recall"]


def compute_metrics(features: dict[str, torch.Tensor], reference: dict | None, metrics: Iterable[str], *,
                    source: str, kid_subset_size: int = 1000, seed: int = 2020,
                    device: torch.device | str = "cpu") -> dict:
    """The requested metrics of sample features against the reference (torch-fidelity's formulas),
    named `<metric>_uncalibrated` when the Inception weights were not the real ones."""
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    feats = features["2048"]
    out: dict[str, float] = {}
    for metric in metrics:
        if metric == "isc":
            r = isc_features_to_metric(features["logits_unbiased"], splits=10, shuffle=True, rng_seed=seed)
            values = (r["inception_score_mean"], r["inception_score_std"])
        elif reference is None:
            raise StageError(f"metric {metric!r} needs a reference")
        elif metric == "fid":
            fid = fid_statistics_to_metric(statistics(feats), reference, verbose=False)
            values = (fid["frechet_inception_distance"],)
        else:
            if "features" not in reference:
                raise StageError(f"metric {metric!r} needs reference features, and {reference['source']} has only "
                                 f"statistics; give the ADM batch with its images (arr_0) or drop {metric!r}")
            ref_feats = reference["features"]
            if metric == "kid":
                size = min(kid_subset_size, len(feats), len(ref_feats))
                r = kid_features_to_metric(feats, ref_feats, kid_subset_size=size, rng_seed=seed, verbose=False)
                values = (r["kernel_inception_distance_mean"], r["kernel_inception_distance_std"])
            else:  # prc: torch-fidelity's convention, generated first
                values = precision_recall(feats, ref_feats, device=device)
        for name, value in zip(METRIC_NAMES[metric], values):
            out[name if source != UNCALIBRATED else f"{name}_uncalibrated"] = float(value)
    return out


def leaderboard_row(model: str, parameters: int | None, tokens: str, sampling: str, metrics: dict, num_samples: int,
                    reference: str) -> str:
    """One markdown table row (header included) for markdown reports (leaderboard.md)."""
    def cell(*names):
        for n in names:
            if n in metrics:
                return f"{metrics[n]:.4g}" + (" (uncal.)" if n.endswith("_uncalibrated") else "")
        return "-"

    header = ("| model | parameters | tokens / image | sampling | FID | IS | precision | recall | samples | "
              "reference |\n|---|---|---|---|---|---|---|---|---|---|\n")
    params = "-" if not parameters else next(f"{parameters / scale:.{digits}f}{unit}" for scale, unit, digits in
                                             ((1e9, "B", 2), (1e6, "M", 1), (1e3, "K", 0), (1, "", 0))
                                             if parameters >= scale)
    return header + (f"| {model} | {params} | {tokens} | {sampling} | {cell('fid', 'fid_uncalibrated')} | "
                     f"{cell('inception_score', 'inception_score_uncalibrated')} | "
                     f"{cell('precision', 'precision_uncalibrated')} | {cell('recall', 'recall_uncalibrated')} | "
                     f"{num_samples} | {reference} |\n")


def score_samples(samples_npz: Path, reference: dict | None, extractor, source: str, metrics: Iterable[str], *,
                  batch: int = 50, kid_subset_size: int = 1000) -> dict:
    """Metrics of an ADM-format sample archive against a reference (see compute_metrics)."""
    features = features_of_npz(Path(samples_npz), extractor, batch, "samples")
    return compute_metrics(features, reference, metrics, source=source, kid_subset_size=kid_subset_size,
                           device=next(extractor.parameters()).device)
