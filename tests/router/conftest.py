import sys
from pathlib import Path

import pytest

# --import-mode=importlib: test folders are not on sys.path; the shared fakes live here.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from router_fakes import write_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("tiny_model"))
