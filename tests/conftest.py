"""Shared fixtures: where the real data and weights live, and how to react when they are missing.

Locally a missing data set or checkpoint is a skip; under CI (``CI=true``) it is a failure,
because CI is supposed to have them and a silent skip would hide a broken set-up.
"""
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "eval" / "data"
WEIGHTS_DIR = REPO_ROOT / "weights"
MINILM_DIR = WEIGHTS_DIR / "all-MiniLM-L6-v2"
IN_CI = os.environ.get("CI", "").lower() == "true"


def require_path(path: Path, what: str) -> Path:
    """Return `path` if it exists; otherwise skip the test (or fail it under CI=true)."""
    if path.exists():
        return path
    message = f"{what} not found at {path}"
    if IN_CI:
        pytest.fail(message + " (CI=true: required data must be present)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/eval/data: STS-B, SICK, SciFact."""
    return require_path(SHARED_DATA, "shared evaluation data")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 checkpoint (fetched by `python weights/fetch_minilm.py`)."""
    return require_path(MINILM_DIR / "model.safetensors", "all-MiniLM-L6-v2 checkpoint").parent
