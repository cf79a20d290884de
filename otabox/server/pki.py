"""otabox's own certificate authority: the server certificate of an air-gapped site, device certificates.

One CA under `<data-dir>/ca/` signs both: the server certificate made for `--tls-self-signed`
hosts (devices pin the CA, served at `/ca.pem`) and the certificates that identify devices on
the TLS listener. Keys are ECDSA P-256: small certificates and the cheapest handshakes a fleet's
reconnect storm can ask of the server. Which device a certificate belongs to, and whether it
was revoked, is the store's record keyed by serial; the certificate only has to chain to this CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from otabox.errors import BadRequest
from otabox.server.keys import write_private

CA_DIR = "ca"
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
CA_DAYS = 20 * 365
SERVER_DAYS = 5 * 365
DEVICE_DAYS = 10 * 365  # production.md §2: default validity 10 years
MAX_DEVICE_DAYS = 30 * 365
# A CSR's key must be at least this strong (RSA bits); EC keys on the usual curves all pass.
MIN_RSA_BITS = 2048
# Modern settings only: TLS 1.2+ with forward-secret AEAD suites (TLS 1.3's are fixed by OpenSSL).
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


@dataclass(frozen=True, slots=True)
class Issued:
    """A device certificate just signed; `private_key` only when otabox generated the key."""

    serial: str
    certificate: str
    fingerprint: str  # sha256 of the DER, hex
    not_after: float
    private_key: str | None = None


def serial_hex(number: int) -> str:
    return format(number, "x")


def certificate_serial(der: bytes) -> str:
    """The serial (hex) of a DER certificate, as the store keys it. Raises ValueError."""
    return serial_hex(x509.load_der_x509_certificate(der).serial_number)


def _name(common_name: str, org: str = "otabox") -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def parse_hosts(text: str) -> list[str]:
    """`--tls-self-signed` hosts: a comma list of names and IP addresses. Raises ValueError."""
    hosts = [h.strip() for h in text.split(",") if h.strip()]
    if not hosts:
        raise ValueError("tls_self_signed needs at least one host name or IP address")
    return hosts


class CertificateAuthority:
    """The CA key and certificate in `<data-dir>/ca/` (created on first use, key 0600)."""

    def __init__(self, folder: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.folder = folder
        self._key = key
        self.cert = cert

    @classmethod
    def load_or_create(cls, data_dir: Path) -> CertificateAuthority:
        folder = data_dir / CA_DIR
        key_path, cert_path = folder / CA_KEY, folder / CA_CERT
        if key_path.exists() and cert_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{key_path} is not an EC private key")
            return cls(folder, key, x509.load_pem_x509_certificate(cert_path.read_bytes()))
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = _name("otabox CA")
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        # The key first: a CA certificate without its key beside it would be unusable.
        write_private(key_path, _pem_key(key))
        write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        os.chmod(cert_path, 0o644)  # public (GET /ca.pem): other users may pin it, e.g. `otabox ca show`
        return cls(folder, key, cert)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def cert_path(self) -> Path:
        return self.folder / CA_CERT

    def _sign(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return (
            builder.issuer_name(self.cert.subject)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(self._key, hashes.SHA256())
        )

    def server_files(self, hosts: list[str]) -> tuple[Path, Path]:
        """(certificate, key) files for these hosts, made once and reused while the hosts stay the same."""
        cert_path, key_path = self.folder / SERVER_CERT, self.folder / SERVER_KEY
        if cert_path.exists() and key_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            if set(names) == {_alt_name(h) for h in hosts} and cert.not_valid_after_utc > _now():
                return cert_path, key_path
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        cert = self._sign(
            x509.CertificateBuilder()
            .subject_name(_name(hosts[0]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
            .add_extension(x509.SubjectAlternativeName([_alt_name(h) for h in hosts]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        )
        write_private(key_path, _pem_key(key))
        write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path

    def issue_device(
        self, product_key: str, device_key: str, csr_pem: str | None, validity_days: int = DEVICE_DAYS
    ) -> Issued:
        """Sign a device certificate: from the device's CSR, or for a key made here. Raises BadRequest."""
        if not 1 <= validity_days <= MAX_DEVICE_DAYS:
            raise BadRequest(f"validityDays must be 1..{MAX_DEVICE_DAYS}")
        private: str | None = None
        public: ec.EllipticCurvePublicKey | rsa.RSAPublicKey
        if csr_pem is None:
            key = ec.generate_private_key(ec.SECP256R1())
            public = key.public_key()
            private = _pem_key(key).decode()
        else:
            public = _csr_key(csr_pem)
        now = _now()
        not_after = now + dt.timedelta(days=validity_days)
        # Subject and SAN name the device for people and other tools; otabox itself binds the
        # certificate to the device by its serial in the store.
        cert = self._sign(
            x509.CertificateBuilder()
            .subject_name(_name(f"{device_key}&{product_key}", org=product_key))
            .public_key(public)
            .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(not_after)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"otabox:device:{product_key}/{device_key}")]
                ),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        return Issued(
            serial=serial_hex(cert.serial_number),
            certificate=cert.public_bytes(serialization.Encoding.PEM).decode(),
            fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
            not_after=not_after.timestamp(),
            private_key=private,
        )


def _csr_key(csr_pem: str) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError as exc:
        raise BadRequest(f"csr is not a PEM certificate signing request: {exc}") from exc
    try:
        valid = csr.is_signature_valid
    except InvalidSignature:
        valid = False
    if not valid:
        raise BadRequest("csr signature does not verify (the CSR was altered or is broken)")
    key = csr.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise BadRequest(f"csr has a {key.key_size}-bit RSA key; at least {MIN_RSA_BITS} bits are needed")
        return key
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key
    raise BadRequest("csr key must be RSA or EC")


def server_context(cert_file: Path, key_file: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """TLS settings of the server's listeners: TLS 1.2+, strong suites. With `client_ca` (MQTT),
    client certificates are optional but, when sent, verified against it; HTTPS asks for none
    (a browser would offer the user's certificates). Raises OSError/ssl.SSLError."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    ctx.load_cert_chain(cert_file, key_file)
    if client_ca is not None:
        ctx.load_verify_locations(cafile=str(client_ca))
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx
