"""Each protection mode split into the halves that run in different parties.

A backend (``PlaintextSum``, ``MaskedSum``, ``CKKSSum``...) is public configuration that every
party may hold. From it each party builds its own half of one round:

* a :class:`ClientSession` per client, inside the client party: it holds that client's secrets
  (identity key, mask seeds, HE key material) and its own randomness, takes the client's float
  vector with :meth:`ClientSession.set_input`, and answers the server's messages with bytes;
* a :class:`ServerSession` inside the server party: it only ever receives bytes, and returns
  the decoded sum of the contributors when the round is over;
* for HE modes, a key holder party (recipient id :data:`KEY_HOLDER`) that made the keys, gives
  each client its client context out of the server's reach, and answers the server's request to
  decrypt the aggregate.

Backend methods every mode provides (the server's half gets the mode's public material, the HE
public context, as ``public_context``; other modes take None)::

    backend.client_session(client_id, *, round_index, participants, rng, keys: ClientKeys | None)
    backend.server_session(*, round_index, participants, length, public_context=None)

Between them pass only versioned byte messages: the formats of :mod:`secagg.messages` (masked),
:mod:`secagg._he_wire` (HE) and :data:`PLAIN_FORMAT` below (plaintext). :func:`drive_round` is
the message loop; the in-process ``aggregate`` of every backend runs its sessions through it, and
``fedcore`` runs the same sessions in separate parties through a channel.

Simulated dropouts: ``server.stage`` is the protocol stage of the messages the last
:meth:`ServerSession.outgoing` call produced (the replies belong to the same stage); a party
silent from stage ``s`` answers nothing from the first batch whose stage is ``>= s``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Mapping, Protocol, Sequence, TypeVar, runtime_checkable

import numpy as np

from .base import Stage, SumResult, check_updates
from .errors import ProtocolError

if TYPE_CHECKING:
    from .protocol import IntegerSumResult

__all__ = [
    "ClientKeys",
    "ClientSession",
    "ServerSession",
    "Respond",
    "drive_round",
    "KEY_HOLDER",
    "PlaintextClientSession",
    "PlaintextServerSession",
    "PLAIN_FORMAT",
]

KEY_HOLDER = "key-holder"
"""The recipient id of the HE key holder party in a server session's batches."""

Respond = Callable[[bytes], "bytes | None"]
"""A party's answer to one message: its reply's bytes, or None when it says nothing (dropped)."""


@dataclass(frozen=True)
class ClientKeys:
    """Key material a client party holds across rounds and hands to its sessions.

    Attributes:
        identity_key: the client's long-term Ed25519 private key (signed masked rounds), or None.
        peer_identities: every participant's Ed25519 public key (raw 32 bytes), the federation's
            public-key directory; None in unsigned mode.
        he_context: the HE client context the key holder gave this client (public key only, or
            with the secret key in presets where clients hold it), or None outside HE modes.
    """

    identity_key: object = None
    peer_identities: Mapping[str, bytes] | None = None
    he_context: bytes | None = None


@runtime_checkable
class ClientSession(Protocol):
    """One client's half of one round; lives in the client party and holds its secrets."""

    client_id: str

    def set_input(self, vector: np.ndarray) -> None:
        """The client's clipped, weighted float vector; encoded with the session's own randomness."""

    def handle(self, message: bytes) -> bytes | None:
        """Answer one message of the server (None: this message needs no answer)."""


_Result_co = TypeVar("_Result_co", covariant=True)
_Result = TypeVar("_Result", SumResult, "IntegerSumResult")  # what drive_round returns: what its session's finish does


@runtime_checkable
class ServerSession(Protocol[_Result_co]):
    """The server's half of one round: it receives bytes only and learns only the sum.

    Generic in what :meth:`finish` returns: a :class:`SumResult` for every backend's session, an
    :class:`~secagg.protocol.IntegerSumResult` (ring words) for the bare masked protocol.
    """

    @property
    def stage(self) -> Stage:
        """The protocol stage of the batch the last :meth:`outgoing` returned."""

    def outgoing(self) -> dict[str, bytes]:
        """The next batch of messages by recipient id; ``{}`` once the round is over.

        Closes the previous batch: raises ``DropoutError`` if too few parties answered it.
        """

    def receive(self, sender: str, message: bytes) -> None:
        """One reply. Raises ``ProtocolError`` for a malformed, replayed or misaddressed message."""

    def finish(self) -> _Result_co:
        """The decoded sum of the contributors, after :meth:`outgoing` returned ``{}``."""


