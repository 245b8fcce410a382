"""A throwaway self-signed certificate for ``python -m benchmarks --tls``.

The load generator does not check it (loopback only); the servers under test
need one to speak TLS at all.  An ECDSA P-256 key: what a current deployment
would use, and the cheapest handshake OpenSSL offers.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TlsFiles:
    """A server certificate and its key, PEM files in the run's work directory."""

    cert: Path
    key: Path

    def endpoint(self, port: int) -> str:
        """The Twisted ``ssl:`` endpoint string webchat is started with."""
        return (
            f"ssl:{port}:interface=127.0.0.1:privateKey={self.key}:certKey={self.cert}"
        )


def make_tls_files(directory: Path) -> TlsFiles:
    """Write a self-signed certificate for 127.0.0.1/localhost into ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    files = TlsFiles(cert=directory / "bench-cert.pem", key=directory / "bench-key.pem")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files
