"""compose.yaml keeps the internal plane internal: only the gateway publishes a port, the
router and workers sit on an `internal` network, and every service runs mutual TLS with its
own role's certificate from the volume the one-shot `certs` service fills. Checked on
compose.yaml alone and merged with a `tandem compose` override; the `certs` command itself is
run (its entrypoint script too) and what it writes is what the services are pointed at."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import pytest
from deploy_helpers import ROOT, active_services, interpolate, load_yaml, merge_compose

from rpc.pki import roles_in_pem
from tandem_cli.compose import main as compose_main

BASE = ROOT / "compose.yaml"
SERVICE_ROLES = ("gateway", "router", "prefill", "decode")  # command[0] of each server
CERTS_MOUNT = "/certs"


def _base() -> dict:
    return interpolate(load_yaml(BASE))


def _with_override(tmp_path) -> dict:
    base = tmp_path / "compose.yaml"
    base.write_text(BASE.read_text())
    compose_main(["--prefill", "2", "--decode", "2", "--gpus", "0-3", "--base", str(base)])
    override = interpolate(load_yaml(tmp_path / "compose.override.yaml"))
    return merge_compose(_base(), override)


@pytest.fixture(params=["compose.yaml", "with override"])
def services(request, tmp_path) -> dict[str, dict]:
    model = _base() if request.param == "compose.yaml" else _with_override(tmp_path)
    return active_services(model)


def _servers(services: dict[str, dict]) -> dict[str, dict]:
    return {n: s for n, s in services.items() if n != "certs"}


def _certs_volume(svc: dict) -> tuple[str, str]:
    """(source, options) of the service's mount at /certs."""
    (mount,) = [v.split(":") for v in svc["volumes"] if v.split(":")[1] == CERTS_MOUNT]
    return mount[0], mount[2] if len(mount) > 2 else ""


def test_only_the_gateway_publishes_a_port(services):
    published = sorted(n for n, s in services.items() if s.get("ports"))
    assert published == ["gateway"]
    doc = _base()
    assert doc["networks"]["backend"]["internal"] is True
    assert not doc["networks"]["frontend"].get("internal")
    for name, svc in _servers(services).items():
        if name == "gateway":  # the bridge between the published port and the plane
            assert sorted(svc["networks"]) == ["backend", "frontend"]
            continue
        assert svc["networks"] == ["backend"], name
        port = next(a for a in svc["command"] if a.startswith("--port=")).split("=")[1]
        assert port in svc["expose"], f"{name}: its gRPC port is not declared with expose"
    # the certs service talks to no one
    assert services["certs"]["network_mode"] == "none"
    assert "networks" not in services["certs"]


def test_every_server_runs_mutual_tls_with_its_own_role_certificate(services):
    source, options = _certs_volume(services["certs"])
    assert options == "", "certs writes into the volume"
    servers = _servers(services)
    assert {s["command"][0] for s in servers.values()} == set(SERVICE_ROLES)
    for name, svc in servers.items():
        role = svc["command"][0]
        env = svc["environment"]
        assert env["TANDEM_TLS_CERTFILE"] == f"{CERTS_MOUNT}/{role}.pem", name
        assert env["TANDEM_TLS_KEYFILE"] == f"{CERTS_MOUNT}/{role}-key.pem", name
        assert env["TANDEM_TLS_CA_CERTS"] == f"{CERTS_MOUNT}/ca.pem", name
        assert env["TANDEM_TLS_REQUIRE_CLIENT_CERT"] == "1", name
        # a fixed server name would replace the check of the peer's role
        assert not env.get("TANDEM_TLS_SERVER_NAME"), name
        # the same volume, read-only, and only once it is written
        assert _certs_volume(svc) == (source, "ro"), name
        assert svc["depends_on"]["certs"]["condition"] == "service_completed_successfully"
        # the health check runs in the container, so it reads the same TANDEM_TLS_* env
        assert svc["healthcheck"]["test"][:4] == ["CMD", "python", "-m", "tandem_cli.healthcheck"]


def test_certs_dir_setting_swaps_the_volume_for_your_own_pki():
    services = interpolate(load_yaml(BASE), {"TANDEM_CERTS_DIR": "./pki"})["services"]
    for name, svc in services.items():
        assert _certs_volume(svc)[0] == "./pki", name


def _run_certs_service(out) -> subprocess.CompletedProcess:
    """The certs service as its container runs it: the entrypoint script with the command
    as its arguments, /certs being `out`, `tandem` the one of this environment."""
    certs = _base()["services"]["certs"]
    entrypoint = [a.replace(CERTS_MOUNT, str(out)) for a in certs["entrypoint"]]
    command = [a.replace(CERTS_MOUNT, str(out)) for a in certs["command"]]
    bin_dir = os.path.dirname(sys.executable)
    assert shutil.which("tandem", path=bin_dir), "the tandem script is not installed here"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(
        [*entrypoint, *command], env=env, capture_output=True, text=True, timeout=120
    )


def test_certs_service_writes_every_file_the_servers_read(tmp_path):
    out = tmp_path / "certs"
    out.mkdir()
    proc = _run_certs_service(out)
    assert proc.returncode == 0, proc.stderr
    for name, svc in _servers(active_services(_base())).items():
        role = svc["command"][0]
        env = {k: v.replace(CERTS_MOUNT, str(out)) for k, v in svc["environment"].items()}
        cert = open(env["TANDEM_TLS_CERTFILE"], "rb").read()
        assert roles_in_pem(cert) == {role}, name  # the certificate carries its role only
        key_mode = stat.S_IMODE(os.stat(env["TANDEM_TLS_KEYFILE"]).st_mode)
        assert key_mode == 0o600, f"{name}: key mode {key_mode:o}"
        assert b"BEGIN CERTIFICATE" in open(env["TANDEM_TLS_CA_CERTS"], "rb").read()
    assert not list(out.glob("ca-key*")), "the CA's private key must not be written"


def test_certs_service_keeps_the_ca_of_an_earlier_run(tmp_path):
    """A later `docker compose up` runs the one-shot service again: it must not replace the
    CA that the running services trust (a new server would then be refused by them)."""
    out = tmp_path / "certs"
    out.mkdir()
    assert _run_certs_service(out).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"ca.pem", "router.pem", "router-key.pem"} <= set(before)
    again = _run_certs_service(out)
    assert again.returncode == 0, again.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
