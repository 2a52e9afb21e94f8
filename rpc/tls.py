"""Optional TLS and mutual TLS for every internal gRPC connection (torch-free, grpc only).

One set of PEM files per process, used both ways: a server presents its certificate and,
under mTLS, verifies its clients against the CA bundle; the same process, as a client of
another service (gateway -> router, router -> workers, worker -> router registration,
prefill -> decode KV push, health checks), presents the same certificate and verifies the
peer against the same CA. No files: plaintext, as before.

    --tls-certfile              PEM certificate chain of this process   TANDEM_TLS_CERTFILE
    --tls-keyfile               PEM private key of that certificate     TANDEM_TLS_KEYFILE
    --tls-ca-certs              PEM CA bundle that signs the peers      TANDEM_TLS_CA_CERTS
    --tls-require-client-cert   servers refuse clients without a cert   TANDEM_TLS_REQUIRE_CLIENT_CERT
    --tls-server-name           name expected in peers' certificates    TANDEM_TLS_SERVER_NAME
    --internal-token-file       shared token (plaintext dev mode)       TANDEM_INTERNAL_TOKEN

With certificates from rpc/pki.py (a role in each), a client expects the role of the service
it dials in the server's certificate (`peer_role`): a prefill server's KV channel talks only
to a holder of a decode certificate, a gateway only to a router. Servers authorize callers by
role (rpc/auth.py). Without TLS, a shared token (metadata `tandem-internal-token`) is the
development-mode fallback: every channel sends it, every server with one demands it.

The files are read once, when the flags are parsed; a missing or unreadable file, or a key
without its certificate, is a startup error that names the flag.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import grpc

from rpc import token_channel

# flag (without "--tls-") -> environment variable giving its default; read here only
ENV = {
    "certfile": "TANDEM_TLS_CERTFILE",
    "keyfile": "TANDEM_TLS_KEYFILE",
    "ca_certs": "TANDEM_TLS_CA_CERTS",
    "require_client_cert": "TANDEM_TLS_REQUIRE_CLIENT_CERT",
    "server_name": "TANDEM_TLS_SERVER_NAME",
    "internal_token": "TANDEM_INTERNAL_TOKEN",
}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


class TLSConfigError(ValueError):
    """Bad TLS flags or files; the message names the flag."""


@dataclass(frozen=True)
class TLSConfig:
    # The PEM bytes stay out of repr: configs holding this one get logged, and a private key
    # must never reach a log.
    cert_chain: bytes = field(default=b"", repr=False)  # this process's certificate (+ chain)
    private_key: bytes = field(default=b"", repr=False)  # the key of cert_chain
    root_certs: bytes = field(default=b"", repr=False)  # CA bundle for peers; empty: system's
    require_client_cert: bool = False  # servers: refuse clients without a cert signed by it
    # Clients: the name checked in the server's certificate instead of the dialled host.
    # Workers register with their IP (a pod's, a container's); one shared DNS name in every
    # certificate (say tandem.internal) avoids a certificate per address.
    server_name: str = ""
    # Plaintext development mode: the shared secret every internal call carries and every
    # server demands (rpc/auth.py). Never logged.
    token: str = field(default="", repr=False)

    def __post_init__(self):
        if self.private_key and not self.cert_chain:
            raise TLSConfigError("--tls-keyfile needs --tls-certfile (the key's certificate)")
        if self.cert_chain and not self.private_key:
            raise TLSConfigError("--tls-certfile needs --tls-keyfile (the certificate's key)")
        if self.require_client_cert and not (self.root_certs and self.cert_chain):
            raise TLSConfigError(
                "--tls-require-client-cert needs --tls-ca-certs (to verify clients) and "
                "--tls-certfile/--tls-keyfile (a TLS server's own certificate)"
            )
        if self.server_name and not self.enabled:
            raise TLSConfigError("--tls-server-name needs --tls-ca-certs or --tls-certfile")

    @property
    def enabled(self) -> bool:
        return bool(self.cert_chain or self.root_certs)

    @property
    def mode(self) -> str:  # for logs
        if self.require_client_cert:
            return "mtls"
        base = "tls" if self.enabled else "plaintext"
        return f"{base}+token" if self.token else base

    @cached_property
    def roles(self) -> frozenset[str]:
        """The tandem roles in this process's own certificate (rpc/pki.py), if any."""
        from rpc.pki import roles_in_pem

        return roles_in_pem(self.cert_chain) if self.cert_chain else frozenset()

    def target_name(self, peer_role: str) -> str:
        """The name a client checks in the server's certificate: --tls-server-name if set;
        else, with tandem role certificates, the role it expects the server to have."""
        if self.server_name:
            return self.server_name
        if peer_role and self.roles:
            from rpc.pki import role_name

            return role_name(peer_role)
        return ""

    @classmethod
    def from_files(
        cls,
        certfile: str = "",
        keyfile: str = "",
        ca_certs: str = "",
        require_client_cert: bool = False,
        server_name: str = "",
        token: str = "",
    ) -> TLSConfig:
        return cls(
            cert_chain=_read_pem("--tls-certfile", certfile, "CERTIFICATE-----"),
            private_key=_read_pem("--tls-keyfile", keyfile, "PRIVATE KEY-----"),
            root_certs=_read_pem("--tls-ca-certs", ca_certs, "CERTIFICATE-----"),
            require_client_cert=require_client_cert,
            server_name=server_name,
            token=token,
        )

    def check_server(self) -> None:
        """A process that serves gRPC: TLS on means it has its own certificate."""
        if self.enabled and not self.cert_chain:
            raise TLSConfigError(
                "--tls-ca-certs without --tls-certfile/--tls-keyfile: a TLS server needs "
                "its own certificate"
            )

    def server_credentials(self) -> grpc.ServerCredentials:
        self.check_server()
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.root_certs or None,
            require_client_auth=self.require_client_cert,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.root_certs or None,
            private_key=self.private_key or None,
            certificate_chain=self.cert_chain or None,
        )

    def channel_options(self, options=(), peer_role: str = "") -> list[tuple[str, object]]:
        options = list(options)
        name = self.target_name(peer_role) if self.enabled else ""
        if name:
            options.append(("grpc.ssl_target_name_override", name))
        return options


