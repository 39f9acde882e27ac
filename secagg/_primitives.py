"""Private cryptographic layer of masked secure aggregation, over `cryptography`.

Nothing here is written by hand that the library does: X25519 key agreement, HKDF-SHA256,
AES-256-GCM for share transport, Ed25519 signatures and the AES-256-CTR keystream that
expands 256-bit seeds into masks all come from ``cryptography`` (OpenSSL). This module only
fixes the domain-separated labels, turns every failure into :class:`ProtocolError`, and adds
keystreams into numpy arrays in cache-sized chunks.

Labels: every HKDF ``info`` and every signed or hashed string starts with
``b"secagg/v1/" + purpose`` followed by length-prefixed context fields, so that no key,
commitment or signature made for one purpose is ever valid for another.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable, Sequence

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import KeyMaterialError, ProtocolError

PROTOCOL_VERSION = 2
"""Version byte of every message and of every label (bumped on any format change)."""

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
SIGNATURE_BYTES = 64

_PREFIX = b"secagg/v%d/" % PROTOCOL_VERSION
_ZERO_IV = bytes(16)
# Keystream is produced and added in chunks of this many bytes: large enough that the
# per-call overhead is negligible, small enough that buffer and accumulator slice stay in L2.
_CHUNK_BYTES = 1 << 18
_ZEROS = memoryview(bytes(_CHUNK_BYTES))

# Purposes (the only labels in use; tests check they are pairwise distinct).
LABEL_SHARE_TRANSPORT = "share-transport"
LABEL_PAIRWISE_MASK = "pairwise-mask"
LABEL_SELF_MASK = "self-mask"
LABEL_SELF_MASK_COMMITMENT = "self-mask-commitment"
LABEL_ADVERTISEMENT = "key-advertisement"
LABEL_SHARE_AAD = "share-aad"
LABEL_GRAPH = "graph"
LABEL_GRAPH_SEED = "graph-seed"
LABEL_SETUP = "round-setup"
LABEL_AD_DIGEST = "advertisement-digest"
LABEL_SHARE_DIGEST = "share-digest"
LABEL_MESSAGE = "client-message"
LABEL_SURVIVORS = "survivor-set"


def context(*parts: bytes | str | int) -> bytes:
    """Length-prefixed, unambiguous encoding of context fields (ints as 8-byte big-endian)."""
    out = []
    for part in parts:
        if type(part) not in (str, bytes, int):  # the rare subclass or bytearray: normalise, refuse the rest
            if isinstance(part, bool) or not isinstance(part, (bytes, bytearray, str, int)):
                raise TypeError(f"context parts must be bytes, str or int, got {type(part).__name__}")
            part = int(part) if isinstance(part, int) else str(part) if isinstance(part, str) else bytes(part)
        # part is now exactly int, str or bytes (bool was refused above)
        if isinstance(part, int):
            out.append(b"i" + part.to_bytes(8, "big"))
            continue
        raw = part.encode("utf-8") if isinstance(part, str) else part
        out.append((b"s" if isinstance(part, str) else b"b") + len(raw).to_bytes(4, "big") + raw)
    return b"".join(out)


def label(purpose: str, *parts: bytes | str | int) -> bytes:
    """The domain-separated label for ``purpose`` bound to ``parts``."""
    return _PREFIX + purpose.encode("ascii") + b"\x00" + context(*parts)


def hkdf(secret: bytes, purpose: str, *parts: bytes | str | int, length: int = KEY_BYTES) -> bytes:
    """HKDF-SHA256 of ``secret`` with the label of ``purpose`` and ``parts`` as info."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=label(purpose, *parts)).derive(secret)


def digest(purpose: str, *parts: bytes | str | int) -> bytes:
    """SHA-256 of the label (used as a hiding, binding commitment to a 256-bit random secret)."""
    return hashlib.sha256(label(purpose, *parts)).digest()


def message_digest(purpose: str, data: bytes | bytearray | memoryview) -> bytes:
    """SHA-256 of the label of ``purpose`` followed by ``data`` as it is (no copy of large payloads)."""
    h = hashlib.sha256(label(purpose))
    h.update(data)
    return h.digest()


# ----------------------------------------------------------------------------- X25519


def new_x25519() -> tuple[X25519PrivateKey, bytes]:
    """A fresh X25519 key pair from the OS generator, with the raw 32-byte public key."""
    private = X25519PrivateKey.generate()
    return private, private.public_key().public_bytes_raw()


