"""TLS flags and files: startup errors that name the flag, environment defaults, the flags
`tandem serve` hands on, and the health probe and server-name override against an
in-process TLS server on 127.0.0.1."""

from __future__ import annotations

import argparse
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rpc.tls import (
    ENV,
    PLAINTEXT,
    TLSConfig,
    TLSConfigError,
    add_port,
    add_tls_args,
    channel,
    tls_argv,
    tls_from_args,
)
from tandem_cli.healthcheck import main as healthcheck

SERVING = health_pb2.HealthCheckResponse.SERVING


def test_key_without_cert_is_refused(certs):
    with pytest.raises(TLSConfigError, match="--tls-keyfile needs --tls-certfile"):
        TLSConfig.from_files(keyfile=str(certs.server.key))


def test_cert_without_key_is_refused(certs):
    with pytest.raises(TLSConfigError, match="--tls-certfile needs --tls-keyfile"):
        TLSConfig.from_files(certfile=str(certs.server.cert))


def test_missing_file_names_flag_and_path(tmp_path, certs):
    missing = tmp_path / "nope.pem"
    with pytest.raises(TLSConfigError, match=rf"--tls-ca-certs {missing}: cannot read"):
        TLSConfig.from_files(str(certs.server.cert), str(certs.server.key), str(missing))


def test_unreadable_file_names_flag(tmp_path, certs):
    with pytest.raises(TLSConfigError, match=r"--tls-certfile .*: cannot read \(Is a directory"):
        TLSConfig.from_files(str(tmp_path), str(certs.server.key))


def test_wrong_kind_of_file_names_flag(certs):
    # the certificate given as the key: caught at start, not at the first handshake
    with pytest.raises(TLSConfigError, match=r"--tls-keyfile .*server.crt: no PEM .*PRIVATE KEY"):
        TLSConfig.from_files(str(certs.server.cert), str(certs.server.cert))


def test_require_client_cert_needs_a_ca_and_a_certificate(certs):
    with pytest.raises(TLSConfigError, match="--tls-require-client-cert needs --tls-ca-certs"):
        TLSConfig.from_files(str(certs.server.cert), str(certs.server.key), "", True)
    with pytest.raises(TLSConfigError, match="--tls-require-client-cert needs"):
        TLSConfig.from_files(ca_certs=str(certs.ca), require_client_cert=True)


def test_server_name_without_tls_is_refused():
    with pytest.raises(TLSConfigError, match="--tls-server-name needs"):
        TLSConfig(server_name="tandem.internal")


def test_a_ca_alone_is_a_client_config_not_a_server_one(certs):
    tls = TLSConfig.from_files(ca_certs=str(certs.ca))
    assert tls.enabled and tls.mode == "tls"
    tls.channel_credentials()  # a client verifying servers: fine
    with pytest.raises(TLSConfigError, match="a TLS server needs its own certificate"):
        tls.check_server()


def test_key_material_stays_out_of_repr(server_tls):
    from router.config import RouterConfig

    text = repr(RouterConfig(model="m", tls=server_tls))
    assert "PRIVATE KEY" not in text and "CERTIFICATE" not in text
    assert "require_client_cert=True" in text


def test_plaintext_by_default():
    p = argparse.ArgumentParser()
    add_tls_args(p)
    args = p.parse_args([])
    assert tls_from_args(args) == PLAINTEXT and not PLAINTEXT.enabled
    assert tls_argv(args) == []


@pytest.mark.parametrize("command", ["router", "gateway", "prefill", "decode", "serve"])
def test_every_service_exits_at_start_naming_the_flag(command, certs, capsys):
    from tandem_cli.main import main

    extra = ["--model", "/nonexistent"] if command == "router" else []
    with pytest.raises(SystemExit) as e:
        main([command, *extra, "--tls-keyfile", str(certs.server.key)])
    assert e.value.code == 2
    assert "--tls-keyfile needs --tls-certfile" in capsys.readouterr().err


