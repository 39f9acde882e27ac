"""Provisioning: a federation CA, a server certificate, one certificate per client, and a revocation list.

Every party's kit goes to its own folder under the provisioning folder ``DIR``::

    DIR/authority/   ca.key, ca.pem            the CA: kept by whoever provisions, given to no party
    DIR/server/      server.key, server.pem, ca.pem, crl.pem, directory.json
    DIR/clients/ID/  client.key, client.pem, identity.key, ca.pem, directory.json

``*.key`` are private keys (PKCS#8 PEM, unencrypted, mode 0600): ``server.key`` and ``client.key``
are the parties' TLS keys (ECDSA P-256), ``identity.key`` the client's Ed25519 identity key that
signs its masked-aggregation messages. ``directory.json`` is public: each client's id, its
certificate's serial number and its identity public key. A client's certificate names the client
in its subject (common name) and binds its identity public key in its subject alternative name
(``urn:privfl:ed25519:<hex>``); the server admits a peer only if its certificate was issued by the
federation CA (checked by TLS), is not on the revocation list, and carries the serial and identity
key that the directory lists for the client it names (:meth:`ServerKit.admit`).
"""

from __future__ import annotations

import datetime
import json
import os
import re
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import ConfigError, FedcoreError

__all__ = ["provision", "revoke", "ServerKit", "ClientKit", "CertificateRefused", "IDENTITY_URN"]

IDENTITY_URN = "urn:privfl:ed25519:"
"""Prefix of the subject alternative name URI that binds a client's Ed25519 identity public key."""

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
_VALID = datetime.timedelta(days=365)


class CertificateRefused(FedcoreError):
    """A peer certificate the federation does not admit (unknown, revoked, or not the provisioned one)."""


