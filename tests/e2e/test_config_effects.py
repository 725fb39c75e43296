"""Every config key affects exactly the stages that read it: each stage hashes the keys it reads
(and only those), and every key is read by some code.

How reads are found: dynamically. Every stage of a tiny run (RQ, RQ with soft targets, DQ) runs
in this process while attribute reads on the run's own config objects are recorded, per stage
(the config's sections, not copies: a tokenizer rebuilt from an exported tokenizer.json is not a
read of the run's config). A static scan of `cfg.<section>.<key>` was the other choice; the code
passes sections around under many names (`tc`, `pc`, `self.cfg`, `getattr(data, name)`,
`dataclasses.asdict(section)`), so a scan would miss reads a run cannot. What a run does not
reach (another data source, DeepSpeed, the launchers) is listed below with the branch that
reads it, and checked to be declared; everything else must match the recording exactly.
Runtime keys may be read anywhere (the runner, the launchers): those no stage read are looked
for by name in the code.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict

import pytest
from testkit import REPO, TINY_TOKENIZER

from pipeline.config.root import Config, load_config
from pipeline.config.schema import key_effects
from pipeline.runner import stage as stage_runner
from pipeline.runner.rundir import STAGE_NAMES
from pipeline.train import classifier as probe_classifier

pytestmark = pytest.mark.e2e

# 64 train images: the probe classifier (score) draws full batches of 64.
TINY_RUN = [*TINY_TOKENIZER, "data.num_train=64", "data.num_val=16", "data.shard_max_count=32",
            "data.shard_decode_processes=1", "tokenizer_train.steps=2", "tokenizer_train.checkpoint_every=1",
            "tokenizer_train.eval_images=8", "prior.embed_dim=16", "prior.spatial_layers=1", "prior.depth_layers=1",
            "prior_train.steps=2", "prior_train.batch_size=4", "prior_train.eval_images=4", "prior_train.engine=ddp",
            "prior_train.sample_every=0", "prior_train.checkpoint_every=1", "sample.num_samples=6",
            "sample.chunk_size=4", "sample.batch_size=2", "sample.grid_classes=2", "score.download_weights=false",
            "score.kid_subset_size=4", "score.batch_size=4", "precompute.verify_images=4"]
SCENARIOS = {
    "rq": ("configs/demo-rq.yaml", []),
    "rq-soft": ("configs/demo-rq.yaml", ["precompute.store_latents=true", "prior_train.targets=soft"]),
    "dq": ("configs/demo-dq.yaml", ["tokenizer.ch=8", "tokenizer.z_channels=8"]),
}

# Keys a stage reads only on a branch the tiny runs above do not take: key -> (stage, branch).
UNREACHED = {
    "prior_train.zero_stage": ("train_prior", "engine=deepspeed"),
    "prior_train.offload_optimizer": ("train_prior", "engine=deepspeed"),
    "prior_train.offload_params": ("train_prior", "engine=deepspeed"),
    "prior_train.deepspeed_config": ("train_prior", "engine=deepspeed"),
    "tokenizer_train.zero_stage": ("train_tokenizer", "engine=deepspeed"),
}


class ReadRecorder:
    """Records `section.key` reads on the sections of one Config while a stage name is set."""

    def __init__(self):
        self.reads: dict[str, set[str]] = defaultdict(set)
        self.stage: str | None = None
        self.sections: dict[int, str] = {}
        self._patched: list[tuple[type, object]] = []

    def track(self, cfg: Config) -> None:
        self.sections = {id(cfg): ""}
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if dataclasses.is_dataclass(value):
                self.sections[id(value)] = f.name + "."
        for cls in {type(cfg), *(type(getattr(cfg, f.name)) for f in dataclasses.fields(cfg))}:
            if dataclasses.is_dataclass(cls) and cls not in [c for c, _ in self._patched]:
                self._patch(cls)

    def _patch(self, cls: type) -> None:
        recorder, original = self, cls.__getattribute__
        names = {f.name for f in dataclasses.fields(cls)}

        def recording_getattribute(obj, name):
            value = original(obj, name)
            if recorder.stage is not None and name in names:
                prefix = recorder.sections.get(id(obj))
                if prefix is not None and not dataclasses.is_dataclass(value):
                    recorder.reads[name if prefix == "" else prefix + name].add(recorder.stage)
            return value

        self._patched.append((cls, cls.__dict__.get("__getattribute__")))
        cls.__getattribute__ = recording_getattribute

    def undo(self) -> None:
        for cls, previous in self._patched:
            if previous is None:
                del cls.__getattribute__
            else:
                cls.__getattribute__ = previous


def record_stage_reads(tmp_path_factory) -> dict[str, set[str]]:
    """Run every stage of every scenario in this process; dotted key -> stages that read it."""
    recorder = ReadRecorder()
    real_load = stage_runner.load_stage_module

    class Recording:
        """A stage module whose run and input hooks record reads under the stage's name."""

        def __init__(self, module):
            self._module = module

        def __getattr__(self, name):
            attr = getattr(self._module, name)
            if name not in ("run", "external_inputs") or not callable(attr):
                return attr

            def recorded(*args, **kwargs):
                recorder.stage = self._module.NAME
                try:
                    return attr(*args, **kwargs)
                finally:
                    recorder.stage = None
            return recorded

    # The metrics themselves (a 2048-wide covariance square root: minutes on 2 cores) read no key:
    # the score stage reads its keys to build their arguments, before the call. The probe
    # classifier reads none either: 2 steps instead of its 400.
    score_module = real_load("score")
    real_score_samples, real_probe_steps = score_module.score_samples, probe_classifier.STEPS
    score_module.score_samples = lambda *args, **kwargs: {}
    probe_classifier.STEPS = 2
    stage_runner.load_stage_module = lambda name: Recording(real_load(name))
    try:
        for scenario, (path, extra) in SCENARIOS.items():
            cfg = load_config(REPO / path, [*TINY_RUN, *extra])
            recorder.track(cfg)
            run_dir = tmp_path_factory.mktemp(scenario)
            for name in STAGE_NAMES:
                stage_runner.run_stage(name, cfg, run_dir)
    finally:
        stage_runner.load_stage_module = real_load
        score_module.score_samples, probe_classifier.STEPS = real_score_samples, real_probe_steps
        recorder.undo()
    return recorder.reads


