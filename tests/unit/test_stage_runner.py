"""The stage runner's contract, exercised with a tiny stage defined here."""
import json

import pytest

import pipeline.runner.stage as stage_mod
from pipeline.cli.main import main as cli_main
from pipeline.cli.status import format_status
from pipeline.config.root import load_config
from pipeline.runner.fingerprint import package_versions, stage_inputs
from pipeline.runner.stage import StageError, StageResult, run_stage
from pipeline.runtime.io import sha256_file


class CountingStage:
    """Writes one output file per call; counts calls so skips are observable."""

    NAME = "shard"
    INPUTS: dict = {}

    def __init__(self):
        self.calls = 0
        self.inputs = {}

    def external_inputs(self, ctx):
        return dict(self.inputs)

    def run(self, ctx):
        self.calls += 1
        (ctx.stage_dir / "out.txt").write_text(str(ctx.cfg.data.num_train))
        return StageResult(counts={"images": ctx.cfg.data.num_train}, metrics={"psnr": 30.5},
                           outputs={"out.txt": sha256_file(ctx.stage_dir / "out.txt")})


@pytest.fixture
def fake_stage(monkeypatch):
    fake = CountingStage()
    monkeypatch.setattr(stage_mod, "load_stage_module", lambda name: fake)
    return fake


@pytest.fixture
def cfg(repo_root):
    return load_config(repo_root / "configs/demo-rq.yaml")


def test_done_json_then_skip(tmp_path, fake_stage, cfg):
    out = run_stage("shard", cfg, tmp_path)
    assert out.status == "done" and fake_stage.calls == 1
    done = json.loads((tmp_path / "shard/done.json").read_text())
    assert done["counts"] == {"images": cfg.data.num_train} and done["metrics"]["psnr"] == 30.5
    assert done["config_hash"] == cfg.stage_hash("shard") and "torch" in done["versions"]
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "shard/log.txt").is_file()
    again = run_stage("shard", cfg, tmp_path)
    assert again.status == "skipped" and fake_stage.calls == 1
    assert "skipped" in (tmp_path / "shard/log.txt").read_text()


def test_unrelated_section_change_still_skips(tmp_path, fake_stage, cfg, repo_root):
    run_stage("shard", cfg, tmp_path)
    other = load_config(repo_root / "configs/demo-rq.yaml", ["tokenizer_train.lr=1e-2"])
    assert run_stage("shard", other, tmp_path).status == "skipped"


def test_changed_config_refused_then_forced(tmp_path, fake_stage, cfg, repo_root):
    run_stage("shard", cfg, tmp_path)
    changed = load_config(repo_root / "configs/demo-rq.yaml", ["data.num_train=7"])
    with pytest.raises(StageError, match=r"different config \(data.num_train: 2000 -> 7\).*--force"):
        run_stage("shard", changed, tmp_path)
    assert fake_stage.calls == 1
    assert run_stage("shard", changed, tmp_path, force=True).status == "done"
    assert (tmp_path / "shard/out.txt").read_text() == "7"
    assert json.loads((tmp_path / "shard/done.json").read_text())["counts"]["images"] == 7


def test_changed_inputs_refused(tmp_path, fake_stage, cfg):
    run_stage("shard", cfg, tmp_path)
    fake_stage.inputs = {"manifest.json": "different"}
    with pytest.raises(StageError, match="different inputs"):
        run_stage("shard", cfg, tmp_path)


