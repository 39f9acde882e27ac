"""Versioned byte formats of the masked secure-aggregation messages (no pickle).

Every message starts with the same 12-byte header::

    magic    2 bytes   b"SA"
    version  1 byte    PROTOCOL_VERSION (2)
    kind     1 byte    MessageKind
    round    8 bytes   unsigned big-endian round index

followed by the kind's fields in the order of its dataclass. Field encodings: ``u8``,
``u32``, ``u64`` big-endian unsigned integers; ``str`` = u16 length + UTF-8; ``bytes`` =
u32 length + raw; digests and keys = 32 raw bytes; lists = u32 count + items. A masked
vector is ``u8 bits``, ``u64 length``, ``u8 pad`` and ``pad`` zero bytes (so the payload
starts at a multiple of 8 and is read in place as aligned words), then ``length * bits / 8``
little-endian bytes.

Every message a client sends ends with a signature trailer: ``u8`` 0 (unsigned round) or 64,
then an Ed25519 signature by the sender's identity key over SHA-256 of the label
``client-message`` followed by every byte before the trailer (header included, so the
signature is bound to the round, the kind and hence the stage). :func:`signed_body` returns
those bytes. A key advertisement carries its own signature instead (over its fields and the
round set-up it answers), so that clients can check each other's through the server.

Parsing is strict: a wrong magic, version or kind, a truncated field, a count larger than
the bytes left, invalid UTF-8 or trailing bytes all raise :class:`ProtocolError`, the one
exception type of every malformed message.

Who sends what (stage: message down / message up):

* ADVERTISE_KEYS: server -> all :class:`RoundSetup`; client -> server :class:`KeyAdvertisement`.
* SHARE_KEYS: server -> client :class:`KeyList` (the digest of every advertisement, from which
  the graph seed is derived, and its neighbours' advertisements in full); client -> server
  :class:`ShareBundle` (one AES-GCM sealed share pair per neighbour, a digest of every share).
* MASKED_INPUT: server -> client :class:`ShareDelivery` (sealed shares addressed to it);
  client -> server :class:`MaskedInput`.
* CONSISTENCY_CHECK (signed rounds): server -> client :class:`SurvivorSet` (who sent a masked
  input); client -> server :class:`SurvivorSignature` (its signature over that set).
* UNMASK: server -> client :class:`UnmaskRequest` (its alive holders and, signed, their
  signatures); client -> server :class:`UnmaskResponse`.

The server never sees a plaintext share until the unmask stage, and then only one of the
two shares (self-mask seed or mask key) per peer from each honest client.
"""

from __future__ import annotations

import builtins
import enum
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:
    from typing import Mapping

    import numpy as np

from . import _primitives as prim
from .base import Stage
from .errors import ProtocolError

__all__ = [
    "HEADER_BYTES",
    "KeyAdvertisement",
    "KeyList",
    "MaskedInput",
    "Message",
    "MessageKind",
    "RoundSetup",
    "SealedShare",
    "ShareBundle",
    "ShareDelivery",
    "ShareDigest",
    "SurvivorSet",
    "SurvivorSignature",
    "UnmaskRequest",
    "UnmaskResponse",
    "decode_directory",
    "decode_message",
    "encode_directory",
    "message_kind",
    "message_sender",
    "signed_body",
]

MAGIC = b"SA"
HEADER_BYTES = 12
_HEADER = struct.Struct(">2sBBQ")
_MAX_ROUND = (1 << 64) - 1


class MessageKind(enum.IntEnum):
    """Kind byte of each message; ``.stage`` is the stage it belongs to, ``.label`` its name."""

    ROUND_SETUP = 1
    KEY_ADVERTISEMENT = 2
    KEY_LIST = 3
    SHARE_BUNDLE = 4
    SHARE_DELIVERY = 5
    MASKED_INPUT = 6
    UNMASK_REQUEST = 7
    UNMASK_RESPONSE = 8
    SURVIVOR_SET = 9
    SURVIVOR_SIGNATURE = 10

    @property
    def stage(self) -> Stage:
        """The protocol stage in which this kind of message travels."""
        return _STAGE_OF[self]

    @property
    def label(self) -> str:
        """Lower-case name, used to count bytes per message kind."""
        return self.name.lower()


