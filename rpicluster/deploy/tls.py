"""A private certificate authority for one cluster, and a certificate per node.

Dask's TLS (``tls://``) requires both ends to present a certificate signed by the cluster's CA,
so a client without one is refused by the scheduler. Keys are EC P-256 (fast to make on a Pi)
and written with mode 0600.

Every certificate carries its role (``scheduler``, ``worker`` or ``client``: :func:`role_of`) as
its organizational unit: the scheduler's guard (:mod:`rpicluster.deploy.guard`) refuses the
operations that control the cluster to a worker's certificate.
Certificates last :data:`VALIDITY`; :meth:`CertificateAuthority.needs_rotation` tells ``up`` when
one is within :data:`RENEW_BEFORE` of expiry (or was issued to a host no longer in the inventory),
and :meth:`CertificateAuthority.rotate` replaces the CA, so every old certificate stops working.
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

#: Validity of the CA and node certificates (``up`` rotates them before they expire).
VALIDITY = datetime.timedelta(days=365)
#: ``up`` rotates the CA when a certificate has less than this left.
RENEW_BEFORE = datetime.timedelta(days=30)


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


def _name(cn: str, role: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rpicluster")]
    if role is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role))
    return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def role_of(name: str) -> str:
    """The role of the certificate ``up`` issues under ``name`` (any node name: a worker)."""
    return name if name in ("scheduler", "client") else "worker"


def _role(cert: x509.Certificate) -> str | None:
    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    return str(ous[0].value) if ous else None


class CertificateAuthority:
    """The CA of one cluster, kept in ``directory`` (created on first use)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.cert_path = self.directory / "ca.pem"
        key_path = self.directory / "ca-key.pem"
        self._key_path = key_path
        if self.cert_path.exists() and key_path.exists():
            self._key = serialization.load_pem_private_key(key_path.read_bytes(), None)
            self._cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            return
        self._create()

    def _create(self) -> None:
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
        _write_private(self._key_path, _key_pem(self._key))
        _write_private(self.cert_path, self._cert.public_bytes(serialization.Encoding.PEM))

    def _paths(self, name: str) -> tuple[Path, Path]:
        safe = "".join(c if c.isalnum() or c in ".-_" else "_" for c in name)
        return self.directory / f"{safe}.pem", self.directory / f"{safe}-key.pem"

    def issued(self) -> dict[str, x509.Certificate]:
        """Every certificate this CA issued and keeps, by file stem (node name)."""
        out = {}
        for path in sorted(self.directory.glob("*.pem")):
            if path == self.cert_path or path.name.endswith("-key.pem"):
                continue
            out[path.stem] = x509.load_pem_x509_certificate(path.read_bytes())
        return out

    def needs_rotation(self, names, now: datetime.datetime | None = None) -> str | None:
        """Why this CA must be replaced before ``names`` are (re)issued, or None.

        A certificate (the CA's or one issued) expiring within :data:`RENEW_BEFORE` or lacking a
        role, or one issued to a name not in ``names`` (a host removed from the inventory, whose
        copy must stop working).
        """
        now = now or datetime.datetime.now(datetime.timezone.utc)
        if self._cert.not_valid_after_utc - now < RENEW_BEFORE:
            return f"the CA expires on {self._cert.not_valid_after_utc:%Y-%m-%d}"
        names = set(names)
        for name, cert in self.issued().items():
            if name not in names:
                return f"{name!r} has a certificate but is no longer in the inventory"
            if cert.not_valid_after_utc - now < RENEW_BEFORE:
                return f"the certificate of {name!r} expires on {cert.not_valid_after_utc:%Y-%m-%d}"
            if _role(cert) != role_of(name):
                return f"the certificate of {name!r} has no role (issued by an older rpicluster)"
        return None

    def rotate(self) -> None:
        """Replace the CA and drop every certificate it issued (re-issued on request)."""
        for path in self.directory.glob("*.pem"):
            path.unlink()
        self._create()

    def rotate_if_needed(self, names) -> str | None:
        """:meth:`rotate` when :meth:`needs_rotation` says why; returns that reason (or None)."""
        why = self.needs_rotation(names)
        if why is not None:
            self.rotate()
        return why

    def issue(self, name: str, *, now: datetime.datetime | None = None) -> CertFiles:
        """The certificate files of node ``name`` (made on first request, then reused).

        Its role is :func:`role_of` ``name``; ``now`` backdates a certificate (tests).
        """
        cert_path, key_path = self._paths(name)
        if not (cert_path.exists() and key_path.exists()):
            key = ec.generate_private_key(ec.SECP256R1())
            now = now or datetime.datetime.now(datetime.timezone.utc)
            cert = (
                x509.CertificateBuilder().subject_name(_name(name, role_of(name)))
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
