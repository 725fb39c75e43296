"""`tessera run` / `tessera submit` of the ImageNet preset without its LPIPS weights stop before the
first stage: exit 2, one line naming the key and the path, nothing written to the run directory."""
import resource

import pytest
from testkit import tessera

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("command", [("run",), ("submit", "--dry-run")])
def test_imagenet_preset_without_lpips_weights_fails_at_once(tmp_path, command):
    for name in ("n01440764", "n01443537"):
        (tmp_path / "imagenet/train" / name).mkdir(parents=True)
    run_dir = tmp_path / "run"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = tessera(*command, "configs/imagenet256-rq.yaml", "--run-dir", str(run_dir),
                  f"data.root={tmp_path / 'imagenet'}", "tokenizer.lpips_weights=/weights/missing_lpips.pth",
                  check=False)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines == ["tessera: error: tokenizer.lpips_weights: /weights/missing_lpips.pth: no such file (LPIPS "
                     "weights, needed because tokenizer.lpips_weight is 1.0 > 0)"]
    assert not (run_dir / "shard").exists() and not run_dir.exists()
    # CPU seconds, not wall time: the check reads no data (the shared CI machine's load varies).
    assert (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime) < 10
