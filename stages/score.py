"""Stage `score`: the samples of `sample` against a reference with torch-fidelity's Inception.

1. Inputs: RUN_DIR/sample/samples.npz; the reference: `score.reference` (the ADM batch or a
   statistics .npz) or the run's own image shards (`score.reference_split`, featurised once and
   cached as RUN_DIR/inception/reference-<split>.npz with the hashes it was made from).
2. Inception weights: score.inception_weights, torch hub's cache, or the download; else a clear
   error, or with score.allow_uncalibrated a seeded random network whose numbers are all named
   *_uncalibrated (pipeline/evaluation/inception.py).
3. Metrics: FID, Inception Score, KID, precision/recall (score.metrics); the probe classifier's
   accuracy on class-conditional samples next to its accuracy on real val images (no Inception
   needed: it shows whether a prior learned its classes).
4. Outputs: metrics.json and leaderboard.md (one markdown row). Rank 0 computes; other ranks wait.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.evaluation.inception import UNCALIBRATED, load_inception
from pipeline.evaluation.reference_stats import split_reference
from pipeline.evaluation.scoring import leaderboard_row, reference_from_npz, score_samples
from pipeline.generation.sample_files import iter_npz_images
from pipeline.runner.artifacts import PRIOR_CONFIG
from pipeline.runner.rundir import RunDir
from pipeline.runner.stage import StageContext, StageError, StageResult
from pipeline.runner.units import MANIFEST_NAME
from pipeline.runtime.dist import broadcast_object
from pipeline.runtime.io import atomic_path, atomic_write_json, read_json, sha256_file
from pipeline.runtime.validate import check_reference_archive, check_sample_archive

NAME = "score"
INPUTS = {"sample": ("samples.npz",)}
METRICS_JSON, LEADERBOARD = "metrics.json", "leaderboard.md"


def check_inputs(ctx: StageContext) -> None:
    """The samples and a user's score.reference, before the runner records an attempt: a wrong
    reference file fails here, in one line, and the corrected rerun is not held to it."""
    shape = check_sample_archive(RunDir(ctx.run_dir).stage_dir("sample") / "samples.npz", "samples")
    if ctx.cfg.score.reference:
        check_reference_archive(ctx.cfg.score.reference, "score.reference", resolution=shape[1])


def external_inputs(ctx: StageContext) -> dict[str, str]:
    """The reference: the file `score.reference`, or the run's own shard manifest."""
    sc = ctx.cfg.score
    if sc.reference:
        return {"reference": sha256_file(sc.reference) if Path(sc.reference).is_file() else f"missing:{sc.reference}"}
    return {"shard/manifest.json": sha256_file(shard_manifest(RunDir(ctx.run_dir)))}


def shard_manifest(run: RunDir) -> Path:
    path = run.stage_dir("shard") / MANIFEST_NAME
    if not path.is_file():
        raise StageError(f"score.reference is empty, so the reference is the run's own shards, and there are none "
                         f"({path}); run the shard stage or set "
                         "score.reference=/path/to/VIRTUAL_imagenet256_labeled.npz")
    return path


def dataset_reference(ctx: StageContext, extractor, source: str, need_features: bool) -> dict:
    """The shards' reference split, featurised once per run (pipeline/evaluation/reference_stats.py: the same
    cache train_tokenizer's rFID fills) and reused while the shards and the weights match."""
    sc = ctx.cfg.score
    return split_reference(ctx.run_dir, shard_manifest(RunDir(ctx.run_dir)), sc.reference_split, extractor, source,
                           batch=sc.batch_size, need_features=need_features, logger=ctx.logger)


