import pytest

from pipeline.config.root import Config, load_config, parse_override
from pipeline.config.schema import ConfigError, describe

DEMO = "configs/demo-rq.yaml"


def error_of(overrides, path=DEMO) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_presets_load(repo_root):
    for path in sorted((repo_root / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.name == path.stem
    assert load_config(repo_root / "configs/demo-dq.yaml").tokenizer.kind == "dq"


def test_base_presets_merge_section_by_section(repo_root, tmp_path):
    big = load_config(repo_root / "configs/imagenet256-rq-3.8b.yaml")
    base = load_config(repo_root / "configs/imagenet256-rq.yaml")
    assert big.prior.embed_dim == 2560 and big.prior_train.batch_size == base.prior_train.batch_size == 2048
    assert big.data == base.data and big.launcher.train_prior.nodes == 8
    dq = load_config(repo_root / "configs/imagenet256-dq.yaml")
    assert dq.tokenizer.kind == "dq" and dq.prior.kind == "dq" and dq.data.root == base.data.root
    (tmp_path / "a.yaml").write_text("base: b.yaml\nseed: 1\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="base. chain loops"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml.*the base of"):
        load_config(tmp_path / "c.yaml")


def test_overrides_are_typed(repo_root):
    cfg = load_config(repo_root / DEMO, ["tokenizer_train.lr=1e-4", "data.resolution=64", "data.hflip=true",
                                         "tokenizer_train.betas=[0.9, 0.99]"])
    assert cfg.tokenizer_train.lr == 1e-4 and isinstance(cfg.tokenizer_train.lr, float)
    assert cfg.data.resolution == 64 and cfg.data.hflip is True
    assert cfg.tokenizer_train.betas == [0.9, 0.99]


def test_preset_then_explicit_keys(repo_root):
    cfg = load_config(repo_root / DEMO, ["tokenizer.codebook_size=512"])
    assert cfg.tokenizer.codebook_size == 512 and cfg.tokenizer.depth == 4  # rest from the rq-demo preset


def test_unknown_key_names_path_and_suggests(repo_root):
    msg = error_of(["data.resolutin=64"], repo_root / DEMO)
    assert msg.startswith("data.resolutin: unknown key.")
    assert "Did you mean 'resolution'?" in msg and "shard_max_count" in msg
    assert "tokenizer_trian" in error_of(["tokenizer_trian.lr=1"], repo_root / DEMO)
    assert "Did you mean 'tokenizer_train'" in error_of(["tokenizer_trian.lr=1"], repo_root / DEMO)


def test_wrong_type(repo_root):
    assert error_of(["data.resolution=big"], repo_root / DEMO) == "data.resolution: expected int, got str 'big'"
    assert "expected list of float" in error_of(["tokenizer_train.betas=0.5"], repo_root / DEMO)
    assert "data: expected a mapping" in error_of(["data=3"], repo_root / DEMO)


def test_out_of_range_and_choices(repo_root):
    assert "out of range; allowed: >= 8 and <= 1024" in error_of(["data.resolution=4"], repo_root / DEMO)
    assert "> 0.0" in error_of(["tokenizer_train.lr=0"], repo_root / DEMO)
    msg = error_of(["data.format=mdss"], repo_root / DEMO)
    assert "'webdataset', 'mds'" in msg and "Did you mean 'mds'" in msg
    assert "unknown tokenizer preset" in error_of(["tokenizer.preset=rq-dem"], repo_root / DEMO)


def test_cross_field_validation(repo_root):
    assert "data.root: required" in error_of(["data.source=imagefolder"], repo_root / DEMO)
    assert "tokenizer.depth" in error_of(["tokenizer.kind=vq"], repo_root / DEMO)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("data.resolution")


def test_stage_hash_tracks_only_the_keys_that_affect_the_stage(repo_root):
    a = load_config(repo_root / DEMO)
    b = load_config(repo_root / DEMO, ["tokenizer_train.lr=1e-4"])
    c = load_config(repo_root / DEMO, ["data.num_train=10"])
    assert a.stage_hash("shard") == b.stage_hash("shard") != c.stage_hash("shard")
    assert a.stage_hash("train_tokenizer") != b.stage_hash("train_tokenizer")
    # The shard stage's manifest stands for data.num_train in later stages: they do not hash it.
    assert a.stage_hash("train_tokenizer") == c.stage_hash("train_tokenizer")


def test_every_key_declares_what_it_affects_with_known_stage_names():
    from pipeline.config.schema import key_effects
    from pipeline.runner.rundir import STAGE_NAMES

    effects = key_effects(Config)  # raises TypeError naming a key that declares nothing
    assert set(effects) == {line.split(" ", 1)[0] for line in describe(Config)}
    assert all(set(stages) <= set(STAGE_NAMES) for stages in effects.values()), effects
    assert effects["data.num_workers"] == () and effects["launcher.sample.nodes"] == ()
    assert effects["tokenizer_train.lr"] == ("train_tokenizer",) and effects["prior_train.lr"] == ("train_prior",)


def test_a_key_without_affects_is_refused_by_name():
    import dataclasses

    from pipeline.config.schema import key_effects, option

    @dataclasses.dataclass
    class Section:
        size: int = option(1, "declared", affects="shard")
        colour: str = option("red", "forgot to say what it affects")

    with pytest.raises(TypeError, match="colour does not declare what it affects"):
        key_effects(Section)


def test_precompute_codes_does_not_hash_the_tokenizer_training_section(repo_root):
    a = load_config(repo_root / DEMO)
    b = load_config(repo_root / DEMO, ["tokenizer_train.log_every=7", "tokenizer_train.lr=1e-2"])
    assert "tokenizer_train" not in a.stage_view("precompute_codes")
    assert a.stage_hash("precompute_codes") == b.stage_hash("precompute_codes")


def test_soft_tau_is_hashed_by_train_prior_not_train_tokenizer(repo_root):
    a = load_config(repo_root / DEMO)
    b = load_config(repo_root / DEMO, ["tokenizer.soft_tau=0.1"])
    assert a.stage_hash("train_prior") != b.stage_hash("train_prior")
    assert a.stage_hash("train_tokenizer") == b.stage_hash("train_tokenizer")


def test_prior_train_has_no_eval_classifier_key(repo_root):
    # It was documented and hashed but nothing read it; the tokenizer's eval keeps its own.
    assert load_config(repo_root / DEMO, ["tokenizer_train.eval_classifier=false"])
    assert "prior_train.eval_classifier: unknown key" in error_of(["prior_train.eval_classifier=true"])


def test_granularities_advertises_only_what_it_accepts(repo_root):
    line = next(line for line in describe(Config) if line.startswith("tokenizer.granularities "))
    assert "choices=[2]" in line
    assert "granularities: 3 is not allowed; choose one of 2" in error_of(["tokenizer.granularities=3"])


def test_yaml_round_trip(tmp_path, repo_root):
    cfg = load_config(repo_root / DEMO, ["seed=3"])
    saved = tmp_path / "config.yaml"
    saved.write_text(cfg.to_yaml())
    again = load_config(saved)
    assert again.to_dict() == {**cfg.to_dict()} and isinstance(again, Config)


def test_runtime_keys_do_not_change_any_hash(repo_root):
    from pipeline.runner.rundir import STAGE_NAMES

    a = load_config(repo_root / DEMO)
    b = load_config(repo_root / DEMO, ["data.num_workers=4", "tokenizer_train.log_every=3", "sample.grid_classes=2",
                                       "precompute.verify_images=5", "launcher.sample.nodes=3"])
    c = load_config(repo_root / DEMO, ["data.hflip=true"])  # read by the tokenizer's reader
    assert all(a.stage_hash(stage) == b.stage_hash(stage) for stage in STAGE_NAMES)
    assert a.stage_hash("train_tokenizer") != c.stage_hash("train_tokenizer")
    assert a.stage_hash("shard") == c.stage_hash("shard")


def test_configuration_reference_is_generated_from_the_typed_config(repo_root, tmp_path):
    from pipeline.config.reference import DOCUMENT, current_block, main, render
    from pipeline.config.root import config_keys

    document = repo_root / DOCUMENT
    block = current_block(document.read_text())
    assert block == render(), f"{DOCUMENT} is stale: python -m pipeline.config.reference --write {DOCUMENT}"
    assert main(["--check", str(document)]) == 0
    # Every key `tessera config --keys` knows is documented, with its help text.
    for line in config_keys():
        key = line.split(" ", 1)[0]
        assert f"| `{key}` |" in block, key
    # A stale copy is caught by --check and repaired by --write, leaving the text around the block alone.
    stale = tmp_path / "configuration.md"
    stale.write_text("intro\n\n" + block.replace("| `seed` |", "| `seed_old` |") + "\nafter\n")
    assert main(["--check", str(stale)]) == 1
    assert main(["--write", str(stale)]) == 0
    assert stale.read_text() == "intro\n\n" + render() + "\nafter\n"
    assert main(["--check", str(stale)]) == 0


def test_a_key_added_since_a_stage_was_recorded_is_no_change_at_its_default():
    from pipeline.config.root import changed_keys, default_config_dict

    new = {"seed": 0, "data": {"resolution": 32, "format": "webdataset", "hflip": False}}
    old = {"seed": 0, "data": {"resolution": 32, "format": "webdataset"}}  # recorded before `hflip` existed
    assert changed_keys(old, new, defaults=default_config_dict()) == []
    # Set to anything but its default, the new key is a change; and without defaults, always.
    assert changed_keys(old, {**new, "data": {**new["data"], "hflip": True}}, defaults=default_config_dict()) == [
        "data.hflip: '<absent>' -> True"]
    assert changed_keys(old, new) == ["data.hflip: '<absent>' -> False"]
    # A key the stage no longer hashes is no change either.
    recorded = {"seed": 0, "data": {"resolution": 32, "num_train": 5}}
    assert changed_keys(recorded, {"seed": 0, "data": {"resolution": 32}}) == []
