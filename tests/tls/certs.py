"""Throw-away PEM files for the TLS tests: a CA, a server certificate for 127.0.0.1 and
localhost (also good as a client certificate: every tandem service is a client of another),
a client-only certificate (role client), and a second, unrelated CA with a client certificate of its own."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from rpc.pki import ROLES, make_ca, role_name
from rpc.tls import PLAINTEXT, TLSConfig


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Certs:
    ca: Path  # CA bundle of the stack
    server: Pair  # 127.0.0.1 / localhost, server and client auth: what every service uses
    client: Pair  # client auth only, signed by `ca`
    other_ca: Path  # an unrelated CA
    other_client: Pair  # a client certificate signed by `other_ca`


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, cert: x509.Certificate, key) -> Pair:
    cert_path, key_path = path.with_suffix(".crt"), path.with_suffix(".key")
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Pair(cert_path, key_path)


def _builder(subject: str, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _ca(path: Path):
    cert, key = make_ca(days=1)  # the CA `tandem certs` makes
    _write(path, cert, key)
    return cert, key


def _leaf(path: Path, cn: str, ca, usages, san=None) -> Pair:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    b = _builder(cn, ca_cert.subject, key.public_key())
    b = b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    b = b.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return _write(path, b.sign(ca_key, hashes.SHA256()), key)


def make_certs(out: Path) -> Certs:
    ca = _ca(out / "ca")
    other = _ca(out / "other-ca")
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    # One certificate that may act as every role (rpc/pki.py names): an operator's choice the
    # stack allows; `tandem certs` issues one role per certificate.
    san += [x509.DNSName(role_name(r)) for r in ROLES if r != "client"]
    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    client = [ExtendedKeyUsageOID.CLIENT_AUTH]
    return Certs(
        ca=out / "ca.crt",
        server=_leaf(out / "server", "tandem", ca, both, san),
        client=_leaf(
            out / "client", "tandem client", ca, client, [x509.DNSName(role_name("client"))]
        ),
        other_ca=out / "other-ca.crt",
        other_client=_leaf(out / "other-client", "intruder", other, client),
    )


def bad_clients(certs: Certs) -> dict[str, TLSConfig]:
    """Clients a mutual-TLS server must refuse, by what is wrong with them."""
    return {
        "plaintext": PLAINTEXT,
        "no_client_cert": TLSConfig.from_files(ca_certs=str(certs.ca)),
        "trusts_other_ca": TLSConfig.from_files(
            str(certs.client.cert), str(certs.client.key), str(certs.other_ca)
        ),
        "cert_from_other_ca": TLSConfig.from_files(
            str(certs.other_client.cert), str(certs.other_client.key), str(certs.ca)
        ),
    }
