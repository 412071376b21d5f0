"""TLS made here: a throwaway certificate authority, a certificate it signed for 127.0.0.1,
and a `fastfan run --tls-cert --tls-key` spoken to over TLS with a context that trusts only
that authority. tests/conftest.py turns them into the `pki` and `start_tls` fixtures."""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from support.server import Server


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
                 issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_pki(directory: Path) -> dict[str, Path]:
    """A throwaway CA and a certificate it signed for 127.0.0.1: PEM files in `directory`,
    as {"ca", "cert", "key"}."""
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    ca = _certificate("fastfan test CA", ca_key, "fastfan test CA", ca_key, ca=True)
    cert = _certificate("127.0.0.1", server_key, "fastfan test CA", ca_key, ca=False)
    paths = {"ca": directory / "ca.pem", "cert": directory / "cert.pem",
             "key": directory / "key.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return paths


class TlsServer(Server):
    """A `fastfan run --tls-cert --tls-key`, spoken to over TLS: `context` trusts the CA
    that signed its certificate, and nothing else."""

    def __init__(self, log_path: Path, pki: dict[str, Path], *args: str) -> None:
        self.context = ssl.create_default_context(cafile=str(pki["ca"]))
        super().__init__(log_path, "--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"]),
                         *args)

    def url(self, path: str = "/", token: str | None = None) -> str:
        return "wss" + super().url(path, token)[2:]

    def http_connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPSConnection(self.host, self.port, timeout=5,
                                           context=self.context)