def x25519_private_from_raw(raw: bytes) -> X25519PrivateKey:
    """Rebuild an X25519 private key from its raw 32 bytes.

    Raises:
        ProtocolError: ``raw`` is not 32 bytes.
    """
    if len(raw) != KEY_BYTES:
        raise ProtocolError(f"an X25519 private key is {KEY_BYTES} bytes, got {len(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def x25519_public_raw(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes_raw()


def agree(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """X25519 shared secret with a peer's raw public key.

    Raises:
        ProtocolError: the peer key is malformed or of low order (all-zero shared secret).
    """
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:
        raise ProtocolError(f"peer X25519 public key rejected: {exc}") from None


# ----------------------------------------------------------------------------- AES-GCM


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM encryption under a fresh random 96-bit nonce; returns nonce || ciphertext.

    Every key passed here is derived for one (round, sender, receiver) and encrypts one
    message, and the nonce is random as well, so no (key, nonce) pair repeats.
    """
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Decrypt ``nonce || ciphertext`` made by :func:`seal`.

    Raises:
        ProtocolError: the blob is too short, or authentication failed (tampered, replayed
            from another round, delivered to the wrong receiver, or the wrong key).
    """
    if len(blob) < NONCE_BYTES + TAG_BYTES:
        raise ProtocolError(f"sealed share of {len(blob)} bytes is shorter than nonce and tag")
    try:
        return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad)
    except InvalidTag:
        raise ProtocolError("share failed authentication (tampered, replayed, swapped or wrong key)") from None


# ----------------------------------------------------------------------------- Ed25519


def new_identity_key() -> Ed25519PrivateKey:
    """A long-term Ed25519 signing key for signed key advertisement."""
    return Ed25519PrivateKey.generate()


def check_identity_private(key: object, who: str) -> Ed25519PrivateKey:
    """Validate the Ed25519 signing key given for ``who``.

    Raises:
        KeyMaterialError: any other kind of key or object (an X25519 key, raw bytes).
    """
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyMaterialError(f"identity key of {who!r} must be an Ed25519PrivateKey, got {type(key).__name__}")
    return key


def identity_public_raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def sign(key: Ed25519PrivateKey, message: bytes) -> bytes:
    return key.sign(message)


def verify(public_raw: bytes, signature: bytes, message: bytes, *, what: str = "key advertisement") -> None:
    """Check an Ed25519 signature.

    Raises:
        ProtocolError: bad key, bad length or invalid signature (naming ``what`` was signed).
    """
    try:
        Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise ProtocolError(f"{what} signature is invalid") from None


def check_identity_public(raw: object, who: str) -> bytes:
    """Validate a raw Ed25519 public key given for ``who``.

    Raises:
        KeyMaterialError: not 32 bytes or not a valid Ed25519 point encoding.
    """
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != KEY_BYTES:
        raise KeyMaterialError(f"identity key of {who!r} must be 32 raw Ed25519 public bytes, got {raw!r:.40}")
    try:
        Ed25519PublicKey.from_public_bytes(bytes(raw))
    except ValueError:
        raise KeyMaterialError(f"identity key of {who!r} is not a valid Ed25519 public key") from None
    return bytes(raw)


# ----------------------------------------------------------------------------- keystream PRG


def _ctr(seed: bytes) -> CipherContext:
    if len(seed) != KEY_BYTES:
        raise KeyMaterialError(f"keystream seeds are {KEY_BYTES} bytes, got {len(seed)}")
    # AES-256 keyed with the whole 256-bit seed; every seed keys one stream, so a fixed IV is safe.
    return Cipher(algorithms.AES(seed), modes.CTR(_ZERO_IV)).encryptor()


def keystream(seed: bytes, nbytes: int) -> bytes:
    """The first ``nbytes`` of the AES-256-CTR keystream keyed by ``seed``."""
    return _ctr(seed).update(bytes(nbytes))


def fill_keystream(seed: bytes, out: np.ndarray) -> np.ndarray:
    """Overwrite the C-contiguous array ``out`` with keystream bytes (little-endian words)."""
    enc = _ctr(seed)
    view = out.data.cast("B")
    for start in range(0, len(view), _CHUNK_BYTES):
        part = view[start : start + _CHUNK_BYTES]
        enc.update_into(_ZEROS[: len(part)], part)
    return out


def add_keystreams(acc: np.ndarray, streams: Iterable[tuple[bytes, int]]) -> np.ndarray:
    """Add (sign +1) or subtract (sign -1) the keystream of each seed into ``acc`` in place.

    ``acc`` is a C-contiguous 1-D uint32 or uint64 array (the ring Z_2^b); the keystream
    is read as little-endian words of the same width, so arithmetic wraps modulo 2^b.
    Work proceeds chunk by chunk over all streams, so the accumulator slice and the
    keystream buffer stay in cache; no Python operation runs per coordinate.
    """
    if acc.ndim != 1 or not acc.flags.c_contiguous or acc.dtype not in (np.uint32, np.uint64):
        raise TypeError(f"acc must be a contiguous 1-D uint32/uint64 array, got {acc.dtype} {acc.shape}")
    plan: list[tuple[CipherContext, bool]] = []
    for seed, sign in streams:
        if sign not in (1, -1):
            raise ValueError(f"stream sign must be +1 or -1, got {sign!r}")
        plan.append((_ctr(seed), sign > 0))
    if not plan or acc.size == 0:
        return acc
    itemsize = acc.dtype.itemsize
    words = _CHUNK_BYTES // itemsize
    buf = np.empty(words, dtype=acc.dtype.newbyteorder("<"))
    raw = buf.data.cast("B")
    for start in range(0, acc.size, words):
        seg = acc[start : start + words]
        m = seg.size
        zeros, out, vals = _ZEROS[: m * itemsize], raw[: m * itemsize], buf[:m]
        for enc, plus in plan:
            enc.update_into(zeros, out)
            if plus:
                np.add(seg, vals, out=seg)
            else:
                np.subtract(seg, vals, out=seg)
    return acc


def random_secret() -> bytes:
    """32 uniformly random bytes from the OS generator."""
    return os.urandom(KEY_BYTES)


def all_labels() -> Sequence[str]:
    return (
        LABEL_SHARE_TRANSPORT,
        LABEL_PAIRWISE_MASK,
        LABEL_SELF_MASK,
        LABEL_SELF_MASK_COMMITMENT,
        LABEL_ADVERTISEMENT,
        LABEL_SHARE_AAD,
        LABEL_GRAPH,
        LABEL_GRAPH_SEED,
        LABEL_SETUP,
        LABEL_AD_DIGEST,
        LABEL_SHARE_DIGEST,
        LABEL_MESSAGE,
        LABEL_SURVIVORS,
    )