def drive_round(
    server: ServerSession[_Result],
    parties: Mapping[str, Respond],
    *,
    dropouts: Mapping[str, Stage] | None = None,
    deliver: Callable[[dict[str, bytes]], Mapping[str, "bytes | None"]] | None = None,
) -> _Result:
    """Run one round's message loop between a server session and the parties' answer functions.

    Args:
        server: the server's half.
        parties: recipient id -> a function that delivers a message and returns the reply. A
            recipient missing from ``parties`` answers nothing (it is gone).
        dropouts: simulated silence: recipient id -> the first stage it does not answer.
        deliver: delivers a whole stage's messages at once and returns the replies by sender
            (a channel's ``exchange``: one trip to parties hosted elsewhere instead of one per
            message); the replies are received in the batch's order, as one by one.

    Returns:
        The server's result, with every simulated dropout it addressed listed as dropped (one
        silent only after the last batch, at UNMASK in plaintext, still counts as a contributor).

    Raises:
        DropoutError: too few parties answered a stage; nothing is revealed.
        ProtocolError: a message broke the protocol.
    """
    silent = dict(dropouts or {})
    addressed: set[str] = set()
    while True:
        batch = server.outgoing()
        if not batch:
            result = server.finish()
            gone = set(result.dropped) | (addressed & set(silent))  # silent at a stage with no batch
            return replace(result, dropped=tuple(sorted(gone)))
        stage = server.stage
        addressed.update(batch)
        live = {r: m for r, m in batch.items() if r in parties and silent.get(r, len(Stage)) > stage}
        replies = deliver(live) if deliver is not None else {r: parties[r](m) for r, m in live.items()}
        for recipient in live:
            reply = replies.get(recipient)
            if reply is not None:
                server.receive(recipient, reply)


# ----------------------------------------------------------------------------------- plaintext
PLAIN_FORMAT = """Plaintext update message (the reference mode's only message up):

    magic    4 bytes   b"PFPT"
    version  1 byte    1
    kind     1 byte    1 = request (server -> client, no payload), 2 = update (client -> server)
    round    8 bytes   unsigned big-endian round index
    sender   2 bytes   big-endian length L, then L bytes of UTF-8 (the client id; empty in a request)
    width    1 byte    4 = float32, 8 = float64 (the client's vector is sent at its own precision)
    length   8 bytes   unsigned big-endian number of coordinates (0 in a request)
    payload  width * length bytes, little-endian IEEE 754
"""

_PLAIN_MAGIC = b"PFPT"
_PLAIN_VERSION = 1
_REQUEST, _UPDATE = 1, 2
_HEAD = struct.Struct(">4sBBQH")
_LENGTH = struct.Struct(">BQ")
_WIDTHS = {4: "<f4", 8: "<f8"}


def _plain_message(kind: int, round_index: int, sender: str, payload: np.ndarray | None) -> bytes:
    name = sender.encode()
    width = 4 if payload is None or payload.dtype.itemsize <= 4 else 8
    body = b"" if payload is None else np.ascontiguousarray(payload, dtype=_WIDTHS[width]).tobytes()
    length = 0 if payload is None else payload.size
    head = _HEAD.pack(_PLAIN_MAGIC, _PLAIN_VERSION, kind, round_index, len(name))
    return head + name + _LENGTH.pack(width, length) + body


@dataclass(frozen=True)
class _Plain:
    kind: int
    round_index: int
    sender: str
    values: np.ndarray


def _parse_plain(data: bytes) -> _Plain:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"a plaintext message must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < _HEAD.size:
        raise ProtocolError(f"plaintext message of {len(data)} bytes is shorter than its {_HEAD.size}-byte header")
    magic, version, kind, round_index, name_len = _HEAD.unpack_from(data)
    if magic != _PLAIN_MAGIC or version != _PLAIN_VERSION or kind not in (_REQUEST, _UPDATE):
        raise ProtocolError(
            f"not a plaintext message of version {_PLAIN_VERSION} (magic {magic!r}, version {version}, kind {kind})"
        )
    at = _HEAD.size + name_len
    if len(data) < at + _LENGTH.size:
        raise ProtocolError("plaintext message truncated inside its header")
    try:
        sender = data[_HEAD.size : at].decode()
    except UnicodeDecodeError as exc:
        raise ProtocolError("plaintext message sender is not UTF-8") from exc
    width, length = _LENGTH.unpack_from(data, at)
    at += _LENGTH.size
    if width not in _WIDTHS:
        raise ProtocolError(f"plaintext message announces a float width of {width} bytes; 4 or 8 are allowed")
    if len(data) != at + width * length:
        raise ProtocolError(f"plaintext message holds {len(data) - at} payload bytes, its header announces {width * length}")
    values = np.frombuffer(data, dtype=_WIDTHS[width], count=length, offset=at)
    return _Plain(kind, round_index, sender, values)