PLAINTEXT = TLSConfig()


def _token(path: str) -> str:
    """The development-mode token: --internal-token-file, else TANDEM_INTERNAL_TOKEN."""
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as e:
            raise TLSConfigError(f"--internal-token-file {path}: cannot read ({e})") from None
        if not token:
            raise TLSConfigError(f"--internal-token-file {path}: empty")
        return token
    return os.environ.get(ENV["internal_token"], "").strip()


def _read_pem(flag: str, path: str, marker: str) -> bytes:
    if not path:
        return b""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise TLSConfigError(f"{flag} {path}: cannot read ({e.strerror or e})") from None
    if marker.encode() not in data:
        raise TLSConfigError(f"{flag} {path}: no PEM '-----BEGIN ...{marker}' block")
    return data


def add_port(server, address: str, tls: TLSConfig) -> int:
    """Bind `address` on a grpc or grpc.aio server, with TLS when configured; the port."""
    try:
        if tls.enabled:
            port = server.add_secure_port(address, tls.server_credentials())
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:  # grpc's "Failed to bind" (port taken, address not local)
        port = 0
    if port == 0:
        raise OSError(f"cannot bind {address}: the port is taken or the address is not local")
    return port


def channel(address: str, tls: TLSConfig, options=(), peer_role: str = "") -> grpc.Channel:
    """A channel to `address`; `peer_role`: the role the server must hold (see target_name)."""
    if tls.enabled:
        ch = grpc.secure_channel(
            address, tls.channel_credentials(), tls.channel_options(options, peer_role)
        )
    else:
        ch = grpc.insecure_channel(address, options=list(options))
    if tls.token and not tls.require_client_cert:
        ch = grpc.intercept_channel(ch, token_channel.SyncToken(tls.token))
    return ch


