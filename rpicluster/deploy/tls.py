"""A private certificate authority for one cluster, and a certificate per node.

Dask's TLS (``tls://``) requires both ends to present a certificate signed by the cluster's CA,
so a client without one is refused by the scheduler. Keys are EC P-256 (fast to make on a Pi)
and written with mode 0600.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

#: Validity of the CA and node certificates: a private cluster, renewed by deleting the folder.
VALIDITY = datetime.timedelta(days=3650)


@dataclass(frozen=True)
class CertFiles:
    """PEM files one node needs: the CA certificate, its own certificate and key."""

    ca: Path
    cert: Path
    key: Path

    def security(self):
        """A ``distributed.Security`` using these files, encryption required."""
        from distributed.security import Security

        return Security(tls_ca_file=str(self.ca), tls_client_cert=str(self.cert),
                        tls_client_key=str(self.key), require_encryption=True)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rpicluster"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class CertificateAuthority:
    """The CA of one cluster, kept in ``directory`` (created on first use)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.cert_path = self.directory / "ca.pem"
        key_path = self.directory / "ca-key.pem"
        if self.cert_path.exists() and key_path.exists():
            self._key = serialization.load_pem_private_key(key_path.read_bytes(), None)
            self._cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            return
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        name = _name("rpicluster CA")
        self._cert = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(self._key, hashes.SHA256()))
        _write_private(key_path, _key_pem(self._key))
        _write_private(self.cert_path, self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str) -> CertFiles:
        """The certificate files of node ``name`` (made on first request, then reused)."""
        safe = "".join(c if c.isalnum() or c in ".-_" else "_" for c in name)
        cert_path = self.directory / f"{safe}.pem"
        key_path = self.directory / f"{safe}-key.pem"
        if not (cert_path.exists() and key_path.exists()):
            key = ec.generate_private_key(ec.SECP256R1())
            now = datetime.datetime.now(datetime.timezone.utc)
            cert = (
                x509.CertificateBuilder().subject_name(_name(name))
                .issuer_name(self._cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + VALIDITY)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH,
                                                      x509.ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .sign(self._key, hashes.SHA256()))
            _write_private(key_path, _key_pem(key))
            _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return CertFiles(ca=self.cert_path, cert=cert_path, key=key_path)