_STAGE_OF = {
    MessageKind.ROUND_SETUP: Stage.ADVERTISE_KEYS,
    MessageKind.KEY_ADVERTISEMENT: Stage.ADVERTISE_KEYS,
    MessageKind.KEY_LIST: Stage.SHARE_KEYS,
    MessageKind.SHARE_BUNDLE: Stage.SHARE_KEYS,
    MessageKind.SHARE_DELIVERY: Stage.MASKED_INPUT,
    MessageKind.MASKED_INPUT: Stage.MASKED_INPUT,
    MessageKind.SURVIVOR_SET: Stage.CONSISTENCY_CHECK,
    MessageKind.SURVIVOR_SIGNATURE: Stage.CONSISTENCY_CHECK,
    MessageKind.UNMASK_REQUEST: Stage.UNMASK,
    MessageKind.UNMASK_RESPONSE: Stage.UNMASK,
}


# ----------------------------------------------------------------------------- codec


class _Writer:
    def __init__(self, kind: MessageKind, round_index: int) -> None:
        if isinstance(round_index, bool) or not isinstance(round_index, int) or not 0 <= round_index <= _MAX_ROUND:
            raise ValueError(f"round_index must be an int in [0, 2^64), got {round_index!r}")
        self.parts: list[bytes] = [_HEADER.pack(MAGIC, prim.PROTOCOL_VERSION, int(kind), round_index)]

    def u8(self, v: int) -> "_Writer":
        self.parts.append(struct.pack(">B", v))
        return self

    def u32(self, v: int) -> "_Writer":
        self.parts.append(struct.pack(">I", v))
        return self

    def u64(self, v: int) -> "_Writer":
        self.parts.append(struct.pack(">Q", v))
        return self

    def str(self, v: str) -> "_Writer":
        raw = v.encode("utf-8")
        if len(raw) > 0xFFFF:
            raise ValueError(f"client id longer than 65535 bytes: {v[:20]!r}...")
        self.parts.append(struct.pack(">H", len(raw)) + raw)
        return self

    def bytes(self, v: bytes) -> "_Writer":
        self.parts.append(struct.pack(">I", len(v)))
        self.parts.append(bytes(v))
        return self

    def strs(self, vs: tuple[builtins.str, ...]) -> "_Writer":
        self.u32(len(vs))
        for v in vs:
            self.str(v)
        return self

    def raw(self, v) -> "_Writer":
        self.parts.append(v)
        return self

    def trailer(self, signature: builtins.bytes) -> "_Writer":
        """The signature trailer of a client message: u8 length (0 or 64), then the signature."""
        if len(signature) not in (0, prim.SIGNATURE_BYTES):
            raise ValueError(f"signature must be empty or {prim.SIGNATURE_BYTES} bytes, got {len(signature)}")
        self.parts.append(bytes([len(signature)]) + bytes(signature))
        return self

    def done(self) -> builtins.bytes:
        return b"".join(self.parts)


