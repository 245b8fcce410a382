"""A throwaway CA and a server certificate signed by it, for TLS in tests."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import NamedTuple

from tests.support import require


class TestCertificate(NamedTuple):
    ca: Path  # the CA certificate, to trust
    cert: Path  # the server's certificate ...
    key: Path  # ... and its key
    combined: Path  # both in one file, as HAProxy and redis-server's tests like


def make_certificate(directory: Path, name: str = "localhost") -> TestCertificate:
    """A CA, and a certificate for ``name``, 127.0.0.1 and ::1 that it signed."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError as e:  # comes with pyOpenSSL, which TLS in Twisted needs
        raise require("cryptography", str(e)) from e

    now = datetime.datetime.now(datetime.timezone.utc)

    def build(subject: str, issuer: str, key, signer, ca: bool):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.BasicConstraints(ca=ca, path_length=None), critical=True
            )
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName(name),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                        x509.IPAddress(ipaddress.ip_address("::1")),
                    ]
                ),
                critical=False,
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = build("webchat test CA", "webchat test CA", ca_key, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build(name, "webchat test CA", key, ca_key, ca=False)

    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    paths = TestCertificate(
        directory / "ca.pem",
        directory / "cert.pem",
        directory / "key.pem",
        directory / "combined.pem",
    )
    paths.ca.write_bytes(ca_cert.public_bytes(pem))
    paths.cert.write_bytes(cert.public_bytes(pem))
    paths.key.write_bytes(key_pem)
    paths.combined.write_bytes(cert.public_bytes(pem) + key_pem)
    for path in paths:
        path.chmod(0o600)
    return paths
