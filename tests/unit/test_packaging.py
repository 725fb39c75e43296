"""Packaging: one place for the metadata (pyproject.toml), ranges there, exact tested pins in
constraints.txt that satisfy those ranges, and `tessera --version`."""
import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # the standard library from Python 3.11

REPO = Path(__file__).resolve().parents[2]


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pins() -> dict[str, str]:
    found = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            found[canonical(name)] = version
    return found


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements() -> list[Requirement]:
    project = pyproject()["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def test_dependencies_are_ranges_and_every_one_has_a_tested_pin_inside_it():
    tested = pins()
    for req in requirements():
        operators = {spec.operator for spec in req.specifier}
        assert "==" not in operators and ">=" in operators, f"{req}: a range with a lower bound, not a pin"
        assert canonical(req.name) in tested, f"{req.name}: no tested version in constraints.txt"
        assert req.specifier.contains(tested[canonical(req.name)]), \
            f"{req.name}=={tested[canonical(req.name)]} (constraints.txt) is outside {req.specifier} (pyproject.toml)"


def test_the_console_script_and_version_come_from_pyproject():
    project = pyproject()["project"]
    assert project["scripts"] == {"tessera": "pipeline.cli.main:main"}
    assert project["dynamic"] == ["version"]
    assert pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "pipeline.__version__"}


def test_tessera_version(capsys, monkeypatch):
    import importlib.metadata

    from pipeline import __version__
    from pipeline.cli.main import build_parser, installed_version

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"tessera {installed_version()}"
    # An installed distribution reports its own version ...
    monkeypatch.setattr(importlib.metadata, "version", lambda name: {"tessera": "9.8.7"}[name])
    assert installed_version() == "9.8.7"

    # ... and a checkout run from PYTHONPATH without installing falls back to the package's.
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert installed_version() == __version__ and re.fullmatch(r"\d+\.\d+\.\d+", __version__)
