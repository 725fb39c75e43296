"""README.md's examples run as written: the command-line synopsis matches each command's --help,
the first-stage example prints what its comments say, and the config-mistake example prints its
error line. A README edit that drifts from the CLI fails here."""
import re
import shlex

import pytest
from testkit import REPO, tessera

pytestmark = pytest.mark.e2e

README = (REPO / "README.md").read_text()


def code_block_after(marker: str) -> str:
    """The first fenced block after the line holding `marker`."""
    start = README.index(marker)
    match = re.search(r"```[a-z]*\n(.*?)```", README[start:], re.S)
    assert match, f"no code block after {marker!r}"
    return match.group(1)


def synopsis() -> list[str]:
    """The `tessera ...` lines of the command-line block, without their comments."""
    lines = code_block_after("## The command line").splitlines()
    return [line.split("  #")[0].strip() for line in lines if line.startswith("tessera")]


def test_every_synopsis_line_names_a_command_and_options_that_exist():
    lines = synopsis()
    assert len(lines) >= 10
    for line in lines:
        words = shlex.split(line)
        if words[1].startswith("--"):  # tessera --version
            assert tessera(*words[1:]).returncode == 0
            continue
        command = words[1:3] if words[1] == "import" else words[1:2]
        help_text = tessera(*command, "--help").stdout
        for option in re.findall(r"--[a-z][a-z0-9-]*", line):
            assert option in help_text, f"README: `{line}` shows {option}, which `tessera {' '.join(command)}` lacks"


def test_the_first_stage_example_runs_as_its_comments_say(tmp_path):
    lines = [line for line in code_block_after("Example, first stage only").splitlines() if line.strip()]
    run_dir = str(tmp_path / "r")
    outputs = []
    for line in lines:
        command, _, comment = line.partition("#")
        words = [run_dir if w == "/tmp/r" else w for w in shlex.split(command)]
        assert words[0] == "tessera"
        outputs.append((tessera(*words[1:]).stdout, comment.strip().strip('"')))
    for stdout, expected in outputs:
        assert expected in stdout, f"README promises {expected!r}; got:\n{stdout[-2000:]}"
    assert "shard: skipped" in outputs[1][0] and re.search(r"^shard\s+done", outputs[2][0], re.M)


def test_the_config_mistake_example_prints_its_error_line():
    block = code_block_after("never a traceback").splitlines()
    command = block[0].removeprefix("$ ")
    shown = block[1].split("...")[0]
    out = tessera(*shlex.split(command)[1:], check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert shown in out.stderr, f"README shows {shown!r}; the CLI printed {out.stderr!r}"
