"""Fixtures of the TLS tests: throw-away certificates (certs.py), made once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# --import-mode=importlib: test folders are not on sys.path; the shared helpers live here.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from certs import Certs, make_certs  # noqa: E402

from rpc.tls import TLSConfig  # noqa: E402


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def server_tls(certs) -> TLSConfig:
    """What every service of a mutual-TLS stack is given."""
    return TLSConfig.from_files(
        str(certs.server.cert), str(certs.server.key), str(certs.ca), require_client_cert=True
    )


@pytest.fixture(scope="session")
def client_tls(certs) -> TLSConfig:
    return TLSConfig.from_files(str(certs.client.cert), str(certs.client.key), str(certs.ca))
