"""Byte format of every homomorphic-aggregation message (contexts, ciphertexts, aggregates).

One envelope for all of them, so that a corrupted, truncated or mislabelled message fails in
one place with :class:`~secagg.errors.ProtocolError`::

    offset   size  field
    0        4     magic b"PFHE"
    4        1     format version (1)
    5        1     kind: 1 public context, 2 client context, 3 client ciphertext, 4 aggregate,
                   5 request (server -> client: "send your ciphertext for this round"; no blobs),
                   6 decryption (key holder -> server: the decrypted sum, one blob "values" of
                   little-endian float64 (CKKS, on the release grid) or int64 (BFV) numbers)
    6        4     H: length of the header (uint32, big endian, at most 65,536)
    10       H     header: a UTF-8 JSON object (scheme, preset, parameter fingerprint, key id,
                   scale, bounds, vector length, blob names, ...)
    10+H     4     B: number of blobs (uint32, big endian); the header's "blobs" names them
    ...            B times: L (uint64, big endian) then L bytes, a serialization made by SEAL
                   (``tenseal.sealapi``) or TenSEAL
    end-32   32    SHA-256 of every byte before it

The digest catches corruption and truncation in transit. It is not a signature: anyone who
alters a message can recompute it, so an active attacker on the channel must be stopped by an
authenticated transport (TLS). Parsing never evaluates code (JSON and length-prefixed bytes only).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Mapping, Sequence

from .errors import ProtocolError

__all__ = [
    "Envelope",
    "pack",
    "unpack",
    "KIND_NAMES",
    "PUBLIC_CONTEXT",
    "CLIENT_CONTEXT",
    "CIPHERTEXT",
    "AGGREGATE",
    "REQUEST",
    "DECRYPTION",
]

MAGIC = b"PFHE"
VERSION = 1
PUBLIC_CONTEXT = 1
CLIENT_CONTEXT = 2
CIPHERTEXT = 3
AGGREGATE = 4
REQUEST = 5
DECRYPTION = 6
KIND_NAMES = {
    PUBLIC_CONTEXT: "public context",
    CLIENT_CONTEXT: "client context",
    CIPHERTEXT: "client ciphertext",
    AGGREGATE: "aggregate ciphertext",
    REQUEST: "ciphertext request",
    DECRYPTION: "decrypted sum",
}
_MAX_HEADER = 65_536
_MAX_BLOBS = 1 << 24
_DIGEST = 32
_PREFIX = struct.Struct(">4sBBI")  # magic, version, kind, header length
_COUNT = struct.Struct(">I")
_LENGTH = struct.Struct(">Q")


@dataclass(frozen=True)
class Envelope:
    """A parsed message: its kind, its JSON header and its named blobs (in order)."""

    kind: int
    header: Mapping[str, object]
    blobs: tuple[bytes, ...]

    @property
    def kind_name(self) -> str:
        return KIND_NAMES.get(self.kind, f"kind {self.kind}")

    def named(self, name: str) -> bytes:
        """The blob the header names ``name``; ProtocolError if absent."""
        names = self.header.get("blobs", [])
        if not isinstance(names, list) or name not in names:
            raise ProtocolError(f"{self.kind_name} carries no {name!r} blob (it has {names!r})")
        return self.blobs[names.index(name)]


def pack(kind: int, header: Mapping[str, object], blobs: Sequence[bytes]) -> bytes:
    """Serialize one message; ``header["blobs"]`` must name the blobs in order."""
    names = header.get("blobs")
    if not isinstance(names, list) or len(names) != len(blobs):
        raise ValueError(f"header['blobs'] must list {len(blobs)} blob names, got {names!r}")
    head = json.dumps(dict(header), sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    if len(head) > _MAX_HEADER:
        raise ValueError(f"header is {len(head)} bytes, more than the {_MAX_HEADER} allowed")
    parts = [_PREFIX.pack(MAGIC, VERSION, kind, len(head)), head, _COUNT.pack(len(blobs))]
    for blob in blobs:
        parts.append(_LENGTH.pack(len(blob)))
        parts.append(blob)
    body = b"".join(parts)
    return body + hashlib.sha256(body).digest()


def unpack(data: bytes, *, what: str) -> Envelope:
    """Parse and check a message; ``what`` names it in errors ("ciphertext of client 'c3'").

    Raises:
        ProtocolError: not bytes of this format, a digest mismatch (tampered or corrupted),
            a truncated or over-long message, or a header that is not a JSON object.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"{what} must be bytes, got {type(data).__name__}")
    data = bytes(data)
    minimum = _PREFIX.size + _COUNT.size + _DIGEST
    if len(data) < minimum:
        raise ProtocolError(f"{what} is truncated: {len(data)} bytes, a message has at least {minimum}")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    magic, version, kind, head_len = _PREFIX.unpack_from(body, 0)
    if magic != MAGIC:
        raise ProtocolError(f"{what} does not start with the magic {MAGIC!r} (got {magic!r}); not a secagg HE message")
    if version != VERSION:
        raise ProtocolError(f"{what} has format version {version}, this library reads version {VERSION}")
    if hashlib.sha256(body).digest() != digest:
        raise ProtocolError(f"{what} fails its SHA-256 check: the bytes were truncated, corrupted or tampered with")
    if kind not in KIND_NAMES:
        raise ProtocolError(f"{what} has unknown kind {kind}; known kinds are {sorted(KIND_NAMES)}")
    offset = _PREFIX.size
    if head_len > _MAX_HEADER or offset + head_len + _COUNT.size > len(body):
        raise ProtocolError(f"{what} declares a {head_len}-byte header that does not fit the message")
    try:
        header = json.loads(body[offset : offset + head_len].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"{what} has a header that is not UTF-8 JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"{what} has a header that is not a JSON object")
    offset += head_len
    (count,) = _COUNT.unpack_from(body, offset)
    offset += _COUNT.size
    if count > _MAX_BLOBS:
        raise ProtocolError(f"{what} declares {count} blobs, more than {_MAX_BLOBS}")
    blobs = []
    for index in range(count):
        if offset + _LENGTH.size > len(body):
            raise ProtocolError(f"{what} is truncated inside blob {index} of {count}")
        (length,) = _LENGTH.unpack_from(body, offset)
        offset += _LENGTH.size
        if offset + length > len(body):
            raise ProtocolError(f"{what} is truncated: blob {index} declares {length} bytes, {len(body) - offset} remain")
        blobs.append(body[offset : offset + length])
        offset += length
    if offset != len(body):
        raise ProtocolError(f"{what} has {len(body) - offset} trailing bytes after its {count} blobs")
    names = header.get("blobs")
    if not isinstance(names, list) or len(names) != count:
        raise ProtocolError(f"{what} names {names!r} in its header but carries {count} blobs")
    return Envelope(kind=kind, header=header, blobs=tuple(blobs))