class _Reader:
    def __init__(self, data: bytes, kind: MessageKind) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ProtocolError(f"a message must be bytes, got {type(data).__name__}")
        self.view = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
        self.pos = 0
        magic, version, got_kind, round_index = self._unpack(_HEADER)
        if magic != MAGIC:
            raise ProtocolError(f"not a secagg message (magic {bytes(magic)!r})")
        if version != prim.PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {version} is not supported (expected {prim.PROTOCOL_VERSION})")
        if got_kind != int(kind):
            try:
                name = MessageKind(got_kind).name
            except ValueError:
                name = f"unknown kind {got_kind}"
            raise ProtocolError(f"expected a {kind.name} message, got {name}")
        self.round_index = round_index

    def _unpack(self, st: struct.Struct):
        end = self.pos + st.size
        if end > len(self.view):
            raise ProtocolError(f"message truncated at byte {self.pos} (needs {st.size} more)")
        vals = st.unpack_from(self.view, self.pos)
        self.pos = end
        return vals

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.view):
            raise ProtocolError(f"message truncated at byte {self.pos} (field of {n} bytes)")
        out = self.view[self.pos : end]
        self.pos = end
        return out

    def u8(self) -> int:
        return self._unpack(_U8)[0]

    def u32(self) -> int:
        return self._unpack(_U32)[0]

    def u64(self) -> int:
        return self._unpack(_U64)[0]

    def str(self) -> str:
        (n,) = self._unpack(_U16)
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("client id is not valid UTF-8") from None

    def bytes(self) -> bytes:
        return bytes(self.take(self.u32()))

    def fixed(self, n: int) -> builtins.bytes:
        return bytes(self.take(n))

    def count(self, min_item: int) -> int:
        n = self.u32()
        if n * min_item > len(self.view) - self.pos:
            raise ProtocolError(f"list of {n} items cannot fit in the {len(self.view) - self.pos} bytes left")
        return n

    def strs(self) -> tuple[builtins.str, ...]:
        return tuple(self.str() for _ in range(self.count(2)))

    def trailer(self) -> builtins.bytes:
        n = self.u8()
        if n not in (0, prim.SIGNATURE_BYTES):
            raise ProtocolError(f"signature length must be 0 or {prim.SIGNATURE_BYTES}, got {n}")
        return self.fixed(n)

    def end(self) -> None:
        if self.pos != len(self.view):
            raise ProtocolError(f"{len(self.view) - self.pos} trailing bytes after the message")


_U8, _U16, _U32, _U64 = struct.Struct(">B"), struct.Struct(">H"), struct.Struct(">I"), struct.Struct(">Q")


def _key(v: bytes, what: str) -> bytes:
    if len(v) != prim.KEY_BYTES:
        raise ProtocolError(f"{what} must be {prim.KEY_BYTES} bytes, got {len(v)}")
    return v


# ----------------------------------------------------------------------------- messages


def signed_body(data: bytes | bytearray | memoryview, signature: bytes) -> memoryview:
    """The bytes a client message's trailer signature covers: all before the trailer."""
    view = memoryview(data)
    return view[: len(view) - 1 - len(signature)]


def message_signature_digest(body: bytes | bytearray | memoryview) -> bytes:
    """What an identity key signs for a client message: SHA-256 of the label and the body."""
    return prim.message_digest(prim.LABEL_MESSAGE, body)


