"""Run-directory safety end to end: two jobs on one run directory, inputs checked before the
expensive part, OS errors as one clear line, config checked before the first stage, file modes."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from testkit import REPO, TINY_TOKENIZER, tessera

from pipeline.runtime.errors import CorruptFileError
from pipeline.runtime.io import read_json

pytestmark = pytest.mark.e2e
TRAIN = [*TINY_TOKENIZER, "tokenizer_train.steps=40", "tokenizer_train.checkpoint_every=10"]


def run_tokenizer(run_dir, *extra, **kw):
    return tessera("run", "configs/demo-rq.yaml", "--run-dir", str(run_dir), "--stages", "shard,train_tokenizer",
                   *TRAIN, *extra, **kw)


def wait_for(predicate, proc, what, timeout=300):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the first run ended before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def one_error_line(out) -> str:
    lines = [line for line in out.stderr.splitlines() if line.startswith("tessera: error:")]
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    return lines[0]


def test_a_second_run_on_the_same_stage_is_refused_and_the_first_finishes(tmp_path):
    run_tokenizer(tmp_path, "--stages", "shard")
    first = run_tokenizer(tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (tmp_path / "train_tokenizer/lock.json").exists(), first, "the lock was taken")
    second = run_tokenizer(tmp_path, check=False)
    line = one_error_line(second)
    assert f"in use by pid {first.pid}" in line and "lock.json" in line
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert (tmp_path / "train_tokenizer/done.json").exists() and not (tmp_path / "train_tokenizer/lock.json").exists()
    log = (tmp_path / "train_tokenizer/log.txt").read_text()
    assert f"pid {first.pid} rank 0/1]" in log  # lines name their process


def test_lock_of_a_killed_run_is_taken_over(tmp_path):
    run_tokenizer(tmp_path, "--stages", "shard")
    first = run_tokenizer(tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: (tmp_path / "train_tokenizer/lock.json").exists(), first, "the lock was taken")
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert read_json(tmp_path / "train_tokenizer/lock.json")["pid"] == first.pid  # left behind
    out = run_tokenizer(tmp_path)
    assert "train_tokenizer: done" in out.stdout
    assert "taking over the lock" in (tmp_path / "train_tokenizer/log.txt").read_text()


def test_a_deleted_val_shard_fails_before_the_first_step(tmp_path):
    run_tokenizer(tmp_path, "--stages", "shard")
    (tmp_path / "shard/val/val-000000.tar").unlink()
    out = run_tokenizer(tmp_path, "--stages", "train_tokenizer", check=False)
    assert "val/val-000000.tar" in one_error_line(out) and "missing" in out.stderr
    assert not (tmp_path / "train_tokenizer/checkpoints").exists()
    assert "train_tokenizer: starting" not in (tmp_path / "train_tokenizer/log.txt").read_text()


def test_a_modified_shard_is_found_and_rewritten_when_the_finished_stage_is_rerun(tmp_path):
    run_tokenizer(tmp_path, "--stages", "shard")
    shard = tmp_path / "shard/train/train-000000.tar"
    original = shard.read_bytes()
    data = bytearray(original)
    data[1000] ^= 0xFF
    shard.write_bytes(bytes(data))
    verify = tessera("verify", str(tmp_path), check=False)
    assert verify.returncode == 1 and "FAILED" in verify.stdout and "train/train-000000.tar" in verify.stdout
    out = run_tokenizer(tmp_path, "--stages", "shard")
    assert "shard: done" in out.stdout and shard.read_bytes() == original
    log = (tmp_path / "shard/log.txt").read_text()
    assert "train/train-000000.tar" in log and "rebuilding it in place" in log


def test_a_truncated_manifest_is_one_clear_line_and_rebuilt_by_a_rerun(tmp_path):
    run_tokenizer(tmp_path, "--stages", "shard")
    manifest = tmp_path / "shard/manifest.json"
    original = manifest.read_bytes()
    manifest.write_bytes(original[:100])
    with pytest.raises(CorruptFileError, match="manifest.json is not valid JSON"):
        read_json(manifest)
    verify = tessera("verify", str(tmp_path), check=False)
    assert verify.returncode == 1 and "manifest.json" in verify.stdout
    out = run_tokenizer(tmp_path, "--stages", "shard")
    assert "shard: done" in out.stdout and manifest.read_bytes() == original


def test_a_config_a_later_stage_rejects_fails_before_any_stage_runs(tmp_path):
    out = run_tokenizer(tmp_path, "data.resolution=33", check=False)
    assert "resolution 33" in one_error_line(out)
    assert not (tmp_path / "shard").exists()


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "mnt"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_while_sharding_is_one_clear_line(small_tmpfs):
    out = tessera("stage", "shard", "configs/demo-rq.yaml", "--run-dir", str(small_tmpfs / "run"),
                  "data.num_train=4000", "data.resolution=32", check=False)
    line = one_error_line(out)
    assert "no space left" in line and str(small_tmpfs) in line and "ENOSPC" in line


def test_a_read_only_run_directory_is_one_clear_line(small_tmpfs):
    run_dir = small_tmpfs / "run"
    tessera("stage", "shard", "configs/demo-rq.yaml", "--run-dir", str(run_dir), *TINY_TOKENIZER)
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    out = run_tokenizer(run_dir, check=False)
    assert "read-only" in one_error_line(out)
    assert "shard" in tessera("status", str(run_dir)).stdout  # reading still works


def test_written_files_honour_the_umask(tmp_path):
    script = ("import os, sys; os.umask(0o002); sys.path.insert(0, sys.argv[1]); from pipeline.runtime.io import "
              "atomic_write_json; atomic_write_json(sys.argv[2], {'a': 1})")
    subprocess.run([sys.executable, "-c", script, str(REPO), str(tmp_path / "x.json")], check=True)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o664
    old = os.umask(0o022)
    try:
        tessera("stage", "shard", "configs/demo-rq.yaml", "--run-dir", str(tmp_path / "run"), *TINY_TOKENIZER)
    finally:
        os.umask(old)
    for path in [tmp_path / "run/shard/manifest.json", *Path(tmp_path / "run/shard/train").iterdir()]:
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_a_one_class_image_folder_is_warned_about(tmp_path):
    from PIL import Image

    from pipeline.config.root import load_config
    from pipeline.runner.stage import run_stage

    for i in range(6):
        folder = tmp_path / "tree/only_class"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(folder / f"{i}.png")
    cfg = load_config(None, ["data.source=imagefolder", f"data.root={tmp_path / 'tree'}", "data.resolution=16",
                             "data.val_fraction=0.2"])
    run_stage("shard", cfg, tmp_path / "run")
    log = (tmp_path / "run/shard/log.txt").read_text()
    assert "single class folder (only_class)" in log
