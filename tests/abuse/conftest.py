"""The abuse tests share one SmolLM2 prefill server and decode server and a router (package
scope); tests start more routers and gateways with the flags they need. Every process is
stopped at the end, whatever happened."""

import sys
from pathlib import Path

import pytest

# --import-mode=importlib: the helpers module is not on sys.path otherwise.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from abuse_cluster import Cluster  # noqa: E402


@pytest.fixture(scope="package")
def cluster():
    c = Cluster()
    try:
        c.start_workers()
        c.main_router, _ = c.router()
        yield c
    finally:
        c.stop()