@dataclass(frozen=True)
class RoundSetup:
    """Server -> every participant: the round's parameters (stage ADVERTISE_KEYS).

    Each client checks them against the floor it plans itself from the public configuration,
    and signs their digest inside its advertisement, so that clients shown different set-ups
    refuse each other's keys. There is no graph seed here: it is derived from the
    advertisements (see :class:`KeyList`), after every key is in.
    """

    round_index: int
    participants: tuple[str, ...]
    threshold: int
    degree: int
    bits: int
    length: int
    signed: bool

    kind = MessageKind.ROUND_SETUP

    def to_bytes(self) -> bytes:
        """The wire format (see the module docstring)."""
        return (
            _Writer(self.kind, self.round_index)
            .strs(self.participants)
            .u32(self.threshold)
            .u32(self.degree)
            .u8(self.bits)
            .u64(self.length)
            .u8(1 if self.signed else 0)
            .done()
        )

    def digest(self) -> bytes:
        """SHA-256 of the labelled wire bytes: what advertisements bind."""
        return prim.message_digest(prim.LABEL_SETUP, self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> "RoundSetup":
        """Parse the wire format; raises ProtocolError on malformed bytes."""
        r = _Reader(data, cls.kind)
        participants = r.strs()
        threshold, degree = r.u32(), r.u32()
        bits, length, signed = r.u8(), r.u64(), r.u8()
        r.end()
        if signed not in (0, 1):
            raise ProtocolError(f"signed flag must be 0 or 1, got {signed}")
        return cls(r.round_index, participants, threshold, degree, bits, length, bool(signed))


@dataclass(frozen=True)
class KeyAdvertisement:
    """Client -> server: its two X25519 public keys and a commitment to its self-mask seed.

    ``enc_public`` keys share transport, ``mask_public`` the pairwise masks; ``commitment``
    is SHA-256 of the labelled seed, so a rebuilt seed can be checked; ``setup_digest`` the
    digest of the round set-up it answers. ``signature`` is empty, or an Ed25519 signature
    over :meth:`signed_bytes` by the sender's identity key.
    """

    round_index: int
    sender: str
    enc_public: bytes
    mask_public: bytes
    commitment: bytes
    setup_digest: bytes
    signature: bytes = b""

    kind = MessageKind.KEY_ADVERTISEMENT

    def signed_bytes(self) -> bytes:
        """What the identity key signs: purpose, round, sender, both public keys, commitment, set-up."""
        return prim.label(
            prim.LABEL_ADVERTISEMENT,
            self.round_index,
            self.sender,
            self.enc_public,
            self.mask_public,
            self.commitment,
            self.setup_digest,
        )

    def digest(self) -> bytes:
        """SHA-256 of the labelled fields and signature: this advertisement's entry in the roster."""
        return prim.digest(prim.LABEL_AD_DIGEST, self.signed_bytes(), self.signature)

    def _write_body(self, w: _Writer) -> _Writer:
        if len(self.signature) not in (0, prim.SIGNATURE_BYTES):
            raise ValueError(f"signature must be empty or {prim.SIGNATURE_BYTES} bytes, got {len(self.signature)}")
        return (
            w.str(self.sender)
            .raw(_key(self.enc_public, "enc_public"))
            .raw(_key(self.mask_public, "mask_public"))
            .raw(_key(self.commitment, "commitment"))
            .raw(_key(self.setup_digest, "setup_digest"))
            .trailer(self.signature)
        )

    @classmethod
    def _read_body(cls, r: _Reader, round_index: int) -> "KeyAdvertisement":
        sender = r.str()
        enc, mask, commit, setup = r.fixed(32), r.fixed(32), r.fixed(32), r.fixed(32)
        return cls(round_index, sender, enc, mask, commit, setup, r.trailer())

    def to_bytes(self) -> bytes:
        """The wire format (see the module docstring)."""
        return self._write_body(_Writer(self.kind, self.round_index)).done()

    @classmethod
    def from_bytes(cls, data: bytes) -> "KeyAdvertisement":
        """Parse the wire format; raises ProtocolError on malformed bytes."""
        r = _Reader(data, cls.kind)
        out = cls._read_body(r, r.round_index)
        r.end()
        return out


@dataclass(frozen=True)
class KeyList:
    """Server -> client (SHARE_KEYS): the roster of every advertisement and its neighbours' in full.

    ``roster`` lists ``(sender, digest)`` of every advertisement the server accepted, in
    participant order; the graph seed is a hash of it, so it is fixed only once every key is
    in. ``advertisements`` are those of the recipient's neighbours in that graph.
    """

    round_index: int
    recipient: str
    roster: tuple[tuple[str, bytes], ...]
    advertisements: tuple[KeyAdvertisement, ...]

    kind = MessageKind.KEY_LIST

    def to_bytes(self) -> bytes:
        """The wire format (see the module docstring)."""
        w = _Writer(self.kind, self.round_index).str(self.recipient).u32(len(self.roster))
        for sender, digest in self.roster:
            w.str(sender).raw(_key(digest, "advertisement digest"))
        w.u32(len(self.advertisements))
        for ad in self.advertisements:
            if ad.round_index != self.round_index:
                raise ValueError(f"advertisement of {ad.sender!r} is for round {ad.round_index}, not {self.round_index}")
            ad._write_body(w)
        return w.done()

    @classmethod
    def from_bytes(cls, data: bytes) -> "KeyList":
        """Parse the wire format; raises ProtocolError on malformed bytes."""
        r = _Reader(data, cls.kind)
        recipient = r.str()
        roster = tuple((r.str(), r.fixed(32)) for _ in range(r.count(34)))
        ads = tuple(KeyAdvertisement._read_body(r, r.round_index) for _ in range(r.count(131)))
        r.end()
        return cls(r.round_index, recipient, roster, ads)


@dataclass(frozen=True)
class SealedShare:
    """One AES-GCM sealed pair of shares; ``peer`` is the receiver (in a bundle) or the sender (in a delivery)."""

    peer: str
    blob: bytes


@dataclass(frozen=True)
class ShareDigest:
    """Digests of the two shares one holder got from the owner (checked when the holder reveals one)."""

    holder: str
    seed_share: bytes
    key_share: bytes


def _write_sealed(w: _Writer, entries: tuple[SealedShare, ...]) -> _Writer:
    w.u32(len(entries))
    for e in entries:
        w.str(e.peer).bytes(e.blob)
    return w


def _read_sealed(r: _Reader) -> tuple[SealedShare, ...]:
    return tuple(SealedShare(r.str(), r.bytes()) for _ in range(r.count(6)))


@dataclass(frozen=True)
class ShareBundle:
    """Client -> server: sealed shares of its self-mask seed and mask key, one per neighbour.

    ``digests`` hold, for every holder (itself included), SHA-256 digests of its two shares:
    the server checks each revealed share against them, so a corrupted share is found and its
    sender named. Shares are uniform field elements, so their digests reveal nothing.
    """

    round_index: int
    sender: str
    shares: tuple[SealedShare, ...]
    digests: tuple[ShareDigest, ...]
    signature: bytes = b""

    kind = MessageKind.SHARE_BUNDLE

    def to_bytes(self) -> bytes:
        """The wire format (see the module docstring)."""
        w = _write_sealed(_Writer(self.kind, self.round_index).str(self.sender), self.shares).u32(len(self.digests))
        for d in self.digests:
            w.str(d.holder).raw(_key(d.seed_share, "share digest")).raw(_key(d.key_share, "share digest"))
        return w.trailer(self.signature).done()

    @classmethod
    def from_bytes(cls, data: bytes) -> "ShareBundle":
        """Parse the wire format; raises ProtocolError on malformed bytes."""
        r = _Reader(data, cls.kind)
        sender = r.str()
        shares = _read_sealed(r)
        digests = tuple(ShareDigest(r.str(), r.fixed(32), r.fixed(32)) for _ in range(r.count(66)))
        signature = r.trailer()
        r.end()
        return cls(r.round_index, sender, shares, digests, signature)


@dataclass(frozen=True)
class ShareDelivery:
    """Server -> client: the sealed shares its neighbours addressed to it (MASKED_INPUT)."""

    round_index: int
    recipient: str
    shares: tuple[SealedShare, ...]

    kind = MessageKind.SHARE_DELIVERY

    def to_bytes(self) -> bytes:
        """The wire format (see the module docstring)."""
        return _write_sealed(_Writer(self.kind, self.round_index).str(self.recipient), self.shares).done()

    @classmethod
    def from_bytes(cls, data: bytes) -> "ShareDelivery":
        """Parse the wire format; raises ProtocolError on malformed bytes."""
        r = _Reader(data, cls.kind)
        recipient = r.str()
        shares = _read_sealed(r)
        r.end()
        return cls(r.round_index, recipient, shares)


@dataclass(frozen=True)
class MaskedInput:
    """Client -> server: its masked vector, packed at ``bits`` bits per coordinate.

    ``payload`` is ``length * bits / 8`` little-endian bytes (a read-only view after parsing).
    """

    round_index: int
    sender: str
    bits: int
    length: int
    payload: bytes | memoryview
    signature: bytes = b""

    kind = MessageKind.MASKED_INPUT

    @classmethod
    def _head(cls, round_index: int, sender: str, bits: int, length: int) -> bytes:
        head = _Writer(cls.kind, round_index).str(sender).u8(bits).u64(length).done()
        pad = -(len(head) + 1) % 8
        return head + bytes([pad]) + bytes(pad)

    def to_bytes(self) -> bytes:
        """The wire format: the masked vector packed at ``bits`` per coordinate, then the trailer."""
        if len(self.payload) * 8 != self.length * self.bits:
            raise ValueError(f"payload of {len(self.payload)} bytes does not hold {self.length} x {self.bits} bits")
        if len(self.signature) not in (0, prim.SIGNATURE_BYTES):
            raise ValueError(f"signature must be empty or {prim.SIGNATURE_BYTES} bytes, got {len(self.signature)}")
        head = self._head(self.round_index, self.sender, self.bits, self.length)
        return head + bytes(self.payload) + bytes([len(self.signature)]) + bytes(self.signature)

    @classmethod
    def allocate(
        cls, round_index: int, sender: str, bits: int, length: int, *, signed: bool = False
    ) -> tuple[bytearray, "np.ndarray"]:
        """A message buffer and a writable, aligned view of its payload as ``length`` ring words.

        Lets a client mask its vector in place inside the outgoing message (no copies); the
        returned ``bytearray`` is the serialized message once the view is filled and, when
        ``signed``, the last 64 bytes hold the signature (see :meth:`sign_in_place`).
        """
        import numpy as np

        if bits not in (32, 64):
            raise ValueError(f"bits must be 32 or 64, got {bits!r}")
        head = cls._head(round_index, sender, bits, length)
        sig = prim.SIGNATURE_BYTES if signed else 0
        out = bytearray(len(head) + length * bits // 8 + 1 + sig)
        out[: len(head)] = head
        out[len(out) - 1 - sig] = sig
        words = np.frombuffer(out, dtype="<u4" if bits == 32 else "<u8", offset=len(head), count=length)
        return out, words

    @staticmethod
    def sign_in_place(message: bytearray, identity_key) -> None:
        """Write the trailer signature of an :meth:`allocate` d, signed, filled message."""
        body = memoryview(message)[: len(message) - 1 - prim.SIGNATURE_BYTES]
        message[len(message) - prim.SIGNATURE_BYTES :] = prim.sign(identity_key, message_signature_digest(body))

    @classmethod
    def from_bytes(cls, data: bytes) -> "MaskedInput":
        """Parse the wire format; raises ProtocolError on malformed bytes."""
        r = _Reader(data, cls.kind)
        sender = r.str()
        bits, length = r.u8(), r.u64()
        if bits not in (32, 64):
            raise ProtocolError(f"masked input bits must be 32 or 64, got {bits}")
        pad = r.u8()
        if pad != -r.pos % 8 or any(r.take(pad)):
            raise ProtocolError(f"masked input padding of {pad} bytes is malformed")
        if length > (len(r.view) - r.pos) * 8 // bits:
            raise ProtocolError(f"masked input claims {length} coordinates but holds {len(r.view) - r.pos} bytes")
        payload = r.take(length * bits // 8)
        signature = r.trailer()
        r.end()
        return cls(r.round_index, sender, bits, length, payload, signature)


@dataclass(frozen=True)
class SurvivorSet:
    """Server -> client (CONSISTENCY_CHECK, signed rounds): every client whose masked input arrived."""

    round_index: int
    recipient: str
    alive: tuple[str, ...]

    kind = MessageKind.SURVIVOR_SET

    def to_bytes(self) -> bytes:
        """The wire format (see the module docstring)."""
        return _Writer(self.kind, self.round_index).str(self.recipient).strs(self.alive).done()

    @classmethod
    def from_bytes(cls, data: bytes) -> "SurvivorSet":
        """Parse the wire format; raises ProtocolError on malformed bytes."""
        r = _Reader(data, cls.kind)
        recipient = r.str()
        alive = r.strs()
        r.end()
        return cls(r.round_index, recipient, alive)


def survivor_digest(round_index: int, setup_digest: bytes, alive: tuple[str, ...]) -> bytes:
    """The digest clients sign in the consistency check: round, set-up and survivor set."""
    return prim.digest(prim.LABEL_SURVIVORS, round_index, setup_digest, *alive)


@dataclass(frozen=True)
class SurvivorSignature:
    """Client -> server (CONSISTENCY_CHECK): the digest of the survivor set it was shown, signed.

    The trailer signature is over these bytes, so the server can forward ``(sender,
    signature)`` and any neighbour rebuilds the body from its own survivor set to verify it.
    """

    round_index: int
    sender: str
    set_digest: bytes
    signature: bytes = b""

    kind = MessageKind.SURVIVOR_SIGNATURE

    def to_bytes(self) -> bytes:
        """The wire format (see the module docstring)."""
        w = _Writer(self.kind, self.round_index).str(self.sender).raw(_key(self.set_digest, "survivor-set digest"))
        return w.trailer(self.signature).done()

    def body(self) -> bytes:
        """The bytes the signature covers (the wire format without its trailer)."""
        return _Writer(self.kind, self.round_index).str(self.sender).raw(_key(self.set_digest, "survivor-set digest")).done()

    @classmethod
    def from_bytes(cls, data: bytes) -> "SurvivorSignature":
        """Parse the wire format; raises ProtocolError on malformed bytes."""
        r = _Reader(data, cls.kind)
        sender = r.str()
        digest = r.fixed(32)
        signature = r.trailer()
        r.end()
        return cls(r.round_index, sender, digest, signature)


@dataclass(frozen=True)
class UnmaskRequest:
    """Server -> client: which of its holders (neighbours and itself) sent a masked input.

    In signed rounds ``signatures`` carry its neighbours' survivor signatures ``(signer,
    signature)``; the client answers only if at least ``threshold`` of its holders signed
    the very set it signed. Its dropped neighbours are those that shared with it but are
    not listed alive.
    """

    round_index: int
    recipient: str
    alive: tuple[str, ...]
    signatures: tuple[tuple[str, bytes], ...] = ()

    kind = MessageKind.UNMASK_REQUEST

    def to_bytes(self) -> bytes:
        """The wire format (see the module docstring)."""
        w = _Writer(self.kind, self.round_index).str(self.recipient).strs(self.alive).u32(len(self.signatures))
        for signer, sig in self.signatures:
            if len(sig) != prim.SIGNATURE_BYTES:
                raise ValueError(f"signature of {signer!r} must be {prim.SIGNATURE_BYTES} bytes, got {len(sig)}")
            w.str(signer).raw(sig)
        return w.done()

    @classmethod
    def from_bytes(cls, data: bytes) -> "UnmaskRequest":
        """Parse the wire format; raises ProtocolError on malformed bytes."""
        r = _Reader(data, cls.kind)
        recipient = r.str()
        alive = r.strs()
        sigs = tuple((r.str(), r.fixed(prim.SIGNATURE_BYTES)) for _ in range(r.count(66)))
        r.end()
        return cls(r.round_index, recipient, alive, sigs)


@dataclass(frozen=True)
class UnmaskResponse:
    """Client -> server: its shares of alive peers' self-mask seeds and dropped peers' mask keys."""

    round_index: int
    sender: str
    self_mask_shares: tuple[tuple[str, bytes], ...]
    mask_key_shares: tuple[tuple[str, bytes], ...]
    signature: bytes = b""

    kind = MessageKind.UNMASK_RESPONSE

    def to_bytes(self) -> bytes:
        """The wire format (see the module docstring)."""
        w = _Writer(self.kind, self.round_index).str(self.sender)
        for group in (self.self_mask_shares, self.mask_key_shares):
            w.u32(len(group))
            for owner, share in group:
                w.str(owner).bytes(share)
        return w.trailer(self.signature).done()

    @classmethod
    def from_bytes(cls, data: bytes) -> "UnmaskResponse":
        """Parse the wire format; raises ProtocolError on malformed bytes."""
        r = _Reader(data, cls.kind)
        sender = r.str()
        groups = [tuple((r.str(), r.bytes()) for _ in range(r.count(6))) for _ in range(2)]
        signature = r.trailer()
        r.end()
        return cls(r.round_index, sender, groups[0], groups[1], signature)


_CLASSES = (
    RoundSetup,
    KeyAdvertisement,
    KeyList,
    ShareBundle,
    ShareDelivery,
    MaskedInput,
    SurvivorSet,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskResponse,
)
Message = Union[
    RoundSetup,
    KeyAdvertisement,
    KeyList,
    ShareBundle,
    ShareDelivery,
    MaskedInput,
    SurvivorSet,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskResponse,
]
_BY_KIND = {cls.kind: cls for cls in _CLASSES}


def sign_message(unsigned: bytes, identity_key) -> bytes:
    """Replace the empty trailer of a client message's wire bytes by its signature."""
    if not unsigned or unsigned[-1] != 0:
        raise ValueError("sign_message takes the wire bytes of a message with an empty signature trailer")
    body = unsigned[:-1]
    return body + bytes([prim.SIGNATURE_BYTES]) + prim.sign(identity_key, message_signature_digest(body))


def verify_message(data: bytes | bytearray | memoryview, signature: bytes, public_raw: bytes, what: str) -> None:
    """Check the trailer signature of a parsed client message against its sender's identity key.

    Raises:
        ProtocolError: no signature, or one that does not verify (a changed byte anywhere).
    """
    if not signature:
        raise ProtocolError(f"{what} carries no signature in a signed round")
    prim.verify(public_raw, signature, message_signature_digest(signed_body(data, signature)), what=what)


DIRECTORY_FORMAT = """Public-key directory (the masked server session's public context in signed mode):

    magic    4 bytes   b"SAID"
    version  1 byte    PROTOCOL_VERSION
    count    u32       number of entries, then per entry in sorted id order:
    id       str       u16 length + UTF-8 client id
    key      32 bytes  raw Ed25519 public key
"""
_DIRECTORY_MAGIC = b"SAID"


def encode_directory(identities: "Mapping[str, bytes]") -> bytes:
    """The federation's identity public keys as bytes (:data:`DIRECTORY_FORMAT`).

    Raises:
        KeyMaterialError: an entry that is not a valid raw Ed25519 public key.
    """
    out = [_DIRECTORY_MAGIC, bytes([prim.PROTOCOL_VERSION]), struct.pack(">I", len(identities))]
    for cid in sorted(identities):
        raw = cid.encode("utf-8")
        out += [struct.pack(">H", len(raw)), raw, prim.check_identity_public(identities[cid], cid)]
    return b"".join(out)


def decode_directory(data: bytes) -> dict[str, bytes]:
    """Parse :data:`DIRECTORY_FORMAT`.

    Raises:
        ProtocolError: malformed bytes; KeyMaterialError: an invalid key.
    """
    if not isinstance(data, (bytes, bytearray)) or bytes(data[:4]) != _DIRECTORY_MAGIC or len(data) < 9:
        raise ProtocolError("public context is not a secagg identity directory (magic b'SAID')")
    if data[4] != prim.PROTOCOL_VERSION:
        raise ProtocolError(f"identity directory of version {data[4]}, expected {prim.PROTOCOL_VERSION}")
    (count,) = struct.unpack_from(">I", data, 5)
    pos, out = 9, {}
    for _ in range(count):
        if pos + 2 > len(data):
            raise ProtocolError("identity directory truncated")
        (n,) = struct.unpack_from(">H", data, pos)
        end = pos + 2 + n + prim.KEY_BYTES
        if end > len(data):
            raise ProtocolError("identity directory truncated")
        try:
            cid = bytes(data[pos + 2 : pos + 2 + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("identity directory holds an id that is not UTF-8") from None
        out[cid] = prim.check_identity_public(bytes(data[pos + 2 + n : end]), cid)
        pos = end
    if pos != len(data):
        raise ProtocolError(f"{len(data) - pos} trailing bytes after the identity directory")
    return out


def message_kind(data: bytes) -> MessageKind:
    """The kind byte of a message, without parsing the rest (to dispatch it).

    Raises:
        ProtocolError: not bytes, shorter than the header, or of an unknown kind.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"a message must be bytes, got {type(data).__name__}")
    if len(data) < HEADER_BYTES:
        raise ProtocolError(f"message shorter than the {HEADER_BYTES}-byte header")
    try:
        return MessageKind(data[3])
    except ValueError:
        raise ProtocolError(f"unknown message kind {data[3]}") from None


def message_sender(data: bytes) -> str:
    """The sender field of a client-to-server message (the str right after the header).

    Raises:
        ProtocolError: malformed header or sender field.
    """
    kind = message_kind(data)
    r = _Reader(data, kind)
    return r.str()


def decode_message(data: bytes) -> Message:
    """Parse any message by its kind byte.

    Raises:
        ProtocolError: malformed, truncated, of another version, or of an unknown kind.
    """
    return _BY_KIND[message_kind(data)].from_bytes(data)