def test_environment_gives_the_defaults(monkeypatch, certs):
    from router.server import add_cli_args

    monkeypatch.setenv(ENV["certfile"], str(certs.server.cert))
    monkeypatch.setenv(ENV["keyfile"], str(certs.server.key))
    monkeypatch.setenv(ENV["ca_certs"], str(certs.ca))
    monkeypatch.setenv(ENV["require_client_cert"], "true")
    monkeypatch.setenv(ENV["server_name"], "localhost")
    args = add_cli_args(argparse.ArgumentParser()).parse_args(["--model", "m"])
    assert tls_from_args(args) == TLSConfig(
        certs.server.cert.read_bytes(),
        certs.server.key.read_bytes(),
        certs.ca.read_bytes(),
        require_client_cert=True,
        server_name="localhost",
    )


def test_environment_flag_must_be_a_boolean(monkeypatch):
    monkeypatch.setenv(ENV["require_client_cert"], "maybe")
    with pytest.raises(SystemExit, match="TANDEM_TLS_REQUIRE_CLIENT_CERT='maybe'"):
        add_tls_args(argparse.ArgumentParser())


def test_serve_hands_the_same_files_to_every_service(certs):
    from decode_service.server import add_cli_args as decode_args
    from gateway.server import add_cli_args as gateway_args
    from prefill_service.server import add_cli_args as prefill_args
    from router.server import add_cli_args as router_args
    from tandem_cli.serve import add_serve_args

    serve = argparse.ArgumentParser()
    add_serve_args(serve)
    flags = ["--tls-certfile", str(certs.server.cert), "--tls-keyfile", str(certs.server.key)]
    flags += ["--tls-ca-certs", str(certs.ca), "--tls-require-client-cert"]
    flags += ["--tls-server-name", "localhost"]
    args = serve.parse_args(flags)
    want = tls_from_args(args)
    assert want.require_client_cert and want.server_name == "localhost"
    for add, required in (
        (router_args, ["--model", "m"]),
        (gateway_args, []),
        (prefill_args, []),
        (decode_args, []),
    ):
        p = argparse.ArgumentParser()
        add(p)
        assert tls_from_args(p.parse_args([*required, *tls_argv(args)])) == want


@pytest.fixture
def tls_health(server_tls):
    """An in-process grpc server under mutual TLS with the standard health servicer."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = add_port(server, "127.0.0.1:0", server_tls)
    server.start()
    servicer.set("", SERVING)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def _flags(certs) -> list[str]:
    return [
        "--tls-certfile", str(certs.client.cert), "--tls-keyfile", str(certs.client.key),
        "--tls-ca-certs", str(certs.ca),
    ]  # fmt: skip


def test_healthcheck_speaks_tls(tls_health, certs, monkeypatch, capsys):
    assert healthcheck([tls_health, *_flags(certs)]) == 0
    assert healthcheck([tls_health]) == 1  # plaintext against a TLS server
    assert "reason=UNAVAILABLE" in capsys.readouterr().err
    # a compose health check inherits the container's TANDEM_TLS_* environment
    monkeypatch.setenv(ENV["certfile"], str(certs.client.cert))
    monkeypatch.setenv(ENV["keyfile"], str(certs.client.key))
    monkeypatch.setenv(ENV["ca_certs"], str(certs.ca))
    assert healthcheck([tls_health]) == 0


def test_healthcheck_bad_file_is_unhealthy_not_a_usage_error(tls_health, tmp_path, capsys):
    assert healthcheck([tls_health, "--tls-ca-certs", str(tmp_path / "none.pem")]) == 1
    assert "--tls-ca-certs" in capsys.readouterr().err


def _check(address: str, tls: TLSConfig):
    with channel(address, tls) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)


def test_server_name_override(tls_health, certs):
    def client(name: str) -> TLSConfig:
        return TLSConfig.from_files(
            str(certs.client.cert), str(certs.client.key), str(certs.ca), server_name=name
        )

    # dialled by IP, verified as the DNS name in the certificate
    assert _check(tls_health, client("localhost")).status == SERVING
    with pytest.raises(grpc.RpcError) as e:
        _check(tls_health, client("tandem.elsewhere"))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
