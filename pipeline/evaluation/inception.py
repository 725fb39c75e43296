"""torch-fidelity's Inception-v3 (the TF-FID-compatible port the leaderboards use) and where its
weights come from.

    extractor, source = load_inception(weights="", download=True, allow_uncalibrated=False)
    feats = inception_features(extractor, blocks_BHWC_uint8, total=N)   # {"2048": (N, 2048), "logits_unbiased": ...}

Weights, in order: `weights` (a path), torch-fidelity's file in the torch hub cache, the download
(when `download`). The file is read with `torch.load(weights_only=True)` first (tensors only)
before torch-fidelity loads it. Without any of them the caller gets InceptionWeightsMissing,
which says which file to fetch and where to put it, unless `allow_uncalibrated`: then the same
network with seeded random weights is used and the source is "uncalibrated": its numbers are not
FID and callers name them `*_uncalibrated`.
"""
from __future__ import annotations

import socket
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ..runtime.errors import StageError
from ..runtime.progress import progress

FEATURES = ("2048", "logits_unbiased")
UNCALIBRATED = "uncalibrated"
UNCALIBRATED_SEED = 20151205  # the date in the weights' name: any fixed seed would do


class InceptionWeightsMissing(StageError):
    """No usable Inception weights; the message names the file to fetch and where to put it."""


def _url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return URL_INCEPTION_V3


def hub_cache_path() -> Path:
    """Where torch-fidelity's download lands (torch hub's checkpoint cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / _url().rsplit("/", 1)[1]


def _check_tensors_only(path: Path) -> None:
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means: not a plain tensor file we can trust
        raise InceptionWeightsMissing(f"{path}: not a readable tensors-only weights file ({type(err).__name__}: "
                                      f"{err}); fetch {_url()} again") from None


def _extractor(path: Path | None):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3("inception-v3-compat", list(FEATURES),
                                       feature_extractor_weights_path=None if path is None else str(path))


def _uncalibrated_extractor():
    """The same architecture with seeded random weights (BatchNorm at identity statistics)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class UncalibratedInception(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # called by __init__ with {}
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(UNCALIBRATED_SEED)
                for module in self.modules():
                    if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                        torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                        if module.bias is not None:
                            torch.nn.init.zeros_(module.bias)
            return None

    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        return UncalibratedInception("inception-v3-compat", list(FEATURES), feature_extractor_weights_path=str(empty))


def load_inception(weights: str = "", *, download: bool = True, allow_uncalibrated: bool = False,
                   device: torch.device | str = "cpu", timeout_s: float = 30.0):
    """(extractor in eval mode on `device`, source): source is the weights path or "uncalibrated"."""
    candidates = [Path(weights)] if weights else [hub_cache_path()]
    for path in candidates:
        if path.is_file():
            _check_tensors_only(path)
            return _extractor(path).to(device), str(path)
    if weights:
        problem = f"score.inception_weights={weights}: no such file"
    elif download:
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(timeout_s)
        try:
            extractor = _extractor(None)  # torch-fidelity downloads into the hub cache
            return extractor.to(device), str(hub_cache_path())
        except Exception as err:  # noqa: BLE001 - offline hosts fail in many ways
            problem = f"the download failed ({type(err).__name__}: {err})"
        finally:
            socket.setdefaulttimeout(previous)
    else:
        problem = "no weights file given and score.download_weights=false"
    if allow_uncalibrated:
        return _uncalibrated_extractor().to(device), UNCALIBRATED
    raise InceptionWeightsMissing(
        f"Inception weights unavailable: {problem}. Fetch {_url()} (on a machine with internet) and either put it "
        f"at {hub_cache_path()} or pass score.inception_weights=/path/to/that.pth; or set "
        f"score.allow_uncalibrated=true for uncalibrated numbers (never FID)")


@torch.no_grad()
def inception_features(extractor, blocks: Iterable[np.ndarray | torch.Tensor], *, total: int | None = None,
                       desc: str = "inception") -> dict[str, torch.Tensor]:
    """Features of uint8 images given as (B, H, W, 3) blocks: {"2048": (N, 2048), "logits_unbiased": (N, 1008)}
    as float32 on the CPU."""
    device = next(extractor.parameters()).device
    out: dict[str, list[torch.Tensor]] = {name: [] for name in FEATURES}
    with progress(total, desc=desc, unit="img") as bar:
        for block in blocks:
            x = torch.from_numpy(np.array(block)).permute(0, 3, 1, 2).contiguous().to(device)  # a writable copy
            for name, value in zip(FEATURES, extractor(x)):
                out[name].append(value.float().cpu())
            bar.update(x.shape[0])
    return {name: torch.cat(v) if v else torch.zeros(0) for name, v in out.items()}
