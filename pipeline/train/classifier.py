"""The probe classifier of a run's dataset: trained once on the train shards, cached in the run
directory, reused by every evaluation that asks "does this image still show its class?" (the
tokenizer's reconstructions, the prior's samples).

    RUN_DIR/classifier/classifier.safetensors   weights
    RUN_DIR/classifier/classifier.json          shard manifest hash, classes, resolution, steps, val accuracy

The cache is keyed by the shard manifest's hash: other data, another classifier. Training is
seeded and runs on one process (rank 0, on the stage's device; the other ranks wait and load its
file), so every rank and every rerun scores with the same weights.

The probe is a fixed budget of STEPS x BATCH images. Below MIN_IMAGES_PER_CLASS of them per class
(more than 100 classes, e.g. ImageNet's 1000) its accuracy says nothing about the images, so it is
skipped with one log line and evaluations report no classifier metrics. A train split smaller than
a batch trains on full-split batches; an empty one is refused.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model

from ..models.classifier import ProbeClassifier
from ..runtime.dist import barrier, is_main_process
from ..runtime.errors import StageError
from ..runtime.io import atomic_path, atomic_write_json, read_json, sha256_file
from ..runtime.progress import progress

FOLDER, WEIGHTS, META = "classifier", "classifier.safetensors", "classifier.json"
STEPS, BATCH, LR = 400, 64, 2e-3  # ~6 epochs of the 2000-image demo set: ~20 s on 2 CPU cores
MIN_IMAGES_PER_CLASS = 256
MAX_CLASSES = STEPS * BATCH // MIN_IMAGES_PER_CLASS  # 100
LOG_EVERY = 50


def probe_skip_reason(num_classes: int) -> str | None:
    """Why the probe would be meaningless for this many classes (None: it is not)."""
    if num_classes > MAX_CLASSES:
        return (f"probe classifier skipped: {num_classes} classes leave {STEPS * BATCH // num_classes} of its "
                f"{STEPS} x {BATCH} training images per class (< {MIN_IMAGES_PER_CLASS}): its accuracy would mean "
                f"nothing (more than {MAX_CLASSES} classes)")
    return None


def classifier_for_run(run_dir: str | Path, manifest_path: str | Path, *, seed: int,
                       logger: logging.Logger | None = None,
                       device: torch.device | str = "cpu") -> tuple[ProbeClassifier | None, dict]:
    """(classifier in eval mode on the CPU, its metadata), training it first (on `device`) when the
    cache is missing or belongs to other shards; (None, {"skipped": reason}) when the dataset has
    too many classes for the probe. Collective under torch.distributed."""
    logger = logger or logging.getLogger("tessera")
    reason = probe_skip_reason(read_json(manifest_path)["num_classes"])
    if reason is not None:
        logger.info("%s", reason)
        return None, {"skipped": reason}
    folder = Path(run_dir) / FOLDER
    manifest_sha = sha256_file(manifest_path)
    if is_main_process() and _cached_meta(folder, manifest_sha) is None:
        train_classifier(manifest_path, folder, seed=seed, manifest_sha=manifest_sha, logger=logger, device=device)
    barrier()
    meta = _cached_meta(folder, manifest_sha)
    with torch.random.fork_rng(devices=[]):  # the throwaway initialisation must not draw from the caller's RNG
        model = ProbeClassifier(meta["num_classes"], meta["width"])
    load_model(model, str(folder / WEIGHTS))
    return model.eval(), meta


def _cached_meta(folder: Path, manifest_sha: str) -> dict | None:
    try:
        meta = read_json(folder / META)
    except (OSError, ValueError):
        return None
    return meta if meta.get("manifest_sha256") == manifest_sha and (folder / WEIGHTS).is_file() else None


def train_classifier(manifest_path: str | Path, folder: Path, *, seed: int, manifest_sha: str,
                     logger: logging.Logger, device: torch.device | str = "cpu") -> dict:
    # Its own RNG stream: training it mid-run (an eval) must not move the caller's global RNG, or
    # a resumed run (which finds it cached) would diverge from an uninterrupted one.
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return _train(manifest_path, folder, seed=seed, manifest_sha=manifest_sha, logger=logger,
                      device=torch.device(device))


def _train(manifest_path, folder: Path, *, seed: int, manifest_sha: str, logger: logging.Logger,
           device: torch.device) -> dict:
    from ..data.reader import make_image_loader

    manifest = read_json(manifest_path)
    train_images = manifest["splits"].get("train", {}).get("num_samples", 0)
    if train_images == 0:
        raise StageError(f"probe classifier: the train split of {manifest_path} is empty; set "
                         f"tokenizer_train.eval_classifier=false and score.classifier_check=false")
    # A split smaller than a batch trains on batches of the whole split (drop_last would yield none).
    batch = min(BATCH, train_images)
    start = time.perf_counter()
    model = ProbeClassifier(manifest["num_classes"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=STEPS, pct_start=0.1)
    loader = make_image_loader(manifest_path, "train", batch, seed=seed + 1, shuffle=True, drop_last=True,
                               hflip=True)
    logger.info("probe classifier: training %d steps at batch %d on %d train images, %d classes, on %s",
                STEPS, batch, train_images, manifest["num_classes"], device)
    step = 0
    with progress(STEPS, desc="probe classifier", unit="step") as bar:
        while step < STEPS:
            epoch_start = step
            for images, labels, *_ in loader:
                loss = F.cross_entropy(model(images.to(device)), labels.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                bar.update(1)
                if step % LOG_EVERY == 0 or step == STEPS:
                    logger.info("probe classifier: step %d/%d, loss %.4f", step, STEPS, loss.item())
                if step == STEPS:
                    break
            if step == epoch_start:  # never loop on a loader that yields nothing
                raise StageError(f"probe classifier: the train split of {manifest_path} yielded no batch of {batch}")
    model = model.cpu()
    val_accuracy = accuracy(model, make_image_loader(manifest_path, "val", 256, shuffle=False)) \
        if manifest["splits"].get("val", {}).get("num_samples") else None
    meta = {"manifest_sha256": manifest_sha, "num_classes": manifest["num_classes"], "width": model.width,
            "resolution": manifest["resolution"], "steps": STEPS, "batch_size": batch, "seed": seed,
            "val_accuracy": val_accuracy, "train_seconds": round(time.perf_counter() - start, 1)}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_model(model, str(tmp))
    atomic_write_json(folder / META, meta)  # last: its presence (with this hash) means the cache is complete
    logger.info("probe classifier trained in %.1f s: val accuracy %s", meta["train_seconds"], val_accuracy)
    return meta


@torch.no_grad()
def accuracy(model: ProbeClassifier, batches) -> float:
    correct = total = 0
    for images, labels, *_ in batches:
        correct += int((model.predict(images) == labels).sum())
        total += len(labels)
    return correct / max(total, 1)
