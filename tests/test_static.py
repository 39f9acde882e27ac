"""The linter, the formatter and the type checker configured in pyproject.toml pass on the tree."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREE = ["."]  # the whole tree: packages, tests, benchmarks, the README's snippets, the notebooks


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_passes_on_the_tree(command):
    done = subprocess.run([sys.executable, "-m", "ruff", *command, *TREE], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_passes_on_the_packages():
    """``[tool.mypy]`` names the files (the three packages); its cache (.mypy_cache, git-ignored) makes reruns fast."""
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
