"""pipeline/runtime/progress.py: a bar in a terminal, plain periodic lines in a file (SLURM output)."""
import io
import subprocess
import sys

from testkit import REPO

from pipeline.runtime.progress import PlainProgress, progress


def test_plain_progress_writes_complete_lines_with_rate_eta_and_postfix():
    out = io.StringIO()
    bar = PlainProgress(100, desc="train_prior", unit="step", initial=10, interval_s=0.0, stream=out)
    for _ in range(5):
        bar.update(1)
        bar.set_postfix(loss="0.5000", tok_s="123")
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 6  # one per update (interval 0) and one at close
    assert lines[-1].startswith("[train_prior] step 15/100 (15.0%)")
    assert "step/s" in lines[-1] and "ETA " in lines[-1] and lines[-1].endswith("loss=0.5000 tok_s=123")


def test_plain_progress_is_quiet_between_intervals_and_when_disabled():
    out = io.StringIO()
    bar = PlainProgress(4000, desc="x", unit="step", interval_s=3600.0, stream=out)
    for _ in range(4000):
        bar.update(1)
    bar.close()
    assert len(out.getvalue().splitlines()) == 1  # only the final line, not 4000 redraws
    silent = io.StringIO()
    off = PlainProgress(10, desc="x", unit="step", interval_s=0.0, enabled=False, stream=silent)
    off.update(10)
    off.close()
    assert silent.getvalue() == ""


def test_off_a_terminal_progress_gives_plain_lines_at_the_env_interval(tmp_path):
    """stderr redirected to a file, as in a SLURM job: no bar, lines every TESSERA_PROGRESS_INTERVAL_S."""
    code = ("import time\nfrom pipeline.runtime.progress import progress\n"
            "with progress(6, desc='demo', unit='step') as bar:\n"
            "    print(type(bar).__name__)\n"
            "    for _ in range(6):\n        time.sleep(0.06)\n        bar.update(1)\n")
    log = tmp_path / "stderr.txt"
    with open(log, "w") as err:
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True,
                             env={"PYTHONPATH": str(REPO), "TESSERA_PROGRESS_INTERVAL_S": "0.1"}, check=True)
    assert out.stdout.strip() == "PlainProgress"
    lines = log.read_text().splitlines()
    assert "\r" not in log.read_text() and 2 <= len(lines) <= 5, lines
    assert lines[-1].startswith("[demo] step 6/6 (100.0%)")


def test_progress_returns_the_plain_writer_when_stderr_is_not_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress(3, desc="x", unit="img"), PlainProgress)
