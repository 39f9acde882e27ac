"""Selective encryption (FedML-HE, Jin et al. 2023): encrypt only the most sensitive coordinates.

A fixed, public :class:`Selection` splits every client's vector in two: the selected coordinates
go through an encrypting backend (e.g. :class:`secagg.CKKSSum`), the rest through another
backend (masked or plaintext). The two sums are put back in place. The selection must not
depend on any single client's private update: FedML-HE derives it from a sensitivity map that
clients aggregate under encryption before training (one can do that with a CKKSSum over the
clients' local maps and pass the decrypted sum to :func:`select_top_fraction`); a public model
structure (:func:`select_by_name`) or a previous round's aggregate are other sources.

Who sees what: selected coordinates follow the encrypted backend's trust model, the others the
rest backend's; :meth:`SelectiveSum.describe` records exactly which coordinates went which way.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ._he_core import run_session_round
from .base import SecureSum, Stage, SumResult, check_updates
from .errors import ProtocolError
from .session import ClientKeys, ClientSession, ServerSession

__all__ = [
    "Selection",
    "select_by_name",
    "select_top_fraction",
    "select_indices",
    "SelectiveSum",
    "SelectiveClientSession",
    "SelectiveServerSession",
    "SelectiveKeyHolderSession",
    "SELECTIVE_FORMAT",
    "pack_parts",
    "unpack_parts",
]

_MAX_LISTED_RANGES = 256


@dataclass(frozen=True)
class Selection:
    """The coordinates that take the encrypted path.

    Attributes:
        indices: sorted, unique int64 coordinates (read-only).
        size: length of the vectors it applies to, or None if only known at the first round.
        criterion: how they were chosen, in words (copied into reports).
        names: the parameter names selected, when chosen by name.
    """

    indices: np.ndarray
    size: int | None
    criterion: str
    names: tuple[str, ...] = field(default=())

    def mask(self, size: int) -> np.ndarray:
        """Boolean mask over ``size`` coordinates (True = encrypted).

        Raises:
            ValueError: ``size`` differs from the selection's, or an index is out of range.
        """
        if self.size is not None and size != self.size:
            raise ValueError(f"selection was made for vectors of length {self.size}, got length {size}")
        if self.indices.size and self.indices[-1] >= size:
            raise ValueError(f"selection index {int(self.indices[-1])} is out of range for length {size}")
        out = np.zeros(size, dtype=bool)
        out[self.indices] = True
        return out

    def record(self, size: int | None = None) -> dict[str, object]:
        """What a privacy report needs: the criterion and exactly which coordinates were encrypted.

        The encrypted coordinates are listed as ``[start, stop)`` ranges when there are at most
        256 of them, else as the mask packed into bits (numpy ``packbits``, big-endian bit
        order) in base64; the rest went the other way. ``mask_sha256`` digests the packed mask.
        """
        size = self.size if size is None else size
        out: dict[str, object] = {"criterion": self.criterion, "encrypted_count": int(self.indices.size)}
        if self.names:
            out["names"] = list(self.names)
        if size is None:
            out["encrypted_indices"] = self.indices.tolist() if self.indices.size <= 4096 else None
            return out
        mask = self.mask(size)
        packed = np.packbits(mask).tobytes()
        out.update(
            size=size,
            encrypted_fraction=self.indices.size / size if size else 0.0,
            rest_count=size - int(self.indices.size),
            mask_sha256=hashlib.sha256(packed).hexdigest(),
        )
        ranges = _runs(mask)
        if len(ranges) <= _MAX_LISTED_RANGES:
            out["encrypted_ranges"] = ranges
        else:
            out["encrypted_mask_packbits_base64"] = base64.b64encode(packed).decode("ascii")
        return out


def _runs(mask: np.ndarray) -> list[list[int]]:
    edges = np.diff(np.concatenate(([0], mask.view(np.int8), [0])))
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [[int(a), int(b)] for a, b in zip(starts, stops)]


def _frozen(indices: np.ndarray) -> np.ndarray:
    indices = np.unique(indices.astype(np.int64))
    indices.setflags(write=False)
    return indices


def select_indices(
    selection: np.ndarray | Sequence[int], *, size: int | None = None, criterion: str = "given by the caller"
) -> Selection:
    """A selection from a boolean mask (length = vector length) or from integer indices.

    Raises:
        ValueError: negative indices, a mask whose length differs from ``size``.
        TypeError: neither a bool nor an integer array.
    """
    arr = np.asarray(selection)
    if arr.dtype == bool:
        if arr.ndim != 1:
            raise ValueError(f"mask must be 1-D, got shape {arr.shape}")
        if size is not None and arr.size != size:
            raise ValueError(f"mask has length {arr.size}, size is {size}")
        return Selection(indices=_frozen(np.flatnonzero(arr)), size=arr.size, criterion=criterion)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"selection must be a bool mask or integer indices, got dtype {arr.dtype}")
    arr = arr.reshape(-1).astype(np.int64)
    if arr.size and arr.min() < 0:
        raise ValueError(f"selection indices must be >= 0, got {int(arr.min())}")
    if size is not None and arr.size and arr.max() >= size:
        raise ValueError(f"selection index {int(arr.max())} is out of range for size {size}")
    return Selection(indices=_frozen(arr), size=size, criterion=criterion)


def select_by_name(layout: Mapping[str, int] | Sequence[tuple[str, int]], names: Iterable[str]) -> Selection:
    """Encrypt whole named parameters; ``layout`` gives each name's size in flat-vector order.

    Raises:
        ValueError: a name not in the layout (listing the known ones), or a non-positive size.
    """
    items = list(layout.items()) if isinstance(layout, Mapping) else list(layout)
    offsets: dict[str, tuple[int, int]] = {}
    start = 0
    for name, count in items:
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count <= 0:
            raise ValueError(f"layout size of {name!r} must be a positive int, got {count!r}")
        offsets[name] = (start, start + int(count))
        start += int(count)
    chosen = list(dict.fromkeys(names))
    unknown = [n for n in chosen if n not in offsets]
    if unknown:
        raise ValueError(f"names {unknown} are not in the layout; known names: {list(offsets)}")
    parts = [np.arange(*offsets[n], dtype=np.int64) for n in chosen]
    indices = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    return Selection(indices=_frozen(indices), size=start, criterion="by parameter name", names=tuple(chosen))


def select_top_fraction(scores: np.ndarray, *, fraction: float, criterion: str = "largest absolute score") -> Selection:
    """The ``ceil(fraction * d)`` coordinates with the largest ``|scores|`` (ties: lower index first).

    ``scores`` must be public or aggregated (FedML-HE: the clients' summed sensitivity maps; or
    the magnitude of the previous round's aggregate update), never one client's private update.
    ``criterion`` says in words what the scores are; it is recorded in the report.

    Raises:
        ValueError: fraction outside [0, 1], scores not a non-empty finite 1-D array.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0 or not np.all(np.isfinite(scores)):
        raise ValueError(f"scores must be a non-empty finite 1-D array, got shape {scores.shape}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    k = math.ceil(round(fraction * scores.size, 9))  # 0.07 * 100 is 7.000000000000001 in floats
    order = np.argsort(-np.abs(scores), kind="stable")[:k]
    return Selection(
        indices=_frozen(order),
        size=scores.size,
        criterion=f"top {fraction:.4g} fraction by {criterion}",
    )


SELECTIVE_FORMAT = """Selective message: the two sub-backends' messages for one party, in one envelope.

    magic     4 bytes   b"PFSL"
    version   1 byte    1
    then twice, first the encrypted path's part, then the rest path's:
      present 1 byte    0 (no message on this path) or 1
      length  8 bytes   unsigned big-endian L (only when present)
      bytes   L bytes   the sub-backend's own message, in its own documented format

Used for every message of a selective round (requests, replies, the key holder's contexts and
decryptions), so that one batch can carry both sub-messages for one recipient.
"""

_SEL_MAGIC = b"PFSL"
_SEL_VERSION = 1
_PATHS = ("encrypted", "rest")


def pack_parts(parts: Mapping[str, bytes | None]) -> bytes:
    """One envelope holding the ``"encrypted"`` and ``"rest"`` parts (either may be None)."""
    out = [_SEL_MAGIC, bytes([_SEL_VERSION])]
    for path in _PATHS:
        part = parts.get(path)
        if part is None:
            out.append(b"\x00")
        else:
            out += [b"\x01", struct.pack(">Q", len(part)), bytes(part)]
    return b"".join(out)


def unpack_parts(data: bytes, *, what: str) -> dict[str, bytes | None]:
    """The parts of an envelope by path.

    Raises:
        ProtocolError: not bytes of this format, truncated, or trailing bytes.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"{what} must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if data[:4] != _SEL_MAGIC or len(data) < 5 or data[4] != _SEL_VERSION:
        raise ProtocolError(f"{what} is not a selective envelope of version {_SEL_VERSION} (starts {data[:5]!r})")
    at, parts = 5, {}  # type: tuple[int, dict[str, bytes | None]]
    for path in _PATHS:
        if at >= len(data) or data[at] not in (0, 1):
            raise ProtocolError(f"{what} is truncated or malformed at the {path} part's flag")
        present, at = data[at], at + 1
        if not present:
            parts[path] = None
            continue
        if at + 8 > len(data):
            raise ProtocolError(f"{what} is truncated inside the {path} part's length")
        (length,) = struct.unpack_from(">Q", data, at)
        at += 8
        if at + length > len(data):
            raise ProtocolError(f"{what}: the {path} part declares {length} bytes, {len(data) - at} remain")
        parts[path], at = data[at : at + length], at + length
    if at != len(data):
        raise ProtocolError(f"{what} has {len(data) - at} trailing bytes")
    return parts


def _needs_sessions(name: str, backend: object) -> None:
    for method in ("client_session", "server_session"):
        if not callable(getattr(backend, method, None)):
            raise TypeError(f"{name} backend {type(backend).__name__} has no {method}(); selective rounds run its sessions")


class SelectiveKeyHolderSession:
    """The key holder party of a selective round: the sub-backends' key holders behind one envelope.

    A path whose backend has no key holder (plaintext, masked) has no part in its contexts.
    """

    def __init__(self, holders: Mapping[str, Any]) -> None:
        self._holders = dict(holders)

    def server_context(self) -> bytes:
        """Both paths' public contexts (envelope)."""
        return pack_parts({p: h.server_context() for p, h in self._holders.items()})

    def client_context(self, client_id: str) -> bytes:
        """Both paths' client contexts for ``client_id`` (envelope)."""
        return pack_parts({p: h.client_context(client_id) for p, h in self._holders.items()})

    def handle(self, message: bytes) -> bytes | None:
        """Answer the decryption requests of the paths it holds keys for.

        Raises:
            ProtocolError: a part for a path without a key holder, or as the sub-holders raise.
        """
        replies = {}
        for path, part in unpack_parts(message, what="message to the key holder").items():
            if part is None:
                continue
            if path not in self._holders:
                raise ProtocolError(f"the {path} path has no key holder, yet the key holder got a message for it")
            replies[path] = self._holders[path].handle(part)
        return pack_parts(replies) if any(r is not None for r in replies.values()) else None


class SelectiveClientSession:
    """A client's half: it splits its vector and runs one sub-session per path that has coordinates."""

    def __init__(
        self,
        owner: SelectiveSum,
        client_id: str,
        *,
        round_index: int,
        participants: Sequence[str],
        rng: np.random.Generator,
        keys: ClientKeys | None,
    ) -> None:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        self.client_id = client_id
        self._owner = owner
        self._args = {"round_index": round_index, "participants": participants}
        self._rngs = dict(zip(_PATHS, rng.spawn(2)))
        contexts: dict[str, bytes | None] = {p: None for p in _PATHS}
        if keys is not None and keys.he_context is not None:
            contexts = unpack_parts(keys.he_context, what=f"context of client {client_id!r}")
        base = keys if keys is not None else ClientKeys()
        self._keys = {p: replace(base, he_context=contexts[p]) for p in _PATHS}
        self._sessions: dict[str, ClientSession] = {}

    def set_input(self, vector: np.ndarray) -> None:
        """Split ``vector`` by the selection and give each path its coordinates."""
        check_updates({self.client_id: vector})
        mask = self._owner.selection.mask(vector.size)
        for path, part in zip(_PATHS, (mask, ~mask)):
            if part.any():
                backend: Any = self._owner.backends[path]
                session = backend.client_session(self.client_id, rng=self._rngs[path], keys=self._keys[path], **self._args)
                session.set_input(vector[part])
                self._sessions[path] = session

    def handle(self, message: bytes) -> bytes | None:
        """Hand each part to its path's sub-session; one envelope of their replies (None if none).

        Raises:
            ProtocolError: a part for a path this client has no coordinates on, or as the sub-sessions.
        """
        replies = {}
        for path, part in unpack_parts(message, what=f"message to client {self.client_id!r}").items():
            if part is None:
                continue
            if path not in self._sessions:
                raise ProtocolError(f"client {self.client_id!r} got a {path} message but has no input on that path")
            replies[path] = self._sessions[path].handle(part)
        return pack_parts(replies) if any(r is not None for r in replies.values()) else None


class SelectiveServerSession:
    """The server's half: both paths' server sessions, their batches merged stage by stage.

    Each step sends the batches of the paths whose next batch has the lowest stage (so a simulated
    dropout from stage s silences a party on both paths at once), one envelope per recipient.
    """

    def __init__(
        self, owner: SelectiveSum, sessions: Mapping[str, ServerSession[SumResult]], masks: Mapping[str, np.ndarray], length: int
    ) -> None:
        self._owner = owner
        self._sessions = dict(sessions)
        self._masks = dict(masks)
        self._length = length
        self._pending: dict[str, tuple[Stage, dict[str, bytes]]] = {}
        self._done: set[str] = set()
        self._sent: dict[str, set[str]] = {}
        self._stage = Stage.ADVERTISE_KEYS

    @property
    def stage(self) -> Stage:
        return self._stage

    def outgoing(self) -> dict[str, bytes]:
        for path, session in self._sessions.items():
            if path in self._done or path in self._pending:
                continue
            batch = session.outgoing()
            if batch:
                self._pending[path] = (session.stage, batch)
            else:
                self._done.add(path)
        self._sent = {}
        if not self._pending:
            return {}
        self._stage = min(stage for stage, _ in self._pending.values())
        chosen = [p for p, (stage, _) in self._pending.items() if stage == self._stage]
        merged: dict[str, dict[str, bytes]] = {}
        for path in chosen:
            _stage, batch = self._pending.pop(path)
            self._sent[path] = set(batch)
            for recipient, message in batch.items():
                merged.setdefault(recipient, {})[path] = message
        return {recipient: pack_parts(parts) for recipient, parts in merged.items()}

    def receive(self, sender: str, message: bytes) -> None:
        """Hand each part of a reply to its path's server session.

        Raises:
            ProtocolError: a part on a path that sent this party nothing in this batch.
        """
        for path, part in unpack_parts(message, what=f"reply of {sender!r}").items():
            if part is None:
                continue
            if sender not in self._sent.get(path, ()):
                raise ProtocolError(f"a {path} reply from {sender!r}, which that path did not ask in this batch")
            self._sessions[path].receive(sender, part)

    def finish(self) -> SumResult:
        """Both sums put back in place.

        Raises:
            ProtocolError: the two paths disagree on who contributed.
        """
        results = {path: session.finish() for path, session in self._sessions.items()}
        return self._owner._assemble(results, self._masks, self._length)


class SelectiveSum:
    """Sum the selected coordinates with ``encrypted`` and the others with ``rest`` (a SecureSum).

    Both backends see the same clients and dropouts; their results are put back in place.
    ``max_abs_error`` is the larger of the two backends' bounds (each coordinate obeys its own).

    Raises (constructor):
        TypeError: a backend that is not a SecureSum, or a bad mask.
    """

    mode = "selective"

    def __init__(self, *, encrypted: SecureSum, rest: SecureSum, mask: Selection | np.ndarray | Sequence[int]) -> None:
        for name, backend in (("encrypted", encrypted), ("rest", rest)):
            if not isinstance(backend, SecureSum):
                raise TypeError(f"{name} must implement secagg.SecureSum, got {type(backend).__name__}")
            _needs_sessions(name, backend)
        self.encrypted = encrypted
        self.rest = rest
        self.backends: dict[str, Any] = {"encrypted": encrypted, "rest": rest}
        self.selection = mask if isinstance(mask, Selection) else select_indices(mask)
        self._size = self.selection.size
        self.trust_model = (
            f"Selective encryption (FedML-HE): the coordinates chosen {self.selection.criterion} "
            f"({self.selection.indices.size} of {self._size if self._size is not None else 'the'} coordinates) "
            f"take the {encrypted.mode!r} path: {encrypted.trust_model} The other coordinates take the "
            f"{rest.mode!r} path: {rest.trust_model}"
        )

    def key_holder_session(self, *, round_index: int) -> SelectiveKeyHolderSession:
        """The key holder party: the key holders of the paths whose backend has one."""
        return SelectiveKeyHolderSession({
            path: backend.key_holder_session(round_index=round_index)
            for path, backend in self.backends.items() if callable(getattr(backend, "key_holder_session", None))
        })  # fmt: skip

    def client_session(
        self,
        client_id: str,
        *,
        round_index: int,
        participants: Sequence[str],
        rng: np.random.Generator,
        keys: ClientKeys | None = None,
    ) -> SelectiveClientSession:
        """A client's half; ``keys.he_context`` is the key holder's ``client_context`` envelope (or None)."""
        return SelectiveClientSession(self, client_id, round_index=round_index, participants=participants, rng=rng, keys=keys)

    def server_session(
        self, *, round_index: int, participants: Sequence[str], length: int, public_context: bytes | None = None
    ) -> SelectiveServerSession:
        """The server's half; ``public_context`` is the key holder's ``server_context`` envelope (or None).

        Raises:
            ValueError: ``length`` differs from the selection's, or an index is out of range.
        """
        mask = self.selection.mask(length)
        self._size = length
        contexts: dict[str, bytes | None] = {p: None for p in _PATHS}
        if public_context is not None:
            contexts = unpack_parts(public_context, what="server context")
        sessions, masks = {}, {}
        for path, part in zip(_PATHS, (mask, ~mask)):
            if part.any():
                masks[path] = part
                sessions[path] = self.backends[path].server_session(
                    round_index=round_index,
                    participants=participants,
                    length=int(part.sum()),
                    public_context=contexts[path],
                )
        return SelectiveServerSession(self, sessions, masks, length)

    def aggregate(
        self,
        updates: Mapping[str, np.ndarray],
        *,
        round_index: int,
        rng: np.random.Generator,
        dropouts: Mapping[str, Stage] | None = None,
    ) -> SumResult:
        """Split, run both paths' sessions in one message loop with the same dropouts, and reassemble.

        In process only HE contexts are handed out (``ClientKeys(he_context=...)``); a rest
        backend that needs identity keys gets them from the caller's own client parties.

        Raises:
            ValueError: as :func:`secagg.check_updates`, or vectors of another length than the
                selection's.
            ProtocolError: the two backends disagree on who contributed.
        """
        _ids, size = check_updates(updates)
        self.selection.mask(size)
        named = [getattr(b, "key_holder", None) for b in self.backends.values()]
        return run_session_round(
            self,
            updates,
            round_index=round_index,
            rng=rng,
            dropouts=dropouts,
            value_bound=None,
            max_clients=None,
            key_holder=next((n for n in named if n is not None), None),
        )

    def _assemble(self, results: Mapping[str, SumResult], masks: Mapping[str, np.ndarray], length: int) -> SumResult:
        total = np.zeros(length, dtype=np.float64)
        bytes_up: dict[str, int] = {}
        bytes_down: dict[str, int] = {}
        for path, result in results.items():
            total[masks[path]] = result.total
            bytes_up.update({f"{path}/{key}": value for key, value in result.bytes_up.items()})
            bytes_down.update({f"{path}/{key}": value for key, value in result.bytes_down.items()})
        first, *others = results.values()
        for other in others:
            if other.contributors != first.contributors:
                raise ProtocolError(
                    f"the encrypted and rest backends disagree on contributors ({first.contributors} vs {other.contributors})"
                )
        return SumResult(
            total=total,
            contributors=first.contributors,
            dropped=tuple(sorted(set().union(*(r.dropped for r in results.values())))),
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            max_abs_error=max(r.max_abs_error for r in results.values()),
            mode=self.mode,
        )

    def describe(self) -> dict[str, object]:
        """The two backends' descriptions and the record of which coordinates went which way."""
        return {
            "mode": self.mode,
            "encrypted": self.encrypted.describe(),
            "rest": self.rest.describe(),
            "selection": self.selection.record(self._size),
        }