@pytest.fixture(scope="module")
def reads(tmp_path_factory):
    return record_stage_reads(tmp_path_factory)


def test_every_key_is_hashed_by_exactly_the_stages_that_read_it(reads):
    effects = key_effects(Config)
    problems = []
    for key, stages in effects.items():
        read_by = set(reads.get(key, ()))
        if key in UNREACHED:
            stage, branch = UNREACHED[key]
            if stage not in stages:
                problems.append(f"{key}: read by {stage} ({branch}) but not hashed by it")
            read_by.add(stage)
        if not stages:  # runtime: may be read anywhere
            continue
        for stage in sorted(read_by - set(stages)):
            problems.append(f"{key}: read by {stage}, which does not hash it (affects={stages})")
        for stage in sorted(set(stages) - read_by):
            problems.append(f"{key}: hashed by {stage}, which never reads it")
    assert not problems, "\n".join(problems)


def test_every_key_is_read(reads):
    effects = key_effects(Config)
    unread = [key for key, stages in effects.items() if stages and key not in reads and key not in UNREACHED]
    assert not unread, f"keys no stage reads: {unread}"
    # Runtime keys outside a stage's run (the runner's fetch options, the launchers' resources): by
    # name, as an attribute read anywhere in the code but the config's own definitions.
    code = "\n".join(path.read_text() for folder in ("pipeline", "stages", "launchers")
                     for path in sorted((REPO / folder).rglob("*.py"))
                     if path.parent.name != "config" and not path.name.endswith("_config.py"))
    unread = [key for key, stages in effects.items()
              if not stages and key not in reads and f".{key.rsplit('.', 1)[-1]}" not in code]
    assert not unread, f"runtime keys nothing reads: {unread}"
