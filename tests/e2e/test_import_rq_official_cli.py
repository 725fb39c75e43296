"""`tessera import rq-official` end to end: the authors' stage-1 (and stage-2) checkpoints become
finished stages of a run directory, shown by `tessera status`, kept by later runs, and used by
precompute_codes."""
import json
import re

import pytest
import torch
import yaml
from authors_reference import (
    images,
    ref_codes,
    ref_encode_latent,
    their_config,
    their_state_dict,
    write_checkpoint,
    write_their_prior_checkpoint,
)
from testkit import tessera

from pipeline.runner.artifacts import load_tokenizer


@pytest.mark.e2e
def test_cli_import_status_and_precompute(tmp_path):
    config = their_config()
    state = their_state_dict(config)
    folder = write_checkpoint(tmp_path / "stage1", config, state)
    run = tmp_path / "run"
    data = ["data.num_train=24", "data.num_val=8", "data.shard_max_count=16"]
    out = tessera("import", "rq-official", "--stage1", str(folder), "--run-dir", str(run), *data)
    assert "train_tokenizer: done" in out.stdout
    done = json.loads((run / "train_tokenizer" / "done.json").read_text())
    assert done["counts"]["imported_tensors"] == len(state)
    assert all(k.startswith("import:rq-official/stage1/") for k in done["inputs"])
    status = tessera("status", str(run)).stdout
    assert re.search(r"^train_tokenizer\s+done\s", status, re.M), status
    assert tessera("verify", str(run)).returncode == 0
    # The exported tokenizer is the authors' model.
    model = load_tokenizer(run / "train_tokenizer")
    x = images(2, 16)
    sd32 = {k: v.float().double() for k, v in state.items()}
    codes_ref = ref_codes(sd32, config, ref_encode_latent(sd32, config, x))
    assert torch.equal(model.encode(x.float()), codes_ref)
    # Importing again is a no-op; a later `tessera run` on the run's own config keeps the imported
    # tokenizer (train_tokenizer skipped) and precompute_codes encodes the shards with it.
    again = tessera("import", "rq-official", "--stage1", str(folder), "--run-dir", str(run), *data)
    assert "train_tokenizer: skipped" in again.stdout
    out = tessera("run", str(run / "config.yaml"), "--run-dir", str(run), "--stages",
                  "shard,train_tokenizer,precompute_codes")
    assert "train_tokenizer: skipped" in out.stdout and "precompute_codes: done" in out.stdout
    # Another checkpoint into the same run dir is refused without --force.
    state2 = {k: v + 0.01 for k, v in state.items()}
    folder2 = write_checkpoint(tmp_path / "other", config, state2)
    refused = tessera("import", "rq-official", "--stage1", str(folder2), "--run-dir", str(run), *data, check=False)
    assert refused.returncode == 2 and "--force" in refused.stderr


@pytest.mark.e2e
def test_cli_imports_stage1_and_stage2_as_finished_stages(tmp_path):
    """--stage2: their RQ-Transformer over the imported codebook becomes a finished train_prior,
    with the logits of the direct import (checked against their formula in test_rq_transformer)."""
    from pipeline.importers.rq_official_prior import load_rq_official_prior
    from pipeline.runner.artifacts import load_prior

    config = their_config()
    state = their_state_dict(config)
    stage1 = write_checkpoint(tmp_path / "stage1", config, state)
    write_their_prior_checkpoint(tmp_path / "stage2", K=24, C=16, hwd=(4, 4, 3), classes=5)
    run = tmp_path / "run"
    data = ["data.num_train=24", "data.num_val=8", "data.shard_max_count=16"]
    out = tessera("import", "rq-official", "--stage1", str(stage1), "--stage2", str(tmp_path / "stage2"),
                  "--run-dir", str(run), *data)
    assert "train_tokenizer: done" in out.stdout and "train_prior: done" in out.stdout
    record = json.loads((run / "train_prior" / "import.json").read_text())
    assert record["state_dict"] == "state_dict_ema"  # what their sampling script loads
    prior = load_prior(run / "train_prior")
    book = load_tokenizer(run / "train_tokenizer").quantizer.embed
    direct, cfg, _ = load_rq_official_prior(tmp_path / "stage2", book)
    codes = torch.randint(0, 24, (3, 4, 4, 3), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 4, 2])
    with torch.no_grad():
        assert torch.equal(prior(codes, labels), direct(codes, labels))
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["num_classes"] == 5
    # The run's own config now skips both imported stages.
    again = tessera("run", str(run / "config.yaml"), "--run-dir", str(run), "--stages", "train_tokenizer,train_prior")
    assert "train_tokenizer: skipped" in again.stdout and "train_prior: skipped" in again.stdout
    # A stage-2 model of other codes than the stage-1 tokenizer makes is refused before anything is written.
    write_their_prior_checkpoint(tmp_path / "other", K=24, C=16, hwd=(2, 2, 3), classes=5)
    refused = tessera("import", "rq-official", "--stage1", str(stage1), "--stage2", str(tmp_path / "other"),
                      "--run-dir", str(tmp_path / "run2"), *data, check=False)
    assert refused.returncode == 2 and "pass the stage-1 folder it was trained on" in refused.stderr
    assert not (tmp_path / "run2").exists()
