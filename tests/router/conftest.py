import sys
from pathlib import Path

import pytest

# --import-mode=importlib: test folders are not on sys.path; the shared fakes live here.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import router_fakes  # noqa: E402
from router_fakes import write_model_dir  # noqa: E402


@pytest.fixture(autouse=True, params=["session", "generate"])
def decode_streams(request, monkeypatch):
    """Every router test twice: fake decode servers with Decode.Session (the router streams
    its choices over one session per server) and without (a Generate call per choice)."""
    monkeypatch.setattr(router_fakes, "DECODE_SESSION", request.param == "session")
    return request.param


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("tiny_model"))
