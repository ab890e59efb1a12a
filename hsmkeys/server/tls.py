"""TLS for the server: check a certificate and key pair, and make a self-signed one.

:func:`load_server_context` proves at startup (before binding) that the files form a
usable pair, so a typo is one ConfigError rather than N workers failing.
:func:`write_self_signed_cert` writes what ``hsmkeys init --self-signed-cert`` and
tests use: a P-256 certificate for ``localhost``, ``127.0.0.1`` and ``::1`` that is
its own CA, so clients trust it with ``AWS_CA_BUNDLE=<cert>`` (boto3, the aws CLI)
or ``verify=<cert>``; the key file is written 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hsmkeys.errors import ConfigError

__all__ = ["load_server_context", "write_self_signed_cert"]

#: Long enough for a development setup, short of the 825 days some clients cap at.
VALIDITY = datetime.timedelta(days=397)


def load_server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server SSLContext holding ``cert`` and ``key``; ConfigError naming the problem."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    for name, path in (("server.tls_cert", cert), ("server.tls_key", key)):
        if not path.is_file():
            raise ConfigError(f"{name}: {path} does not exist or is not a file")
    try:
        context.load_cert_chain(certfile=cert, keyfile=key)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"server.tls_cert/tls_key: {cert} and {key} are not a matching PEM certificate "
            f"and unencrypted private key ({exc.reason or exc})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"server.tls_cert/tls_key: cannot read {cert} or {key}: {exc.strerror}") from None
    return context


def write_self_signed_cert(
    cert_path: Path,
    key_path: Path,
    *,
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1", "::1"),
    now: datetime.datetime | None = None,
) -> None:
    """Write a new key to ``key_path`` (0600) and its certificate to ``cert_path`` (0644),
    replacing either file; missing directories are made 0700.

    The certificate names ``hosts`` (DNS names or IP addresses) and is a CA for itself
    only (``BasicConstraints(ca=True, path_length=0)``), which OpenSSL needs to accept a
    self-signed leaf as a trust anchor.
    """
    for folder in {cert_path.parent, key_path.parent}:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = now or datetime.datetime.now(datetime.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hsmkeys local server")])
    alt_names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _replace(key_path, key_pem, 0o600)
    _replace(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _replace(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a new file with ``mode`` and rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(fd, mode)  # exactly mode, whatever the umask
        out.write(data)
    os.replace(tmp, path)
