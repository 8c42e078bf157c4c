"""TLS for the submission listeners: the configured certificate, or a self-signed one.

An admin configures ``[tls] cert_file``/``key_file`` (PEM) for production. With both empty
(the embedded default) a self-signed certificate for the server's host name, ``localhost`` and
the loopback addresses is created on first start under ``var/tls/`` with the ``cryptography``
package and reused afterwards, so STARTTLS works out of the box (mail clients ask the user to
accept it once). RFC 8314 §3 / RFC 3207: TLS 1.2 at least.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["DEFAULT_CERT", "DEFAULT_KEY", "ensure_self_signed", "reload_context", "server_context",
           "submission_context"]

log = logging.getLogger("dealmail.tls")

DEFAULT_CERT = Path("var/tls/dealmail-selfsigned.crt")
DEFAULT_KEY = Path("var/tls/dealmail-selfsigned.key")
_VALIDITY = timedelta(days=3650)


def ensure_self_signed(cert_path: Path, key_path: Path, hostname: str, now: datetime) -> bool:
    """Create a self-signed certificate and key unless both exist; True when created."""
    if cert_path.exists() and key_path.exists():
        return False
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    alt_names: list[x509.GeneralName] = [x509.DNSName(hostname), x509.DNSName("localhost"),
                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                         x509.IPAddress(ipaddress.ip_address("::1"))]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    # The key is written 0600 from its first byte, then renamed into place (atomic), so a
    # crash never leaves a half-written key that the next start would trust.
    tmp_key = key_path.with_suffix(key_path.suffix + ".tmp")
    fd = os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
        f.flush()
        os.fsync(f.fileno())
    tmp_cert = cert_path.with_suffix(cert_path.suffix + ".tmp")
    tmp_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp_key, key_path)
    os.replace(tmp_cert, cert_path)
    log.warning("created a self-signed TLS certificate for %s at %s (configure [tls] "
                "cert_file/key_file for production)", hostname, cert_path)
    return True


def server_context(cert_path: Path, key_path: Path) -> ssl.SSLContext:
    """Server-side context: TLS 1.2+ (RFC 8996 retires older versions)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert_path), str(key_path))
    return context


def submission_context(cert_file: str, key_file: str, hostname: str, base: Path,
                       now: datetime) -> ssl.SSLContext:
    """The context of the submission listeners: configured files, else the self-signed pair
    under ``base/var/tls`` (created on first start)."""
    if cert_file and key_file:
        return server_context(base / cert_file, base / key_file)
    cert, key = base / DEFAULT_CERT, base / DEFAULT_KEY
    ensure_self_signed(cert, key, hostname, now)
    return server_context(cert, key)


def reload_context(context: ssl.SSLContext, cert_file: str, key_file: str, hostname: str,
                   base: Path, now: datetime) -> None:
    """Load the (renewed or newly configured) certificate and key into the live context of
    the submission listeners: connections accepted from now on present it, sessions already
    open keep theirs. The pair is first loaded into a fresh context, so a bad file raises
    (ssl.SSLError, OSError) and leaves the live context untouched."""
    if cert_file and key_file:
        cert, key = base / cert_file, base / key_file
    else:
        cert, key = base / DEFAULT_CERT, base / DEFAULT_KEY
        ensure_self_signed(cert, key, hostname, now)
    server_context(cert, key)  # validates the pair; raises before anything changes
    context.load_cert_chain(str(cert), str(key))
