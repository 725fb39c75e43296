"""User-supplied files (sample archives, references, the authors' checkpoints and config.yaml,
DeepSpeed JSON) are checked by pipeline/runtime/validate.py: one line naming the file and what is
wrong, exit 2 from the CLI, in the stage's log, and a rejected file does not block the corrected rerun."""
import hashlib
import json

import numpy as np
import pytest
import torch
from testkit import tessera

from pipeline.config.root import load_config
from pipeline.generation.sample_files import iter_npz_images
from pipeline.runner.stage import StageError, run_stage
from pipeline.runtime.validate import (
    InputFileError,
    check_reference_archive,
    check_sample_archive,
    load_tensor_checkpoint,
    read_json_mapping,
    read_yaml_mapping,
)


def npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def images(n=4, size=16, dtype=np.uint8):
    return np.zeros((n, size, size, 3), dtype=dtype)


@pytest.mark.parametrize("arrays, expected", [
    ({"arr_0": images(dtype=np.float32)}, "arr_0 is float32; images must be uint8"),
    ({"arr_0": np.zeros((4, 3, 16, 16), np.uint8)}, "channels first?"),
    ({"arr_0": images(n=0)}, "holds no images"),
    ({"arr_0": np.zeros((4, 16, 8, 3), np.uint8)}, "square images"),
    ({"arr_0": images(), "arr_1": np.zeros(3, np.int64)}, "one per image"),
    ({"images": images()}, "no arr_0 images (it holds images)"),
])
def test_bad_sample_archives_are_named_with_the_problem(tmp_path, arrays, expected):
    path = npz(tmp_path / "s.npz", **arrays)
    with pytest.raises(InputFileError, match=f"^--samples {path}: .*{expected}".replace("?", r"\?").replace("(", r"\(")
                       .replace(")", r"\)")):
        check_sample_archive(path, "--samples")


def test_not_an_npz_missing_and_good_archives(tmp_path):
    text = tmp_path / "notes.npz"
    text.write_text("hello")
    with pytest.raises(InputFileError, match="not a readable .npz archive"):
        check_sample_archive(text, "--samples")
    with pytest.raises(InputFileError, match="no such file"):
        check_sample_archive(tmp_path / "nope.npz", "--samples")
    good = npz(tmp_path / "good.npz", arr_0=images(), arr_1=np.arange(4))
    assert check_sample_archive(good) == (4, 16, 16, 3)


def test_a_good_archive_streams_back_in_writable_blocks(tmp_path):
    """What the score stage reads: blocks equal to the archive, writable (torch.from_numpy warns on a
    read-only array, and a consumer that normalises in place would fail)."""
    pixels = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    blocks = list(iter_npz_images(npz(tmp_path / "s.npz", arr_0=pixels), 2))
    assert [len(block) for block in blocks] == [2, 2, 1]
    assert all(block.flags.writeable for block in blocks)
    np.testing.assert_array_equal(np.concatenate(blocks), pixels)


def test_references_are_checked_for_statistics_shapes_and_resolution(tmp_path):
    stats = npz(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048, dtype=np.float32))
    assert check_reference_archive(stats, resolution=32) == {"mu", "sigma"}
    with pytest.raises(InputFileError, match=r"mu is float64 \(10,\)"):
        check_reference_archive(npz(tmp_path / "mu.npz", mu=np.zeros(10), sigma=np.eye(2048)))
    with pytest.raises(InputFileError, match="neither mu/sigma statistics nor arr_0"):
        check_reference_archive(npz(tmp_path / "none.npz", labels=np.zeros(3)))
    big = npz(tmp_path / "ref64.npz", arr_0=images(size=64))
    with pytest.raises(InputFileError, match="images are 64 px, the samples are 32 px"):
        check_reference_archive(big, "score.reference", resolution=32)
    assert "arr_0" in check_reference_archive(big, resolution=64)


