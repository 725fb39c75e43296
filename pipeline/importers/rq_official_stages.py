"""`tessera import rq-official`: the authors' released folders as finished stages of a run.

Both folders are converted and checked first (pipeline/importers/rq_official.py for their RQ-VAE,
rq_official_prior.py for their RQ-Transformer); then the stage runner records them as done
(`train_tokenizer`, `train_prior`): stage lock, attempt.json, RUN_DIR/config.yaml, done.json with
the config hash the stage itself computes, and import.json with the hashes of the files read.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..config.root import Config
from ..config.schema import ConfigError
from ..runner.artifacts import (
    PRIOR_CONFIG,
    PRIOR_WEIGHTS,
    TOKENIZER_CONFIG,
    TOKENIZER_WEIGHTS,
    save_prior,
    save_tokenizer,
)
from ..runner.fingerprint import IMPORTED_INPUT_PREFIX
from ..runner.stage import StageContext, StageOutcome, StageResult, run_stage
from ..runtime.dist import barrier
from ..runtime.io import atomic_write_json, sha256_file
from ..runtime.validate import read_yaml_mapping
from .rq_official import (
    CONFIG_FILE,
    IMPORT_RECORD,
    MODEL_FILE,
    SOURCE,
    build_run_config,
    convert_stage1,
    load_stage1_state_dict,
    read_stage1_config,
    stage1_files,
)
from .rq_official_prior import build_from_their_state, load_stage2_state_dict, prior_config_from_yaml, stage2_files


class _ImportedStage:
    """Stands in for a stage module (stages/<name>.py) in the stage runner: the same NAME (so
    done.json carries the config hash the stage computes), and inputs = the hashes of the files
    read (the runner keeps inputs that start with IMPORTED_INPUT_PREFIX, so a later `tessera run`
    skips the stage instead of training). Subclasses write the outputs."""

    INPUTS: dict[str, tuple[str, ...]] = {}
    IMPORTS = True
    OUTPUTS: tuple[str, ...] = ()

    def __init__(self, name: str, model, inputs: dict, record: dict):
        self.NAME = name
        self.model, self.inputs, self.record = model, inputs, record

    def external_inputs(self, ctx: StageContext) -> dict:
        return dict(self.inputs)

    def write(self, ctx: StageContext) -> None:
        raise NotImplementedError

    def run(self, ctx: StageContext) -> StageResult:
        if ctx.env.is_main:
            self.write(ctx)
            atomic_write_json(ctx.stage_dir / IMPORT_RECORD, self.record)
        barrier()
        ctx.logger.info("imported %s %s from %s", SOURCE, self.NAME, self.record["folder"])
        n_params = sum(p.numel() for p in self.model.parameters())
        return StageResult(counts={"parameters": n_params, "imported_tensors": self.record["tensors"]},
                           metrics={},
                           outputs={n: sha256_file(ctx.stage_dir / n) for n in (*self.OUTPUTS, IMPORT_RECORD)})


class _ImportedTokenizerStage(_ImportedStage):
    """Their RQ-VAE as a finished train_tokenizer stage."""

    OUTPUTS = (TOKENIZER_WEIGHTS, TOKENIZER_CONFIG)

    def __init__(self, model, inputs: dict, record: dict):
        super().__init__("train_tokenizer", model, inputs, record)

    def write(self, ctx: StageContext) -> None:
        save_tokenizer(self.model, ctx.cfg.tokenizer, ctx.cfg.data.resolution, ctx.stage_dir)


class _ImportedPriorStage(_ImportedStage):
    """Their RQ-Transformer as a finished train_prior stage (after the tokenizer it was trained on)."""

    INPUTS = {"train_tokenizer": ()}  # must be done (its files are not what this stage's inputs name)
    OUTPUTS = (PRIOR_WEIGHTS, PRIOR_CONFIG)

    def __init__(self, model, inputs: dict, record: dict):
        super().__init__("train_prior", model, inputs, record)

    def write(self, ctx: StageContext) -> None:
        save_prior(self.model.state_dict(), ctx.cfg.prior, self.model.spec, ctx.stage_dir)


@dataclass
class PreparedImport:
    """A converted checkpoint, ready to be written by the stage runner."""
    stage: _ImportedStage
    cfg: Config


def prepare_stage1(stage1: str | Path, *, config: str | Path | None = None, overrides: Iterable[str] = (),
                   ema: bool = False, prior=None) -> PreparedImport:
    """Their RQ-VAE folder -> our tokenizer and run Config (nothing written yet). `prior` (a
    PriorConfig) becomes the config's prior section when stage 2 is imported too."""
    model_pt, config_yaml = stage1_files(stage1)
    spec = read_stage1_config(config_yaml)
    cfg = build_run_config(spec, config, overrides)
    if prior is not None:
        cfg = dataclasses.replace(cfg, prior=prior)
    state = load_stage1_state_dict(model_pt, ema=ema)
    model = convert_stage1(state, spec, cfg, where=str(model_pt))
    which = "state_dict_ema" if ema else "state_dict"
    inputs = {f"{IMPORTED_INPUT_PREFIX}{SOURCE}/stage1/{MODEL_FILE}[{which}]": sha256_file(model_pt),
              f"{IMPORTED_INPUT_PREFIX}{SOURCE}/stage1/{CONFIG_FILE}": sha256_file(config_yaml)}
    record = {"source": SOURCE, "folder": str(model_pt.parent.resolve()), "state_dict": which,
              "tensors": len(state), "inputs": inputs, "their_arch": spec.arch}
    return PreparedImport(_ImportedTokenizerStage(model, inputs, record), cfg)


