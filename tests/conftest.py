"""pytest setup shared by tests/unit and tests/e2e: the repository and this folder on sys.path (so
tests import `pipeline`, `stages` and the helpers in testkit.py), and the fixtures."""
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS.parent))
sys.path.insert(0, str(TESTS))

from testkit import REPO  # noqa: E402  (needs the paths above)


@pytest.fixture
def repo_root() -> Path:
    return REPO
