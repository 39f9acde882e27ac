"""The secure-sum interface every protection mode implements, and the plaintext reference.

A backend receives float vectors that the caller already clipped and weighted, runs the
whole protection protocol for one round (every client's side and the server's side, in
process), and returns the decoded sum of the inputs that made it. The plaintext backend is
the reference that the masked and encrypted backends must equal: exactly after decoding for
masked sums of integers, within ``max_abs_error`` for floats.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from .session import ClientKeys, ClientSession, ServerSession

__all__ = ["Stage", "SumResult", "SecureSum", "IntegerNoise", "PlaintextSum", "check_updates"]


class Stage(enum.IntEnum):
    """The stages of a masked round (Bonawitz et al. 2017, Fig. 4, with its consistency check).

    Used also to say when a client goes silent: ``dropouts={"c7": Stage.SHARE_KEYS}`` means
    client ``c7`` completed the stages before SHARE_KEYS and sends nothing from it onward.
    A client silent from MASKED_INPUT or earlier contributes nothing to the sum; one silent
    only from a later stage (CONSISTENCY_CHECK, UNMASK) has its input counted (it was sent),
    in every mode. CONSISTENCY_CHECK runs in signed masked rounds only; elsewhere a client
    silent from it is silent at the next stage that runs.
    """

    ADVERTISE_KEYS = 0
    SHARE_KEYS = 1
    MASKED_INPUT = 2
    CONSISTENCY_CHECK = 3
    UNMASK = 4


@dataclass(frozen=True)
class SumResult:
    """What one aggregation round produced.

    Attributes:
        total: float64 sum of the contributors' inputs, after unprotecting and decoding.
        contributors: ids whose input is in ``total``, sorted.
        dropped: ids that went silent at any stage, sorted.
        bytes_up: bytes sent by clients to the server, per message kind, summed over clients.
        bytes_down: bytes sent by the server to clients, per message kind, summed over clients.
        max_abs_error: stated bound on ``|total - exact sum|`` per coordinate.
        mode: ``"plaintext"``, ``"masked"`` or ``"ckks"`` (or another backend's name).
    """

    total: np.ndarray
    contributors: tuple[str, ...]
    dropped: tuple[str, ...]
    bytes_up: Mapping[str, int] = field(default_factory=dict)
    bytes_down: Mapping[str, int] = field(default_factory=dict)
    max_abs_error: float = 0.0
    mode: str = "plaintext"


@runtime_checkable
class IntegerNoise(Protocol):
    """Noise a client adds to its encoded integer vector before masking (distributed DP).

    ``sample`` returns int64 noise for one client, in units of the encoder's step ``1/scale``.
    ``sum_bound`` bounds ``|coordinate|`` of the noise summed over ``num_clients`` clients (in
    the same integer units) with overwhelming probability; the encoder reserves that headroom.
    """

    def sample(self, size: int, *, scale: float, rng: np.random.Generator) -> np.ndarray:
        """One client's integer noise vector of ``size`` coordinates."""

    def sum_bound(self, *, scale: float, num_clients: int) -> float:
        """A bound on ``|coordinate|`` of the noise summed over ``num_clients`` clients."""


@runtime_checkable
class SecureSum(Protocol):
    """A protection mode for summing client vectors.

    Attributes:
        mode: short name used in configs and reports.
        trust_model: plain-words statement of who sees what, copied into privacy reports.
    """

    mode: str
    trust_model: str

    def aggregate(
        self,
        updates: Mapping[str, np.ndarray],
        *,
        round_index: int,
        rng: np.random.Generator,
        dropouts: Mapping[str, Stage] | None = None,
    ) -> SumResult:
        """The sum of the surviving clients' vectors, and what the server saw doing it.

        Raises:
            ValueError / TypeError: malformed updates (see ``check_updates``).
            DropoutError: too few clients survived; nothing is revealed.
        """

    def describe(self) -> dict[str, object]:
        """The backend's parameters (bounds, thresholds, presets), JSON data for reports."""

    def client_session(
        self,
        client_id: str,
        *,
        round_index: int,
        participants: Sequence[str],
        rng: np.random.Generator,
        keys: "ClientKeys | None",
    ) -> "ClientSession":
        """One client's half of one round (see :mod:`secagg.session`); it holds that client's secrets."""

    def server_session(
        self, *, round_index: int, participants: Sequence[str], length: int, public_context: bytes | None = None
    ) -> "ServerSession[SumResult]":
        """The server's half of one round: bytes in, the decoded sum out."""


def check_updates(updates: Mapping[str, np.ndarray], *, value_bound: float | None = None) -> tuple[list[str], int]:
    """Validate a round's inputs; return the sorted ids and the common length.

    Raises:
        ValueError: no updates, a non-1-D or empty vector, lengths that differ, NaN or Inf,
            or a coordinate outside ``[-value_bound, value_bound]``.
        TypeError: an id that is not a str, or a vector that is not a real numpy array.
    """
    if not updates:
        raise ValueError("updates must hold at least one client's vector, got none")
    ids = sorted(updates)
    length: int | None = None
    for cid in ids:
        if not isinstance(cid, str):
            raise TypeError(f"client ids must be str, got {cid!r} ({type(cid).__name__})")
        vec = updates[cid]
        if not isinstance(vec, np.ndarray):
            raise TypeError(f"update of client {cid!r} must be a numpy array, got {type(vec).__name__}")
        if vec.dtype == np.bool_ or not np.issubdtype(vec.dtype, np.number) or np.issubdtype(vec.dtype, np.complexfloating):
            raise TypeError(f"update of client {cid!r} must hold real numbers, got dtype {vec.dtype.name}")
        if vec.ndim != 1 or vec.size == 0:
            raise ValueError(f"update of client {cid!r} must be a non-empty 1-D vector, got shape {vec.shape}")
        if length is None:
            length = vec.size
        elif vec.size != length:
            raise ValueError(f"update of client {cid!r} has length {vec.size}, expected {length} like the others")
        if not np.all(np.isfinite(vec)):
            raise ValueError(f"update of client {cid!r} holds NaN or Inf")
        if value_bound is not None:
            peak = float(np.max(np.abs(vec)))
            if peak > value_bound:
                raise ValueError(
                    f"update of client {cid!r} has a coordinate of magnitude {peak:.6g}, "
                    f"above value_bound={value_bound!r}; clip before protecting"
                )
    assert length is not None
    return ids, length


class PlaintextSum:
    """The reference: the server sees every client's update and sums it in float64."""

    mode = "plaintext"
    trust_model = "Plaintext aggregation: the server sees every participating client's individual update in the clear."

    def client_session(
        self,
        client_id: str,
        *,
        round_index: int,
        participants: Sequence[str],
        rng: np.random.Generator,
        keys: "ClientKeys | None" = None,
    ) -> "ClientSession":
        """A client's half: it sends its vector as it is (``rng`` and ``keys`` are not needed)."""
        from .session import PlaintextClientSession

        return PlaintextClientSession(client_id, round_index=round_index)

    def server_session(
        self, *, round_index: int, participants: Sequence[str], length: int, public_context: bytes | None = None
    ) -> "ServerSession[SumResult]":
        """The server's half: the float64 sum of the vectors it receives."""
        from .session import PlaintextServerSession

        return PlaintextServerSession(round_index=round_index, participants=participants, length=length)

    def aggregate(
        self,
        updates: Mapping[str, np.ndarray],
        *,
        round_index: int,
        rng: np.random.Generator,
        dropouts: Mapping[str, Stage] | None = None,
    ) -> SumResult:
        """The exact float64 sum of the updates that were not dropped; the server sees each one.

        Runs the client and server sessions in this process through :func:`secagg.drive_round`.
        """
        from .session import drive_round

        ids, length = check_updates(updates)
        server = self.server_session(round_index=round_index, participants=ids, length=length)
        parties = {}
        for cid in ids:
            session = self.client_session(cid, round_index=round_index, participants=ids, rng=rng)
            session.set_input(updates[cid])
            parties[cid] = session.handle
        return drive_round(server, parties, dropouts=dropouts)

    def describe(self) -> dict[str, object]:
        """``{"mode": "plaintext"}``: nothing to configure."""
        return {"mode": self.mode}
