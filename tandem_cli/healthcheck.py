"""`python -m tandem_cli.healthcheck TARGET`: one health probe, for container health checks.

TARGET is a gRPC address (HOST:PORT), asked through the standard grpc.health.v1 service, or an
http(s):// URL, which must answer 200. Exit 0 when healthy, 1 otherwise (1 is what Docker reads
as "unhealthy"; it reserves 2), with the reason on stderr. Imports grpc only, never torch, so a
probe costs a fraction of a second in a worker container that is busy loading a model.
A gRPC probe takes the services' TLS flags (or their TANDEM_TLS_* environment, which a
compose health check inherits from its container): it presents the same client certificate.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request

from rpc.tls import (
    PLAINTEXT,
    TLSConfig,
    TLSConfigError,
    add_tls_args,
    channel,
    tls_from_args,
)

HEALTHY, UNHEALTHY = 0, 1


def check_grpc(
    address: str, service: str, timeout: float, tls: TLSConfig = PLAINTEXT
) -> str | None:
    """None when `address` reports SERVING for `service` ("" is the whole server), else why not."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with channel(address, tls) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            return f"{e.code().name}: {e.details()}"
    if resp.status != health_pb2.HealthCheckResponse.SERVING:
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return None


def check_http(url: str, timeout: float) -> str | None:
    """None when GET `url` answers 200, else why not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (http(s) only)
            status = resp.status
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        return str(getattr(e, "reason", e))
    return None if status == 200 else f"HTTP {status}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tandem_cli.healthcheck",
        description="exit 0 when a tandem service is healthy (grpc.health.v1 or HTTP 200), else 1",
    )
    p.add_argument("target", help="HOST:PORT (gRPC health) or http(s)://HOST:PORT/health")
    p.add_argument("--service", default="", help='gRPC service name to ask about ("": the server)')
    p.add_argument("--timeout", type=float, default=3.0, help="seconds")
    add_tls_args(p)
    args = p.parse_args(argv)
    if args.target.startswith(("http://", "https://")):
        problem = check_http(args.target, args.timeout)
    else:
        try:  # a bad file is "unhealthy" (1), not a usage error (2, which Docker reserves)
            problem = check_grpc(
                args.target, args.service, args.timeout, tls_from_args(args, server=False)
            )
        except TLSConfigError as e:
            problem = str(e)
    if problem is not None:
        print(f"unhealthy target={args.target} reason={problem}", file=sys.stderr)
        return UNHEALTHY
    return HEALTHY


if __name__ == "__main__":
    sys.exit(main())