def test_partial_run_resumes_with_same_config_refuses_other(tmp_path, fake_stage, cfg, repo_root):
    def crash(ctx):
        (ctx.stage_dir / "partial.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    fake_stage.run, real_run = crash, fake_stage.run
    with pytest.raises(KeyboardInterrupt):
        run_stage("shard", cfg, tmp_path)
    assert not (tmp_path / "shard/done.json").exists()
    assert "partial" in format_status(tmp_path)
    changed = load_config(repo_root / "configs/demo-rq.yaml", ["data.num_train=9"])
    with pytest.raises(StageError, match=r"partially run.*data.num_train: 2000 -> 9"):
        run_stage("shard", changed, tmp_path)
    fake_stage.run = real_run
    assert run_stage("shard", cfg, tmp_path).status == "done"
    assert (tmp_path / "shard/partial.bin").exists()  # resumed in place, not cleared


def test_array_task_returns_none_writes_no_done(tmp_path, fake_stage, cfg):
    fake_stage.run = lambda ctx: None
    assert run_stage("shard", cfg, tmp_path, num_tasks=2, task_id=1).status == "task-done"
    assert not (tmp_path / "shard/done.json").exists()
    with pytest.raises(StageError, match="--task-id 2"):
        run_stage("shard", cfg, tmp_path, num_tasks=2, task_id=2)


def test_status_table(tmp_path, fake_stage, cfg):
    run_stage("shard", cfg, tmp_path)
    table = format_status(tmp_path)
    lines = table.splitlines()
    assert lines[1].split()[:5] == ["stage", "state", "counts", "wall", "time"]
    shard_row = next(line for line in lines if line.startswith("shard"))
    assert "done" in shard_row and f"images={cfg.data.num_train}" in shard_row and "psnr=30.5" in shard_row
    assert any(line.startswith("train_tokenizer") and "not started" in line for line in lines)


def test_status_shows_key_metrics_first():
    from pipeline.cli.status import _fmt_mapping

    # done.json keys come sorted; psnr must not be pushed past the 4 shown by alphabetical neighbours.
    metrics = {"codes_per_image": 64, "eval_images": 200, "perplexity_d0": 52.6, "perplexity_d1": 153.1,
               "psnr": 20.47, "psnr_baseline_mean_colour": 19.97, "usage_d0": 23.0}
    assert _fmt_mapping(metrics) == ("psnr=20.47 psnr_baseline_mean_colour=19.97 codes_per_image=64 "
                                     "eval_images=200")


def test_cli_reports_user_errors_without_traceback(tmp_path, capsys, repo_root):
    rc = cli_main(["run", str(repo_root / "configs/demo-rq.yaml"), "--run-dir", str(tmp_path), "data.resolutio=3"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("tessera: error: data.resolutio: unknown key") and "Traceback" not in err
    rc = cli_main(["stage", "nosuch", str(repo_root / "configs/demo-rq.yaml"), "--run-dir", str(tmp_path)])
    assert rc == 2 and "unknown stage 'nosuch'" in capsys.readouterr().err
    assert cli_main(["status", str(tmp_path / "missing")]) == 2


def test_cli_status(tmp_path, fake_stage, cfg, capsys):
    run_stage("shard", cfg, tmp_path)
    assert cli_main(["status", str(tmp_path)]) == 0
    assert "done" in capsys.readouterr().out


def test_unknown_stage_is_refused_naming_the_stages():
    # A name that is a module in stages/ but not a stage must be refused too, before any import.
    for name in ("bogus", "__init__"):
        with pytest.raises(StageError) as err:
            stage_mod.load_stage_module(name)
        assert str(err.value) == f"unknown stage {name!r}; stages are: {', '.join(stage_mod.STAGE_NAMES)}"


def test_every_stage_is_implemented_and_runnable():
    for name in stage_mod.STAGE_NAMES:
        module = stage_mod.load_stage_module(name)
        assert module.NAME == name and callable(module.run)
        assert set(stage_inputs(module)) <= set(stage_mod.STAGE_NAMES[:stage_mod.STAGE_NAMES.index(name)])


def test_package_versions_name_the_installed_torch():
    import torch

    assert package_versions()["torch"].split("+")[0] == torch.__version__.split("+")[0]


class ReadingStage(CountingStage):
    """train_prior reading shard's out.txt: a declared input."""

    NAME = "train_prior"
    INPUTS = {"shard": ("out.txt",)}


@pytest.fixture
def two_stages(monkeypatch):
    stages = {"shard": CountingStage(), "train_prior": ReadingStage()}
    monkeypatch.setattr(stage_mod, "load_stage_module", lambda name: stages[name])
    return stages


def test_declared_inputs_are_checked_and_fingerprinted_from_done_json(tmp_path, two_stages, cfg):
    with pytest.raises(StageError, match=r"stage train_prior needs the shard stage first \(no .*shard/done.json\): "
                                         r"run `tessera run CONFIG --run-dir .* --stages shard`"):
        run_stage("train_prior", cfg, tmp_path)
    assert not (tmp_path / "train_prior" / "done.json").exists()
    run_stage("shard", cfg, tmp_path)
    recorded = json.loads((tmp_path / "shard/done.json").read_text())["outputs"]["out.txt"]
    run_stage("train_prior", cfg, tmp_path)
    done = json.loads((tmp_path / "train_prior/done.json").read_text())
    assert done["inputs"] == {"shard/out.txt": recorded}
    # The recorded hash is the fingerprint (the file is not hashed again): a changed record is a changed input.
    shard_done = json.loads((tmp_path / "shard/done.json").read_text())
    shard_done["outputs"]["out.txt"] = "0" * 64
    (tmp_path / "shard/done.json").write_text(json.dumps(shard_done))
    with pytest.raises(StageError, match="different inputs shard/out.txt"):
        run_stage("train_prior", cfg, tmp_path)


def test_a_record_from_before_the_key_declarations_is_still_skipped(tmp_path, two_stages, cfg, repo_root):
    """done.json written by the code that hashed whole sections: keys it hashed that the stage no
    longer reads are no change; a key it now hashes is taken from the run's other records."""
    soft = load_config(repo_root / "configs/demo-rq.yaml", ["tokenizer.soft_tau=0.7"])
    run_stage("shard", soft, tmp_path)
    run_stage("train_prior", soft, tmp_path)
    path = tmp_path / "train_prior/done.json"
    done = json.loads(path.read_text())
    view = dict(done["config"])
    # What the older code recorded: whole sections (here data), without tokenizer.soft_tau...
    view["data"] = {**soft.to_dict()["data"]}
    view.pop("tokenizer")
    done.update(config=view, config_hash="recorded-by-older-code")
    path.write_text(json.dumps(done))
    # ... which train_tokenizer's older record held (it hashed the whole tokenizer section).
    tok = {**done, "stage": "train_tokenizer", "config": {"seed": 0, "tokenizer": soft.to_dict()["tokenizer"]}}
    (tmp_path / "train_tokenizer").mkdir()
    (tmp_path / "train_tokenizer/done.json").write_text(json.dumps(tok))
    assert run_stage("train_prior", soft, tmp_path).status == "skipped"
    changed = load_config(repo_root / "configs/demo-rq.yaml", ["tokenizer.soft_tau=0.2"])
    with pytest.raises(StageError, match=r"different config \(tokenizer.soft_tau: '<absent>' -> 0.2\)"):
        run_stage("train_prior", changed, tmp_path)
