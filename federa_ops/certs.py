"""`federa certs DIR`: the credentials of a deployment, made with the `cryptography` package.

A private CA signs the SuperLink's TLS certificate (the SuperNodes and `flwr` verify it with
`ca.crt`); each SuperNode gets an EC key pair in OpenSSH format for Flower's node authentication
(the SuperLink admits only registered public keys). Flower documents these steps as openssl and
ssh-keygen shell scripts; `cryptography` is already a Flower dependency and works everywhere.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federa_app.errors import ConfigError

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
DEFAULT_SANS = ("localhost", "127.0.0.1", "::1")
_DNS_NAME = re.compile(r"^(?=.{1,253}$)(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+$")


@dataclass(frozen=True)
class Credentials:
    """Where `make_credentials` put each file."""

    directory: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...]  # private keys; the public key is the same name with .pub

    def node_public_key(self, index: int) -> Path:
        """The OpenSSH public key of SuperNode `index` (1-based), to register with the SuperLink."""
        return self.node_keys[index - 1].with_suffix(".pub")


def node_key_name(index: int) -> str:
    """File name of SuperNode `index`'s private key (1-based): supernode-1.key, ..."""
    return f"supernode-{index}.key"


def parse_san(value: str) -> x509.GeneralName:
    """A subject alternative name: an IP address or a DNS name, else a one-line error."""
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not _DNS_NAME.match(value):
        raise ConfigError(
            f"--san '{value}' is neither an IP address nor a DNS name "
            "(examples: 192.168.1.10, superlink.example.org, localhost)"
        )
    return x509.DNSName(value)


def _write_private(path: Path, data: bytes) -> None:
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_bytes(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_credentials(
    directory: str | Path,
    nodes: int = 2,
    sans: tuple[str, ...] = DEFAULT_SANS,
    days: int = 365,
    overwrite: bool = False,
) -> Credentials:
    """Write a CA, a SuperLink certificate for `sans` and `nodes` SuperNode key pairs."""
    if nodes < 0:
        raise ConfigError(f"--nodes {nodes} must be >= 0")
    if days < 1:
        raise ConfigError(f"--days {days} must be >= 1")
    if not sans:
        raise ConfigError("at least one --san is needed (the SuperLink's address)")
    names = [parse_san(s) for s in sans]  # all checked before anything is written
    directory = Path(directory)
    files = [CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY]
    files += [n for i in range(1, nodes + 1) for n in (node_key_name(i), f"supernode-{i}.pub")]
    existing = [f for f in files if (directory / f).exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"{directory} already holds {', '.join(existing)}: choose another directory or "
            "pass --overwrite (nodes and the SuperLink holding the old ones will be refused)"
        )
    directory.mkdir(parents=True, exist_ok=True)

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FeDeRA deployment CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )

    pem = serialization.Encoding.PEM
    (directory / CA_CERT).write_bytes(ca_cert.public_bytes(pem))
    _write_private(directory / CA_KEY, _pem_key(ca_key))
    (directory / SERVER_CERT).write_bytes(server_cert.public_bytes(pem))
    _write_private(directory / SERVER_KEY, _pem_key(server_key))

    node_keys = []
    for index in range(1, nodes + 1):
        # Flower's node authentication takes EC keys on a NIST curve, in OpenSSH format.
        key = ec.generate_private_key(ec.SECP384R1())
        private = directory / node_key_name(index)
        _write_private(
            private,
            key.private_bytes(
                pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        private.with_suffix(".pub").write_bytes(public + f" supernode-{index}\n".encode())
        node_keys.append(private)
    return Credentials(
        directory,
        directory / CA_CERT,
        directory / SERVER_CERT,
        directory / SERVER_KEY,
        tuple(node_keys),
    )
