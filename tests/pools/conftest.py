"""Fixtures of the pool tests; the stack itself is in pool_helpers.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# --import-mode=importlib: test folders are not on sys.path; the shared helpers live here.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pool_helpers import PoolStack  # noqa: E402

from tandem.loader.default_model import resolve_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return resolve_model_dir(None)


@pytest.fixture(scope="module")
def pool_stack(model_dir, tmp_path_factory):
    stack = PoolStack(model_dir, tmp_path_factory.mktemp("pool_logs"))
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