def _write(path: Path, data: bytes, *, secret: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if secret:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _private_pem(key: ec.EllipticCurvePrivateKey | Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "privfl federation"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    )


def _issue(
    *,
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    ca_key: ec.EllipticCurvePrivateKey,
    usage: x509.ObjectIdentifier | None,
    names: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALID)
        .add_extension(x509.BasicConstraints(ca=usage is None, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _crl(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, serials: Sequence[int]) -> bytes:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject).last_update(now).next_update(now + _VALID)
    for serial in sorted(set(serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def provision(out: str | Path, *, client_ids: Sequence[str], server_names: Sequence[str] = ("localhost", "127.0.0.1")) -> Path:
    """Make the CA, the server's kit and one kit per client under ``out`` (see the module docstring).

    Args:
        out: the provisioning folder; must not hold a provisioning already.
        client_ids: the federation's client ids (the workload's, e.g. ``zip-0+1``).
        server_names: host names and IP addresses the server's certificate is valid for.

    Raises:
        ConfigError: no or duplicate client ids, an id that cannot name a folder, or a folder in use.
    """
    out = Path(out)
    ids = [str(c) for c in client_ids]
    if not ids or len(set(ids)) != len(ids):
        raise ConfigError(f"client_ids must be distinct and at least one, got {ids[:10]}")
    bad = [c for c in ids if not _ID.match(c)]
    if bad:
        raise ConfigError(f"client ids must match {_ID.pattern} (they name folders), got {bad[:5]}")
    if not server_names:
        raise ConfigError("server_names must name at least one host or IP address")
    if (out / "authority").exists():
        raise ConfigError(f"{str(out)!r} already holds a provisioning (authority/ exists); choose another folder")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("privfl federation CA")
    ca_cert = _issue(subject=ca_name, key=ca_key, ca_name=ca_name, ca_key=ca_key, usage=None)
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    _write(out / "authority" / "ca.key", _private_pem(ca_key), secret=True)
    _write(out / "authority" / "ca.pem", ca_pem)

    directory: dict[str, dict[str, object]] = {}
    kits: dict[str, tuple[bytes, bytes, bytes]] = {}
    for cid in ids:
        tls_key = ec.generate_private_key(ec.SECP256R1())
        identity = Ed25519PrivateKey.generate()
        public = identity.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        cert = _issue(
            subject=_name(cid), key=tls_key, ca_name=ca_name, ca_key=ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH,
            names=[x509.UniformResourceIdentifier(IDENTITY_URN + public.hex())],
        )  # fmt: skip
        directory[cid] = {"serial": str(cert.serial_number), "identity_key": public.hex()}
        kits[cid] = (_private_pem(tls_key), cert.public_bytes(serialization.Encoding.PEM), _private_pem(identity))
    public_directory = json.dumps({"clients": directory}, indent=1, sort_keys=True).encode()

    server_key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in server_names:
        try:
            names.append(x509.IPAddress(ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    server_cert = _issue(
        subject=_name(server_names[0]), key=server_key, ca_name=ca_name, ca_key=ca_key,
        usage=ExtendedKeyUsageOID.SERVER_AUTH, names=names,
    )  # fmt: skip
    server = out / "server"
    _write(server / "server.key", _private_pem(server_key), secret=True)
    _write(server / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM))
    _write(server / "ca.pem", ca_pem)
    _write(server / "crl.pem", _crl(ca_cert, ca_key, []))
    _write(server / "directory.json", public_directory)
    for cid, (tls_pem, cert_pem, identity_pem) in kits.items():
        folder = out / "clients" / cid
        _write(folder / "client.key", tls_pem, secret=True)
        _write(folder / "client.pem", cert_pem)
        _write(folder / "identity.key", identity_pem, secret=True)
        _write(folder / "ca.pem", ca_pem)
        _write(folder / "directory.json", public_directory)
    return out


def revoke(out: str | Path, client_id: str) -> Path:
    """Add ``client_id``'s certificate to the revocation list in the server's kit (re-signed by the CA).

    A running server reads the new list before it admits the next call.

    Raises:
        ConfigError: ``out`` is no provisioning folder, or the client is not in its directory.
    """
    out = Path(out)
    try:
        ca_key = serialization.load_pem_private_key((out / "authority" / "ca.key").read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate((out / "authority" / "ca.pem").read_bytes())
        crl = x509.load_pem_x509_crl((out / "server" / "crl.pem").read_bytes())
        directory = _load_directory(out / "server" / "directory.json")
    except FileNotFoundError as exc:
        raise ConfigError(f"{str(out)!r} is not a provisioning folder made by `fedcore provision`: {exc}") from exc
    if client_id not in directory:
        raise ConfigError(f"client {client_id!r} is not in the federation's directory (clients: {sorted(directory)[:10]})")
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{out}/authority/ca.key must hold the CA's EC private key, got {type(ca_key).__name__}")
    serials = [r.serial_number for r in crl] + [directory[client_id][0]]
    _write(out / "server" / "crl.pem", _crl(ca_cert, ca_key, serials))
    return out / "server" / "crl.pem"


def _load_directory(path: Path) -> dict[str, tuple[int, bytes]]:
    """client id -> (certificate serial, Ed25519 identity public key)."""
    raw = json.loads(path.read_text(encoding="utf-8"))
    return {cid: (int(entry["serial"]), bytes.fromhex(entry["identity_key"])) for cid, entry in raw["clients"].items()}


def _read(folder: Path, name: str) -> bytes:
    path = folder / name
    if not path.is_file():
        raise ConfigError(f"kit folder {str(folder)!r} lacks {name}: pass the folder `fedcore provision` wrote for this party")
    return path.read_bytes()


@dataclass(frozen=True)
class ClientKit:
    """What one client party keeps on its disk: its TLS key and certificate, its identity key, the CA, the directory."""

    client_id: str
    tls_key: bytes
    certificate: bytes
    identity_key: Ed25519PrivateKey
    ca: bytes
    directory: dict[str, bytes]
    folder: Path | None = None  # where it was loaded from: the client's disk, which also keeps its own ledger

    @classmethod
    def load(cls, folder: str | Path) -> ClientKit:
        """Read a client kit; its id is its certificate's common name.

        Raises:
            ConfigError: a missing file, or a certificate that does not bind this kit's identity key.
        """
        folder = Path(folder)
        cert_pem = _read(folder, "client.pem")
        cert = x509.load_pem_x509_certificate(cert_pem)
        identity = serialization.load_pem_private_key(_read(folder, "identity.key"), password=None)
        if not isinstance(identity, Ed25519PrivateKey):
            raise ConfigError(f"{folder}/identity.key must hold an Ed25519 private key, got {type(identity).__name__}")
        public = identity.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        if _bound_identity(cert) != public:
            raise ConfigError(f"{folder}/client.pem does not bind the identity key in {folder}/identity.key")
        _read(folder, "directory.json")
        directory = {cid: key for cid, (_, key) in _load_directory(folder / "directory.json").items()}
        return cls(
            _common_name(cert), _read(folder, "client.key"), cert_pem, identity, _read(folder, "ca.pem"), directory, folder
        )


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise CertificateRefused(f"certificate {cert.serial_number} must name exactly one common name, has {len(names)}")
    return str(names[0].value)


def _bound_identity(cert: x509.Certificate) -> bytes | None:
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier
        )
    except x509.ExtensionNotFound:
        return None
    keys = [bytes.fromhex(u[len(IDENTITY_URN) :]) for u in uris if u.startswith(IDENTITY_URN)]
    return keys[0] if len(keys) == 1 else None


class ServerKit:
    """What the server party keeps on its disk, and the admission check it runs on every peer certificate."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.tls_key = _read(self.folder, "server.key")
        self.certificate = _read(self.folder, "server.pem")
        self.ca = _read(self.folder, "ca.pem")
        self._ca_cert = x509.load_pem_x509_certificate(self.ca)
        _read(self.folder, "crl.pem")
        _read(self.folder, "directory.json")
        self.directory = _load_directory(self.folder / "directory.json")
        self._crl_stamp: int | None = None
        self._revoked: frozenset[int] = frozenset()
        self._revoked_now()

    @property
    def identity_keys(self) -> dict[str, bytes]:
        """client id -> Ed25519 identity public key (the signed-masking directory)."""
        return {cid: key for cid, (_, key) in self.directory.items()}

    def _revoked_now(self) -> frozenset[int]:
        """The revoked serials, re-read when ``crl.pem`` changed; a list not signed by the CA is refused."""
        path = self.folder / "crl.pem"
        stamp = path.stat().st_mtime_ns
        if stamp != self._crl_stamp:
            crl = x509.load_pem_x509_crl(path.read_bytes())
            if crl.issuer != self._ca_cert.subject or not crl.is_signature_valid(self._ca_cert.public_key()):  # type: ignore[arg-type]
                raise ConfigError(f"{path} is not signed by the federation CA")
            self._revoked, self._crl_stamp = frozenset(r.serial_number for r in crl), stamp
        return self._revoked

    def admit(self, pem: bytes) -> str:
        """The client id a peer certificate proves, or :class:`CertificateRefused` saying why not.

        TLS has already checked the chain to the federation CA; this checks it again (so a
        misconfigured listener cannot widen it), then the revocation list, then that the
        certificate is the provisioned one of the client it names (serial and identity key).
        """
        cert = x509.load_pem_x509_certificate(pem)
        try:
            cert.verify_directly_issued_by(self._ca_cert)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise CertificateRefused(f"certificate {cert.serial_number} was not issued by the federation CA") from exc
        if cert.serial_number in self._revoked_now():
            raise CertificateRefused(f"certificate {cert.serial_number} of {_common_name(cert)!r} is revoked")
        cid = _common_name(cert)
        entry = self.directory.get(cid)
        if entry is None:
            raise CertificateRefused(f"{cid!r} is not a client of this federation")
        if entry[0] != cert.serial_number or _bound_identity(cert) != entry[1]:
            raise CertificateRefused(f"certificate {cert.serial_number} of {cid!r} is not the one provisioned for it")
        return cid
