"""Certificates for the internal gRPC plane: one CA, one certificate per role.

A certificate's role is a DNS subject alternative name `<role>.tandem.internal`:

    gateway   calls the router's public API
    router    calls the workers (Decode.*, Prefill.*)
    prefill   registers with the router, pushes KV to decode servers (KVTransfer)
    decode    registers with the router
    client    another service calling the router's public API (the typed gRPC client)

Servers authorize each RPC by the caller's role (rpc/auth.py); clients check the server's
role by expecting `<role>.tandem.internal` in its certificate, so a prefill server pushes KV
only to a server holding a decode certificate. The other names in every certificate (the
`hosts` given, by default localhost and 127.0.0.1) are what a client dialling that host by
name checks when it does not know the role it dials.

`tandem serve` writes a throw-away set into a private temporary directory at start;
`tandem certs --out DIR` writes one for compose and Kubernetes (docs/deploy.md).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROLES = ("gateway", "router", "prefill", "decode", "client")
ROLE_DOMAIN = "tandem.internal"
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
# A few minutes of slack for clocks that disagree between hosts.
_BACKDATE = datetime.timedelta(minutes=5)


def role_name(role: str) -> str:
    """The DNS name that carries `role` in a certificate (and that clients expect)."""
    return f"{role}.{ROLE_DOMAIN}"


def role_of_name(name: str) -> str | None:
    """`decode.tandem.internal` -> "decode"; any other name -> None."""
    head, _, domain = name.partition(".")
    return head if domain == ROLE_DOMAIN and head in ROLES else None


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in dict.fromkeys(names):  # ordered, no repeats
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(days: int = 365) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tandem internal CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue(
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    role: str,
    hosts: tuple[str, ...] = DEFAULT_HOSTS,
    days: int = 365,
) -> tuple[bytes, bytes]:
    """A certificate for `role` (server and client use), signed by the CA; (cert PEM, key PEM)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, role_name(role))]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san([role_name(role), *hosts]), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def _write(path: Path, data: bytes, mode: int) -> None:
    # created with its final mode: a private key is never readable by others, not even briefly
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def cert_paths(directory: str | os.PathLike, role: str) -> tuple[Path, Path]:
    """(certificate, key) of `role` in a directory written by write_certs."""
    d = Path(directory)
    return d / f"{role}.pem", d / f"{role}-key.pem"


def write_certs(
    directory: str | os.PathLike,
    hosts: tuple[str, ...] = DEFAULT_HOSTS,
    roles: tuple[str, ...] = ROLES,
    days: int = 365,
) -> dict[str, Path]:
    """Write `ca.pem` and `<role>.pem` + `<role>-key.pem` (mode 0600) for each role.

    Returns {"ca": path, "<role>": cert path, "<role>-key": key path}. The CA's private key
    is not written: a new certificate needs a new set (the throw-away CA of `tandem serve`,
    or `tandem certs` again), so nothing on disk can mint more identities.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca, ca_key = make_ca(days)
    paths = {"ca": d / "ca.pem"}
    _write(paths["ca"], ca.public_bytes(serialization.Encoding.PEM), 0o644)
    for role in roles:
        cert_pem, key_pem = issue(ca, ca_key, role, tuple(hosts), days)
        cert_path, key_path = cert_paths(d, role)
        _write(cert_path, cert_pem, 0o644)
        _write(key_path, key_pem, 0o600)
        paths[role], paths[f"{role}-key"] = cert_path, key_path
    return paths


def roles_in_pem(cert_pem: bytes) -> frozenset[str]:
    """The roles a PEM certificate (its first one) carries in its DNS names."""
    if not cert_pem:
        return frozenset()
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return frozenset()
    return frozenset(r for n in san.get_values_for_type(x509.DNSName) if (r := role_of_name(n)))