def test_configs_and_checkpoints(tmp_path):
    bad_yaml = tmp_path / "config.yaml"
    bad_yaml.write_text("arch: [unclosed\n  x: {")
    with pytest.raises(InputFileError, match=f"--stage2 {bad_yaml}: not valid YAML"):
        read_yaml_mapping(bad_yaml, "--stage2")
    bad_yaml.write_text("- just\n- a list\n")
    with pytest.raises(InputFileError, match="expected a YAML mapping"):
        read_yaml_mapping(bad_yaml, "--stage2")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x80\x02\xff\x00")
    with pytest.raises(InputFileError, match="not a text file"):
        read_yaml_mapping(binary, "--stage2")
    ds = tmp_path / "ds.json"
    ds.write_text("[1, 2]")
    with pytest.raises(InputFileError, match="expected a JSON mapping"):
        read_json_mapping(ds, "prior_train.deepspeed_config")
    ds.write_text('{"zero_optimization": ')
    with pytest.raises(InputFileError, match="not valid JSON"):
        read_json_mapping(ds, "prior_train.deepspeed_config")
    with pytest.raises(InputFileError, match="not a readable tensors-only torch checkpoint"):
        load_tensor_checkpoint(bad_yaml, "--stage1")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(InputFileError, match="holds a list"):
        load_tensor_checkpoint(tmp_path / "list.pt", "--stage1")


def fake_sampled_run(tmp_path):
    """A run whose sample stage is done (its records written by hand): what the score stage reads."""
    run = tmp_path / "run"
    (run / "sample").mkdir(parents=True)
    npz(run / "sample" / "samples.npz", arr_0=images(size=32), arr_1=np.arange(4))
    sha = hashlib.sha256((run / "sample" / "samples.npz").read_bytes()).hexdigest()
    (run / "sample" / "manifest.json").write_text(json.dumps({"chunks": []}))
    (run / "sample" / "done.json").write_text(json.dumps({"outputs": {"samples.npz": sha}, "inputs": {}}))
    return run


def test_a_bad_score_reference_is_logged_and_does_not_block_the_corrected_rerun(tmp_path):
    run = fake_sampled_run(tmp_path)
    not_npz = tmp_path / "ref.npz"
    not_npz.write_text("not an archive")
    cfg = load_config("configs/demo-rq.yaml", [f"score.reference={not_npz}", "score.download_weights=false"])
    with pytest.raises(StageError, match=f"score.reference {not_npz}: not a readable .npz archive"):
        run_stage("score", cfg, run)
    assert "not a readable .npz archive" in (run / "score" / "log.txt").read_text()
    assert not (run / "score" / "attempt.json").exists()
    # The corrected rerun (another reference) is judged on its own file, not refused as "partially run".
    other = npz(tmp_path / "ref64.npz", arr_0=images(size=64))
    cfg = load_config("configs/demo-rq.yaml", [f"score.reference={other}", "score.download_weights=false"])
    with pytest.raises(StageError, match="images are 64 px, the samples are 32 px"):
        run_stage("score", cfg, run)


def test_tessera_score_on_bad_files_is_one_line_and_exit_2(tmp_path):
    samples = npz(tmp_path / "samples.npz", arr_0=images(n=0))
    ref = npz(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    out = tessera("score", "--samples", str(samples), "--ref", str(ref), "--no-download", "--allow-uncalibrated",
                  check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == f"tessera: error: --samples {samples}: arr_0 holds no images (shape (0, 16, 16, 3))"


def test_import_with_a_stage2_config_that_is_not_yaml_is_one_line(tmp_path):
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    for folder in (stage1, stage2):
        folder.mkdir()
        torch.save({"state_dict": {}}, folder / "model.pt")
    (stage1 / "config.yaml").write_text("arch:\n  type: rq-vae\n")
    (stage2 / "config.yaml").write_text("arch: {type: rq-transformer\n  - ]")
    out = tessera("import", "rq-official", "--stage1", str(stage1), "--stage2", str(stage2), "--run-dir",
                  str(tmp_path / "run"), check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "not valid YAML" in out.stderr and "--stage" in out.stderr
