"""Versioned byte formats of the masked secure-aggregation messages (no pickle).

Every message starts with the same 12-byte header::

    magic    2 bytes   b"SA"
    version  1 byte    PROTOCOL_VERSION (1)
    kind     1 byte    MessageKind
    round    8 bytes   unsigned big-endian round index

followed by the kind's fields in the order of its dataclass. Field encodings: ``u8``,
``u32``, ``u64`` big-endian unsigned integers; ``str`` = u16 length + UTF-8; ``bytes`` =
u32 length + raw; lists = u32 count + items. A masked vector is ``u8 bits``, ``u64
length``, ``u8 pad`` and ``pad`` zero bytes (so the payload starts at a multiple of 8 and
is read in place as aligned words), then ``length * bits / 8`` little-endian bytes (packed
at b bits per coordinate).

Parsing is strict: a wrong magic, version or kind, a truncated field, a count larger than
the bytes left, invalid UTF-8 or trailing bytes all raise :class:`ProtocolError`, the one
exception type of every malformed message.

Who sends what (stage: message up / message down):

* ADVERTISE_KEYS: server -> all :class:`RoundSetup`; client -> server :class:`KeyAdvertisement`.
* SHARE_KEYS: server -> client :class:`KeyList` (its neighbours' advertisements);
  client -> server :class:`ShareBundle` (one AES-GCM sealed share pair per neighbour).
* MASKED_INPUT: server -> client :class:`ShareDelivery` (sealed shares addressed to it);
  client -> server :class:`MaskedInput`.
* UNMASK: server -> client :class:`UnmaskRequest`; client -> server :class:`UnmaskResponse`.

The server never sees a plaintext share until the unmask stage, and then only one of the
two shares (self-mask seed or mask key) per peer from each honest client.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Union

from . import _primitives as prim
from .base import Stage
from .errors import ProtocolError

__all__ = [
    "MessageKind",
    "RoundSetup",
    "KeyAdvertisement",
    "KeyList",
    "SealedShare",
    "ShareBundle",
    "ShareDelivery",
    "MaskedInput",
    "UnmaskRequest",
    "UnmaskResponse",
    "Message",
    "decode_message",
    "message_kind",
    "message_sender",
    "HEADER_BYTES",
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

    @property
    def stage(self) -> Stage:
        """The protocol stage in which this kind of message travels."""
        return {
            1: Stage.ADVERTISE_KEYS,
            2: Stage.ADVERTISE_KEYS,
            3: Stage.SHARE_KEYS,
            4: Stage.SHARE_KEYS,
            5: Stage.MASKED_INPUT,
            6: Stage.MASKED_INPUT,
            7: Stage.UNMASK,
            8: Stage.UNMASK,
        }[int(self)]

    @property
    def label(self) -> str:
        """Lower-case name, used to count bytes per message kind."""
        return self.name.lower()


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

    def strs(self, vs: tuple[str, ...]) -> "_Writer":
        self.u32(len(vs))
        for v in vs:
            self.str(v)
        return self

    def raw(self, v) -> "_Writer":
        self.parts.append(v)
        return self

    def done(self) -> bytes:
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

    def fixed(self, n: int) -> bytes:
        return bytes(self.take(n))

    def count(self, min_item: int) -> int:
        n = self.u32()
        if n * min_item > len(self.view) - self.pos:
            raise ProtocolError(f"list of {n} items cannot fit in the {len(self.view) - self.pos} bytes left")
        return n

    def strs(self) -> tuple[str, ...]:
        return tuple(self.str() for _ in range(self.count(2)))

    def end(self) -> None:
        if self.pos != len(self.view):
            raise ProtocolError(f"{len(self.view) - self.pos} trailing bytes after the message")


_U8, _U16, _U32, _U64 = struct.Struct(">B"), struct.Struct(">H"), struct.Struct(">I"), struct.Struct(">Q")


def _key(v: bytes, what: str) -> bytes:
    if len(v) != prim.KEY_BYTES:
        raise ProtocolError(f"{what} must be {prim.KEY_BYTES} bytes, got {len(v)}")
    return v


# ----------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class RoundSetup:
    """Server -> every participant: the round's parameters (stage ADVERTISE_KEYS).

    Clients recompute the neighbour graph from ``participants`` (sorted ids), ``degree``
    and ``graph_seed``; ``signed`` says whether advertisements must carry Ed25519 signatures.
    """

    round_index: int
    participants: tuple[str, ...]
    threshold: int
    degree: int
    graph_seed: bytes
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
            .raw(_key(self.graph_seed, "graph seed"))
            .u8(self.bits)
            .u64(self.length)
            .u8(1 if self.signed else 0)
            .done()
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> "RoundSetup":
        """Parse the wire format; raises ProtocolError on malformed bytes."""
        r = _Reader(data, cls.kind)
        participants = r.strs()
        threshold, degree = r.u32(), r.u32()
        seed = r.fixed(prim.KEY_BYTES)
        bits, length, signed = r.u8(), r.u64(), r.u8()
        r.end()
        if signed not in (0, 1):
            raise ProtocolError(f"signed flag must be 0 or 1, got {signed}")
        return cls(r.round_index, participants, threshold, degree, seed, bits, length, bool(signed))


@dataclass(frozen=True)
class KeyAdvertisement:
    """Client -> server: its two X25519 public keys and a commitment to its self-mask seed.

    ``enc_public`` keys share transport, ``mask_public`` the pairwise masks; ``commitment``
    is SHA-256 of the labelled seed, so a rebuilt seed can be checked. ``signature`` is
    empty, or an Ed25519 signature over :meth:`signed_bytes` by the sender's identity key.
    """

    round_index: int
    sender: str
    enc_public: bytes
    mask_public: bytes
    commitment: bytes
    signature: bytes = b""

    kind = MessageKind.KEY_ADVERTISEMENT

    def signed_bytes(self) -> bytes:
        """What the identity key signs: kind, round, sender and both public keys."""
        return prim.label(
            prim.LABEL_ADVERTISEMENT, self.round_index, self.sender, self.enc_public, self.mask_public, self.commitment
        )

    def _write_body(self, w: _Writer) -> _Writer:
        if len(self.signature) not in (0, prim.SIGNATURE_BYTES):
            raise ValueError(f"signature must be empty or {prim.SIGNATURE_BYTES} bytes, got {len(self.signature)}")
        return (
            w.str(self.sender)
            .raw(_key(self.enc_public, "enc_public"))
            .raw(_key(self.mask_public, "mask_public"))
            .raw(_key(self.commitment, "commitment"))
            .u8(len(self.signature))
            .raw(self.signature)
        )

    @classmethod
    def _read_body(cls, r: _Reader, round_index: int) -> "KeyAdvertisement":
        sender = r.str()
        enc, mask, commit = r.fixed(32), r.fixed(32), r.fixed(32)
        n = r.u8()
        if n not in (0, prim.SIGNATURE_BYTES):
            raise ProtocolError(f"signature length must be 0 or {prim.SIGNATURE_BYTES}, got {n}")
        return cls(round_index, sender, enc, mask, commit, r.fixed(n))

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
    """Server -> client: the advertisements of its neighbours that advertised (SHARE_KEYS)."""

    round_index: int
    recipient: str
    advertisements: tuple[KeyAdvertisement, ...]

    kind = MessageKind.KEY_LIST

    def to_bytes(self) -> bytes:
        """The wire format (see the module docstring)."""
        w = _Writer(self.kind, self.round_index).str(self.recipient).u32(len(self.advertisements))
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
        ads = tuple(KeyAdvertisement._read_body(r, r.round_index) for _ in range(r.count(99)))
        r.end()
        return cls(r.round_index, recipient, ads)


@dataclass(frozen=True)
class SealedShare:
    """One AES-GCM sealed pair of shares; ``peer`` is the receiver (in a bundle) or the sender (in a delivery)."""

    peer: str
    blob: bytes


def _write_sealed(w: _Writer, entries: tuple[SealedShare, ...]) -> _Writer:
    w.u32(len(entries))
    for e in entries:
        w.str(e.peer).bytes(e.blob)
    return w


def _read_sealed(r: _Reader) -> tuple[SealedShare, ...]:
    return tuple(SealedShare(r.str(), r.bytes()) for _ in range(r.count(6)))


@dataclass(frozen=True)
class ShareBundle:
    """Client -> server: sealed shares of its self-mask seed and mask key, one per neighbour."""

    round_index: int
    sender: str
    shares: tuple[SealedShare, ...]

    kind = MessageKind.SHARE_BUNDLE

    def to_bytes(self) -> bytes:
        """The wire format (see the module docstring)."""
        return _write_sealed(_Writer(self.kind, self.round_index).str(self.sender), self.shares).done()

    @classmethod
    def from_bytes(cls, data: bytes) -> "ShareBundle":
        """Parse the wire format; raises ProtocolError on malformed bytes."""
        r = _Reader(data, cls.kind)
        sender = r.str()
        shares = _read_sealed(r)
        r.end()
        return cls(r.round_index, sender, shares)


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

    kind = MessageKind.MASKED_INPUT

    @classmethod
    def _head(cls, round_index: int, sender: str, bits: int, length: int) -> bytes:
        head = _Writer(cls.kind, round_index).str(sender).u8(bits).u64(length).done()
        pad = -(len(head) + 1) % 8
        return head + bytes([pad]) + bytes(pad)

    def to_bytes(self) -> bytes:
        """The wire format: the masked vector packed at ``bits`` per coordinate."""
        if len(self.payload) * 8 != self.length * self.bits:
            raise ValueError(f"payload of {len(self.payload)} bytes does not hold {self.length} x {self.bits} bits")
        return self._head(self.round_index, self.sender, self.bits, self.length) + bytes(self.payload)

    @classmethod
    def allocate(cls, round_index: int, sender: str, bits: int, length: int) -> tuple[bytearray, "np.ndarray"]:
        """A message buffer and a writable, aligned view of its payload as ``length`` ring words.

        Lets a client mask its vector in place inside the outgoing message (no copies);
        the returned ``bytearray`` is the serialized message once the view is filled.
        """
        import numpy as np

        if bits not in (32, 64):
            raise ValueError(f"bits must be 32 or 64, got {bits!r}")
        head = cls._head(round_index, sender, bits, length)
        out = bytearray(len(head) + length * bits // 8)
        out[: len(head)] = head
        words = np.frombuffer(out, dtype="<u4" if bits == 32 else "<u8", offset=len(head))
        return out, words

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
        r.end()
        return cls(r.round_index, sender, bits, length, payload)


@dataclass(frozen=True)
class UnmaskRequest:
    """Server -> client: who sent a masked input (``alive``) and who shared but did not (``dropped``)."""

    round_index: int
    recipient: str
    alive: tuple[str, ...]
    dropped: tuple[str, ...]

    kind = MessageKind.UNMASK_REQUEST

    def to_bytes(self) -> bytes:
        """The wire format (see the module docstring)."""
        return _Writer(self.kind, self.round_index).str(self.recipient).strs(self.alive).strs(self.dropped).done()

    @classmethod
    def from_bytes(cls, data: bytes) -> "UnmaskRequest":
        """Parse the wire format; raises ProtocolError on malformed bytes."""
        r = _Reader(data, cls.kind)
        recipient = r.str()
        alive, dropped = r.strs(), r.strs()
        r.end()
        return cls(r.round_index, recipient, alive, dropped)


@dataclass(frozen=True)
class UnmaskResponse:
    """Client -> server: its shares of alive peers' self-mask seeds and dropped peers' mask keys."""

    round_index: int
    sender: str
    self_mask_shares: tuple[tuple[str, bytes], ...]
    mask_key_shares: tuple[tuple[str, bytes], ...]

    kind = MessageKind.UNMASK_RESPONSE

    def to_bytes(self) -> bytes:
        """The wire format (see the module docstring)."""
        w = _Writer(self.kind, self.round_index).str(self.sender)
        for group in (self.self_mask_shares, self.mask_key_shares):
            w.u32(len(group))
            for owner, share in group:
                w.str(owner).bytes(share)
        return w.done()

    @classmethod
    def from_bytes(cls, data: bytes) -> "UnmaskResponse":
        """Parse the wire format; raises ProtocolError on malformed bytes."""
        r = _Reader(data, cls.kind)
        sender = r.str()
        groups = [tuple((r.str(), r.bytes()) for _ in range(r.count(6))) for _ in range(2)]
        r.end()
        return cls(r.round_index, sender, groups[0], groups[1])


Message = Union[
    RoundSetup, KeyAdvertisement, KeyList, ShareBundle, ShareDelivery, MaskedInput, UnmaskRequest, UnmaskResponse
]
_BY_KIND = {
    cls.kind: cls
    for cls in (RoundSetup, KeyAdvertisement, KeyList, ShareBundle, ShareDelivery, MaskedInput, UnmaskRequest, UnmaskResponse)
}


def message_kind(data: bytes) -> MessageKind:
    """The kind byte of a message, without parsing the rest (to dispatch it).

    Raises:
        ProtocolError: not bytes, shorter than the header, or of an unknown kind.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) < HEADER_BYTES:
        raise ProtocolError(f"a message must be bytes of at least the {HEADER_BYTES}-byte header")
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
    if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) < HEADER_BYTES:
        raise ProtocolError(f"message shorter than the {HEADER_BYTES}-byte header")
    try:
        kind = MessageKind(data[3])
    except ValueError:
        raise ProtocolError(f"unknown message kind {data[3]}") from None
    return _BY_KIND[kind].from_bytes(data)