def aio_channel(address: str, tls: TLSConfig, options=(), peer_role: str = "") -> grpc.aio.Channel:
    interceptors = None
    if tls.token and not tls.require_client_cert:
        interceptors = token_channel.aio_interceptors(tls.token)
    if tls.enabled:
        return grpc.aio.secure_channel(
            address,
            tls.channel_credentials(),
            tls.channel_options(options, peer_role),
            interceptors=interceptors,
        )
    return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)


# -- flags --------------------------------------------------------------------------------


def _env_flag(name: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value not in _TRUE + _FALSE:
        raise SystemExit(f"{name}={value!r}: expected one of {', '.join(_TRUE + _FALSE[1:])}")
    return value in _TRUE


def add_tls_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "internal gRPC TLS",
        "a service's role certificate (`tandem certs`), used both ways: a client of another "
        "service presents it and verifies the peer with the same CA bundle. No files: "
        "plaintext (`tandem serve` makes its own CA instead, unless --internal-plaintext)",
    )
    env = os.environ
    g.add_argument(
        "--tls-certfile",
        default=env.get(ENV["certfile"], ""),
        help=f"PEM certificate chain of this process (env {ENV['certfile']})",
    )
    g.add_argument(
        "--tls-keyfile",
        default=env.get(ENV["keyfile"], ""),
        help=f"PEM private key of --tls-certfile (env {ENV['keyfile']})",
    )
    g.add_argument(
        "--tls-ca-certs",
        default=env.get(ENV["ca_certs"], ""),
        help="PEM CA bundle that verifies peers' certificates (default: the system's roots; "
        f"env {ENV['ca_certs']})",
    )
    g.add_argument(
        "--tls-require-client-cert",
        action="store_true",
        default=_env_flag(ENV["require_client_cert"]),
        help="mutual TLS: servers refuse clients without a certificate signed by "
        f"--tls-ca-certs (env {ENV['require_client_cert']}=1)",
    )
    g.add_argument(
        "--tls-server-name",
        default=env.get(ENV["server_name"], ""),
        help="name expected in servers' certificates instead of the dialled host "
        f"(env {ENV['server_name']})",
    )
    g.add_argument(
        "--internal-token-file",
        default="",
        help="plaintext development mode: a file holding the shared secret every internal "
        "call carries and every server demands (or env "
        f"{ENV['internal_token']}; ignored under --tls-require-client-cert)",
    )


def tls_from_args(
    args: argparse.Namespace, parser: argparse.ArgumentParser | None = None, server: bool = True
) -> TLSConfig:
    """Read the files once; a bad flag exits through `parser.error` (else raises)."""
    try:
        tls = TLSConfig.from_files(
            args.tls_certfile,
            args.tls_keyfile,
            args.tls_ca_certs,
            args.tls_require_client_cert,
            args.tls_server_name,
            _token(getattr(args, "internal_token_file", "")),
        )
        if server:
            tls.check_server()
            if tls.require_client_cert and not tls.roles:
                # every caller would be refused (rpc/auth.py authorizes by role)
                raise TLSConfigError(
                    "--tls-require-client-cert: --tls-certfile carries no tandem role (a DNS "
                    "name <role>.tandem.internal); write role certificates with `tandem certs`"
                )
    except TLSConfigError as e:
        if parser is None:
            raise
        parser.error(str(e))
    return tls


def tls_argv(args: argparse.Namespace) -> list[str]:
    """The flags again, for the processes `tandem serve` starts."""
    argv = []
    for name in ("certfile", "keyfile", "ca_certs", "server_name"):
        value = getattr(args, f"tls_{name}")
        if value:
            argv += [f"--tls-{name.replace('_', '-')}", value]
    if args.tls_require_client_cert:
        argv.append("--tls-require-client-cert")
    if getattr(args, "internal_token_file", ""):
        argv += ["--internal-token-file", args.internal_token_file]
    return argv