def classifier_check(ctx: StageContext, samples: Path) -> dict:
    """Probe-classifier accuracy on the samples (labels arr_1) and on real val images."""
    from pipeline.train.classifier import classifier_for_run

    run = RunDir(ctx.run_dir)
    manifest = run.stage_dir("shard") / MANIFEST_NAME
    with np.load(samples) as archive:
        labels = archive["arr_1"]
    if not manifest.is_file() or labels.min() < 0:
        return {}
    model, meta = classifier_for_run(ctx.run_dir, manifest, seed=ctx.cfg.seed, logger=ctx.logger, device=ctx.device)
    if model is None:  # too many classes for the probe (logged)
        return {}
    correct = seen = 0
    with torch.no_grad():
        for block in iter_npz_images(samples, 256):
            if block.shape[1] != meta["resolution"]:
                return {}
            x = torch.from_numpy(np.ascontiguousarray(block)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
            pred = model.predict(x)
            correct += int((pred.numpy() == labels[seen:seen + len(block)]).sum())
            seen += len(block)
    return {"classifier_accuracy_samples": correct / max(seen, 1),
            "classifier_accuracy_real_val": meta["val_accuracy"], "classifier_chance": 1.0 / meta["num_classes"]}


def describe_model(run: RunDir) -> tuple[str, int | None, str]:
    """(model name, parameters, tokens per image) for the leaderboard row."""
    prior = run.read_done("train_prior") or {}
    config_path = run.stage_dir("train_prior") / PRIOR_CONFIG
    if not config_path.is_file():
        return "-", None, "-"
    cfg = read_json(config_path)
    spec, p = cfg["spec"], cfg["prior"]
    name = p.get("preset") or f"{p['kind']}-transformer {p['embed_dim']}w"
    tokens = (f"{spec['height']}x{spec['width']}x{spec['depth']}" if spec["kind"] == "rq"
              else f"{spec['height']}x{spec['width']} coarse / {2 * spec['height']}x{2 * spec['width']} fine")
    return name, prior.get("counts", {}).get("parameters"), tokens


def run(ctx: StageContext) -> StageResult:
    samples = ctx.input_path("sample", "samples.npz")
    outcome = None
    if ctx.env.is_main:
        try:
            outcome = {"metrics": compute(ctx, samples)}
        except StageError as err:
            outcome = {"error": str(err)}
    outcome = broadcast_object(outcome)
    if "error" in outcome:
        raise StageError(outcome["error"])
    metrics = outcome["metrics"]
    with np.load(samples) as archive:
        count = int(archive["arr_1"].shape[0])
    return StageResult(counts={"samples": count}, metrics=metrics,
                       outputs={n: sha256_file(ctx.stage_dir / n) for n in (METRICS_JSON, LEADERBOARD)})


def score_archive(samples: Path, sc, device: torch.device, logger, dataset_reference=None) -> tuple[dict, str, dict]:
    """(metrics, Inception source, reference) of the samples .npz against `sc.reference` (an .npz),
    or against `dataset_reference(extractor, source, need_features)` when that is empty. The score
    stage and `tessera score --samples --ref` both call it."""
    extractor, source = load_inception(sc.inception_weights, download=sc.download_weights,
                                       allow_uncalibrated=sc.allow_uncalibrated, device=device)
    if source == UNCALIBRATED:
        logger.warning("no Inception weights: uncalibrated Inception (every metric is named *_uncalibrated)")
    need_features = bool({"kid", "prc"} & set(sc.metrics))
    if sc.reference:
        resolution = check_sample_archive(samples, "samples")[1]
        reference = reference_from_npz(Path(sc.reference), extractor, batch=sc.batch_size, need_features=need_features,
                                       resolution=resolution)
    else:
        reference = dataset_reference(extractor, source, need_features)
    metrics = score_samples(samples, reference, extractor, source, sc.metrics, batch=sc.batch_size,
                            kid_subset_size=sc.kid_subset_size)
    return metrics, source, reference


def write_score(out_dir: Path, record: dict, row: str) -> None:
    """metrics.json (the record) and leaderboard.md (one markdown row), each written atomically."""
    atomic_write_json(out_dir / METRICS_JSON, record)
    with atomic_path(out_dir / LEADERBOARD) as tmp:
        tmp.write_text(row)


def compute(ctx: StageContext, samples: Path) -> dict:
    sc = ctx.cfg.score
    run_dir = RunDir(ctx.run_dir)
    metrics, source, reference = score_archive(
        samples, sc, ctx.device, ctx.logger,
        dataset_reference=lambda extractor, source, need: dataset_reference(ctx, extractor, source, need))
    if sc.classifier_check:
        metrics.update(classifier_check(ctx, samples))
    sample_done = run_dir.read_done("sample") or {}
    sampling = sample_done.get("metrics", {}).get("sampling", {})
    settings = (f"T={sampling.get('temperature', '-')} top-k={sampling.get('top_k', '-')} "
                f"top-p={sampling.get('top_p', '-')} cfg={sampling.get('cfg_scale', '-')}")
    name, params, tokens = describe_model(run_dir)
    num = sample_done.get("counts", {}).get("samples", 0)
    record = {"metrics": metrics, "inception": source, "reference": reference["source"], "samples": str(samples),
              "num_samples": num, "model": name, "parameters": params, "tokens_per_image": tokens,
              "sampling": sampling}
    write_score(ctx.stage_dir, record, leaderboard_row(name, params, tokens, settings, metrics, num,
                                                       reference["source"]))
    ctx.logger.info("score: %s", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    return metrics