def prepare_stage2(stage2: str | Path, tokenizer, cfg: Config) -> PreparedImport:
    """Their RQ-Transformer folder -> our prior over `tokenizer`'s codebook (nothing written yet)."""
    from ..models.prior_config import CodeSpec

    model_pt, config_yaml = stage2_files(stage2)
    prior_cfg, spec = prior_config_from_yaml(read_yaml_mapping(config_yaml, "--stage2"))
    codes = CodeSpec.from_tokenizer(tokenizer)
    if spec != codes:
        raise ConfigError(f"--stage2: their RQ-Transformer models codes {spec} but the stage-1 tokenizer makes "
                          f"{codes}; pass the stage-1 folder it was trained on")
    theirs, which = load_stage2_state_dict(model_pt)
    model = build_from_their_state(theirs, prior_cfg, spec, tokenizer.quantizer.embed.detach())
    inputs = {f"{IMPORTED_INPUT_PREFIX}{SOURCE}/stage2/{MODEL_FILE}[{which}]": sha256_file(model_pt),
              f"{IMPORTED_INPUT_PREFIX}{SOURCE}/stage2/{CONFIG_FILE}": sha256_file(config_yaml)}
    record = {"source": SOURCE, "folder": str(model_pt.parent.resolve()), "state_dict": which,
              "tensors": len(theirs), "inputs": inputs,
              "null_class": "added (mean of their class embeddings): guidance needs fine-tuning"}
    return PreparedImport(_ImportedPriorStage(model, inputs, record), cfg)


def import_rq_official(*, stage1: str | Path, run_dir: str | Path, stage2: str | Path | None = None,
                       config: str | Path | None = None, overrides: Iterable[str] = (), ema: bool = False,
                       force: bool = False) -> list[StageOutcome]:
    """`tessera import rq-official`: stage 1 (RQ-VAE -> train_tokenizer), then stage 2 when given
    (RQ-Transformer -> train_prior). Both are converted and checked before anything is written."""
    prior = None
    overrides = list(overrides)
    if stage2 is not None:
        prior, _ = prior_config_from_yaml(read_yaml_mapping(stage2_files(stage2)[1], "--stage2"))
        if prior.num_classes:  # their class count is the data's (a user override still wins, and is checked)
            overrides.insert(0, f"data.num_classes={prior.num_classes}")
    first = prepare_stage1(stage1, config=config, overrides=overrides, ema=ema, prior=prior)
    imports = [first]
    if stage2 is not None:
        imports.append(prepare_stage2(stage2, first.stage.model, first.cfg))
    return [run_stage(p.stage.NAME, p.cfg, run_dir, force=force, module=p.stage) for p in imports]
