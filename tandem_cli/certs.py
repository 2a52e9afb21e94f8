"""`tandem certs`: write the internal plane's CA certificate and one certificate per role.

    tandem certs --out ./certs --host router --host prefill --host decode

writes ca.pem, and <role>.pem + <role>-key.pem for gateway, router, prefill, decode and client
(rpc/pki.py). Each service then runs with its role's files:

    --tls-certfile certs/decode.pem --tls-keyfile certs/decode-key.pem
    --tls-ca-certs certs/ca.pem --tls-require-client-cert

The CA's private key is not kept: to add a host or renew, write a new set and roll it out.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rpc.pki import DEFAULT_HOSTS, ROLES, write_certs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="tandem certs", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="directory to write the PEM files to")
    p.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name or IP the services are dialled by, besides localhost and 127.0.0.1 "
        "(repeat; e.g. the compose service names)",
    )
    p.add_argument("--days", type=int, default=365, help="validity of every certificate")
    p.add_argument(
        "--role", action="append", choices=ROLES, default=None, help="only these roles (repeat)"
    )
    args = p.parse_args(argv)
    if args.days < 1:
        p.error("--days must be >= 1")
    hosts = tuple(dict.fromkeys([*DEFAULT_HOSTS, *args.host]))
    paths = write_certs(args.out, hosts, tuple(args.role or ROLES), args.days)
    roles = ", ".join(k for k in paths if k != "ca" and not k.endswith("-key"))
    print(f"wrote {args.out}/ca.pem and certificates for {roles} (hosts: {', '.join(hosts)})")


if __name__ == "__main__":
    main()