class PlaintextClientSession:
    """The reference mode's client half: it sends its vector as float32, in the clear."""

    def __init__(self, client_id: str, *, round_index: int) -> None:
        self.client_id = client_id
        self.round_index = round_index
        self._vector: np.ndarray | None = None

    def set_input(self, vector: np.ndarray) -> None:
        """The vector the server will see as it is."""
        check_updates({self.client_id: vector})
        self._vector = np.asarray(vector, dtype=np.float64 if vector.dtype.itemsize > 4 else np.float32)

    def handle(self, message: bytes) -> bytes | None:
        """Answer the server's request with the update.

        Raises:
            ProtocolError: not a request of this round, or no input set.
        """
        msg = _parse_plain(message)
        if msg.kind != _REQUEST or msg.round_index != self.round_index:
            raise ProtocolError(
                f"client {self.client_id!r} expected a plaintext request for round {self.round_index}, "
                f"got kind {msg.kind} for round {msg.round_index}"
            )
        if self._vector is None:
            raise ProtocolError(f"client {self.client_id!r} was asked for its update before it had one")
        return _plain_message(_UPDATE, self.round_index, self.client_id, self._vector)


class PlaintextServerSession:
    """The reference mode's server half: it sums the float vectors it is sent, in float64.

    Args:
        sum_vectors: another way to sum (the GPU path): called once at :meth:`finish` with the
            received vectors by sender, returns ``(total, max_abs_error)``.
    """

    stage = Stage.MASKED_INPUT

    def __init__(
        self,
        *,
        round_index: int,
        participants: Sequence[str],
        length: int,
        sum_vectors: Callable[[Mapping[str, np.ndarray]], tuple[np.ndarray, float]] | None = None,
    ) -> None:
        self.round_index = round_index
        self._participants = tuple(sorted(participants))
        self._length = length
        self._total = np.zeros(length, dtype=np.float64)
        self._sum_vectors = sum_vectors
        self._kept: dict[str, np.ndarray] = {}
        self._from: list[str] = []
        self._asked = False
        self.bytes_up = 0

    def outgoing(self) -> dict[str, bytes]:
        """One request per participant, then nothing."""
        if self._asked:
            return {}
        self._asked = True
        request = _plain_message(_REQUEST, self.round_index, "", None)
        return {cid: request for cid in self._participants}

    def receive(self, sender: str, message: bytes) -> None:
        """Add one client's vector.

        Raises:
            ProtocolError: wrong round, kind, sender or length, a second vector, NaN or Inf.
        """
        msg = _parse_plain(message)
        if msg.kind != _UPDATE or msg.round_index != self.round_index:
            raise ProtocolError(
                f"expected a plaintext update for round {self.round_index}, got kind {msg.kind} for round {msg.round_index}"
            )
        if msg.sender != sender or sender not in self._participants:
            raise ProtocolError(f"update signed {msg.sender!r} arrived from {sender!r}; only participants may send their own")
        if sender in self._from:
            raise ProtocolError(f"second update from {sender!r} in round {self.round_index}")
        if msg.values.size != self._length:
            raise ProtocolError(f"update of {sender!r} has {msg.values.size} coordinates, the round expects {self._length}")
        if not np.all(np.isfinite(msg.values)):
            raise ProtocolError(f"update of {sender!r} holds NaN or Inf")
        if self._sum_vectors is None:
            self._total += msg.values
        else:
            self._kept[sender] = msg.values
        self._from.append(sender)
        self.bytes_up += len(message)

    def finish(self) -> SumResult:
        """The exact float64 sum of the vectors received."""
        contributors = tuple(sorted(self._from))
        total, error = self._total, 0.0
        if self._sum_vectors is not None and self._kept:
            total, error = self._sum_vectors(self._kept)
        return SumResult(
            total=total,
            contributors=contributors,
            dropped=tuple(c for c in self._participants if c not in self._from),
            bytes_up={"update": self.bytes_up},
            bytes_down={},
            max_abs_error=error,
            mode="plaintext",
        )
