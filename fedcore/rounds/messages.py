"""The byte messages between the server party and client parties (besides the secagg formats).

One envelope for every kind (no pickle; parsing never evaluates code)::

    offset  size  field
    0       4     magic b"PFFC"
    4       1     format version (1)
    5       1     kind (see :class:`Kind`)
    6       4     H: length of the header, uint32 big endian, at most 1 MiB
    10      H     header: a UTF-8 JSON object (the kind's fields, below)
    10+H    8     L: number of float32 coordinates, uint64 big endian
    18+H    4L    payload: little-endian float32 (the global model, or a revealed local model)

Kinds, direction and header fields:

* ``TRAIN`` server -> client: ``round``, ``version`` (the model version trained from), optional
  ``job`` (the asynchronous job index, which labels the client's seeds) and ``defer_local`` (a
  simulation computing a job before its virtual end: the new local-only parameters wait for
  ``FINISH``); payload the global shared parameters.
* ``FINISH`` server -> client (simulation only): ``round``; the job ended in virtual time.
* ``TRAIN_REPORT`` client -> server: ``round``, ``client``, ``ok``, ``error``, ``train_seconds``,
  ``steps``, ``metrics`` (training-side metrics, a non-private release), ``privacy_event`` (the
  sample-level ledger event's JSON, public parameters only), and ``budget_refused`` (true when
  the client refused to train past its own privacy budget); no payload: the update stays with
  the client.
* ``PROTECT`` server -> client: ``round``, ``participants`` (the protection round's clients),
  ``staleness_weight``, ``clip_bound`` (the bound to clip to: adaptive clipping moves it); the
  client builds its half of the protection session and sets its input.
* ``REVEAL`` server -> client: ``round``; ``REVEALED`` client -> server: ``round``, ``client``,
  ``num_examples``, ``metrics``, payload the local update (model selection and ensembles only,
  which the federation allows with consent or sample-level DP, and records as a reveal).
* ``EVALUATE`` server -> client: ``split``; payload the model to score. ``SCORES`` client ->
  server: ``client``, ``metrics``, ``count`` (a non-private release, listed in the report).
  With ``noise`` (``metric``, ``multiplier``, ``per`` = sum | mean, ``round``: a private search's
  selection score) the client answers ``client``, ``noised`` (its score plus Gaussian noise of its
  own drawing) and ``count`` instead of its metrics.
* ``KEYS`` server -> HE key holder: ``round``; the key holder makes the round's keys, hands each
  client its context directly, and answers with the public context (secagg HE format).
* ``ACK`` client -> server: ``round``, ``client`` (answers PROTECT and FINISH).

Protection-session messages (masked, HE, plaintext) keep their own formats (:mod:`secagg`).
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import RoundFailedError

__all__ = ["Kind", "Message", "encode", "decode", "kind_of", "is_fedcore_message", "MessageError"]

MAGIC = b"PFFC"
VERSION = 1
_HEAD = struct.Struct(">4sBBI")
_COUNT = struct.Struct(">Q")
_MAX_HEADER = 1 << 20


class MessageError(RoundFailedError):
    """A malformed, mislabelled or truncated party message."""


class Kind(enum.IntEnum):
    """What a party message is (its byte 5)."""

    TRAIN = 1
    TRAIN_REPORT = 2
    PROTECT = 3
    REVEAL = 4
    REVEALED = 5
    EVALUATE = 6
    SCORES = 7
    ACK = 8
    FINISH = 9
    KEYS = 10


@dataclass(frozen=True)
class Message:
    """A decoded party message: its kind, header fields and float32 payload (possibly empty)."""

    kind: Kind
    header: dict[str, Any]
    payload: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))


def encode(kind: Kind, header: dict[str, Any], payload: np.ndarray | None = None) -> bytes:
    """The bytes of one message. JSON header (finite numbers only), float32 payload."""
    head = json.dumps(header, sort_keys=True, allow_nan=False).encode()
    if len(head) > _MAX_HEADER:
        raise MessageError(f"{kind.name} header of {len(head)} bytes exceeds the {_MAX_HEADER}-byte limit")
    body = b"" if payload is None else np.ascontiguousarray(payload, dtype="<f4").tobytes()
    count = 0 if payload is None else int(payload.size)
    return _HEAD.pack(MAGIC, VERSION, int(kind), len(head)) + head + _COUNT.pack(count) + body


def is_fedcore_message(data: bytes) -> bool:
    """Whether ``data`` starts with this format's magic (else it is a protection-session message)."""
    return bytes(data[:4]) == MAGIC


def kind_of(data: bytes) -> Kind | None:
    """The kind of a party message read from its envelope alone (no parse, no payload copy);
    None for a protection-session message or an unknown kind (:func:`decode` then says why)."""
    if not is_fedcore_message(data) or len(data) < _HEAD.size:
        return None
    try:
        return Kind(data[5])
    except ValueError:
        return None


def decode(data: bytes, *, expect: Kind | tuple[Kind, ...] | None = None) -> Message:
    """Parse one message strictly.

    Raises:
        MessageError: not bytes, wrong magic, version or kind, a header that is not a JSON
            object, a truncated payload or trailing bytes.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError(f"a party message must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < _HEAD.size:
        raise MessageError(f"party message of {len(data)} bytes is shorter than its {_HEAD.size}-byte envelope")
    magic, version, kind, head_len = _HEAD.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise MessageError(f"not a party message of version {VERSION} (magic {magic!r}, version {version})")
    try:
        kind = Kind(kind)
    except ValueError:
        raise MessageError(f"unknown party message kind {kind}") from None
    wanted = (expect,) if isinstance(expect, Kind) else expect
    if wanted is not None and kind not in wanted:
        raise MessageError(f"expected a {' or '.join(k.name for k in wanted)} message, got {kind.name}")
    at = _HEAD.size + head_len
    if head_len > _MAX_HEADER or len(data) < at + _COUNT.size:
        raise MessageError(f"{kind.name} message truncated in its header ({len(data)} bytes)")
    try:
        header = json.loads(data[_HEAD.size : at].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MessageError(f"{kind.name} header is not UTF-8 JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise MessageError(f"{kind.name} header must be a JSON object, got {type(header).__name__}")
    (count,) = _COUNT.unpack_from(data, at)
    at += _COUNT.size
    if len(data) != at + 4 * count:
        raise MessageError(f"{kind.name} payload holds {len(data) - at} bytes, its envelope announces {4 * count}")
    payload = np.frombuffer(data, dtype="<f4", count=count, offset=at).astype(np.float32)
    return Message(kind, header, payload)
