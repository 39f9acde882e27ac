"""``MaskedSum``: the masked secure-sum backend (SecAgg / SecAgg+) behind :class:`SecureSum`.

A ``MaskedSum`` is public configuration. Each party builds its own half of a round from it:
:meth:`MaskedSum.client_session` inside a client party (it encodes the client's clipped,
weighted float vector into Z_2^b with the client's own generator, stochastic rounding and
optional distributed integer noise, and runs the client's state machine with the client's own
identity key), :meth:`MaskedSum.server_session` inside the server party (it sees only bytes
and learns only the decoded sum of the clients whose masked input reached it). The messages
are those of :mod:`secagg.messages`. :meth:`MaskedSum.aggregate` runs both halves in process
through :func:`secagg.drive_round`, the reference that tests and benchmarks use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from . import _primitives as prim
from .base import IntegerNoise, Stage, SumResult, check_updates
from .encoding import FixedPointEncoder
from .errors import KeyMaterialError, OverflowRiskError
from .graph import SecAggPlan, plan_complete, plan_secagg_plus
from .messages import decode_directory, encode_directory
from .protocol import (
    IntegerSumResult,
    RoundPolicy,
    SecAggClient,
    SecAggClientSession,
    SecAggServer,
    SecAggServerSession,
    check_dropouts,
    secure_sum_integers,
)

if TYPE_CHECKING:
    from .session import ClientKeys

__all__ = ["MaskedSum"]

GRAPHS = ("complete", "secagg+")


class MaskedSum:
    """Masked secure aggregation (Bonawitz et al. 2017; SecAgg+, Bell et al. 2020).

    Args:
        value_bound: every input coordinate lies in ``[-value_bound, value_bound]`` (callers
            clip and weight first); larger values are refused.
        max_clients: the most clients a round may have; sizes the encoder's scale.
        bits: ring width, 32 (default) or 64.
        graph: ``"complete"`` (SecAgg) or ``"secagg+"`` (random Harary graph, degree O(log n)).
        threshold: shares needed per secret; None lets the planner choose per round.
        degree: SecAgg+ neighbours per client (even); None lets the planner choose.
        integer_noise: distributed noise added by each client to its integer vector.
        signed_keys: the active-server mode: every client message Ed25519-signed with the
            client's identity key (``ClientKeys``), the consistency check, and a plan with
            ``2t > k + 2 + corrupted``; the server session then needs the identity directory
            (``public_context``).
        dropout_rate: the dropouts to plan for: with the complete graph any
            ``floor(dropout_rate * n)`` clients may drop (worst case); with SecAgg+ clients
            drop independently at this rate and the round completes with probability
            at least ``1 - 2^-20`` (for rounds too small for a sparse graph the planner
            falls back to the complete graph and states the probability it reaches).
        corrupted_fraction: fraction of clients assumed to collude with the server (in signed
            mode counted as if all sat among one client's holders, whatever the graph).
        security_bits: SecAgg+ privacy failure target ``2^-security_bits``.

    Raises:
        ValueError: bad bounds, graph, degree or threshold; :class:`OverflowRiskError` when
            the encoding could overflow.
    """

    mode = "masked"

    def __init__(
        self,
        *,
        value_bound: float,
        max_clients: int,
        bits: int = 32,
        graph: str = "complete",
        threshold: int | None = None,
        degree: int | None = None,
        integer_noise: IntegerNoise | None = None,
        signed_keys: bool = False,
        dropout_rate: float = 0.25,
        corrupted_fraction: float = 0.0,
        security_bits: int = 40,
    ) -> None:
        self._encoder = FixedPointEncoder(
            value_bound=value_bound, max_clients=max_clients, bits=bits, integer_noise=integer_noise
        )
        if graph not in GRAPHS:
            raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")
        if degree is not None and graph != "secagg+":
            raise ValueError(f"degree applies to graph='secagg+' only, got degree={degree!r} with graph={graph!r}")
        if degree is not None and (isinstance(degree, bool) or not isinstance(degree, int) or degree < 2 or degree % 2):
            raise ValueError(f"degree must be an even int >= 2, got {degree!r}")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1):
            raise ValueError(f"threshold must be an int >= 1 or None, got {threshold!r}")
        if threshold is not None and threshold > max_clients:
            raise ValueError(f"threshold={threshold} exceeds max_clients={max_clients}")
        if not isinstance(signed_keys, bool):
            raise TypeError(f"signed_keys must be a bool, got {type(signed_keys).__name__}")
        self._graph = graph
        self._threshold = threshold
        self._degree = degree
        self._noise = integer_noise
        self._signed = signed_keys
        self._dropout_rate = dropout_rate
        self._corrupted = corrupted_fraction
        self._security_bits = security_bits
        self._last_plan: SecAggPlan | None = None
        self.plan(max_clients)  # validate the planning parameters now, not in round 37
        self.trust_model = self._trust_model()

    # ---------------------------------------------------------------- planning
    @property
    def encoder(self) -> FixedPointEncoder:
        """The fixed-point encoder sized for this backend's bound and client count."""
        return self._encoder

    @property
    def value_bound(self) -> float:
        """Every input coordinate must lie in ``[-value_bound, value_bound]``."""
        return self._encoder.value_bound

    @property
    def max_clients(self) -> int:
        """The most clients a round may have (the encoder's overflow guarantee)."""
        return self._encoder.max_clients

    @property
    def integer_noise(self) -> IntegerNoise | None:
        """The distributed-DP noise each client adds before masking, if any."""
        return self._noise

    def without_noise(self) -> "MaskedSum":
        """The same ring, graph, threshold and signing, without distributed noise.

        Its messages have the sizes of this backend's (noise changes values, not lengths), at
        any vector length: what sizing a round's upload on a small probe vector needs.
        """
        return MaskedSum(
            value_bound=self.value_bound, max_clients=self.max_clients, bits=self._encoder.bits, graph=self._graph,
            threshold=self._threshold, degree=self._degree, signed_keys=self._signed, dropout_rate=self._dropout_rate,
            corrupted_fraction=self._corrupted, security_bits=self._security_bits,
        )  # fmt: skip

    def plan(self, n: int) -> SecAggPlan:
        """Graph degree and threshold for a round of ``n`` participants, with its guarantee.

        Raises:
            ValueError: an explicit threshold impossible for n, or no secure plan.
        """
        if self._graph == "complete":
            if self._threshold is not None and self._threshold > n:
                raise ValueError(f"threshold={self._threshold} is impossible for a round of {n} clients")
            return plan_complete(
                n=n,
                dropout_rate=self._dropout_rate,
                corrupted_fraction=self._corrupted,
                threshold=self._threshold,
                active_server=self._signed,
            )
        degree = self._degree if self._degree is None or self._degree < n - 1 else n - 1
        if self._threshold is not None and self._threshold > (degree if degree is not None else n - 1) + 1:
            raise ValueError(
                f"threshold={self._threshold} is impossible for a round of {n} clients "
                f"with degree {degree if degree is not None else n - 1}"
            )
        return plan_secagg_plus(
            n=n,
            dropout_rate=self._dropout_rate,
            corrupted_fraction=self._corrupted,
            security_bits=self._security_bits,
            degree=degree,
            threshold=self._threshold,
            active_server=self._signed,
        )

    def _trust_model(self) -> str:
        """Who sees what, attack by attack, as the code enforces it (each claim has a test in tests/unit/secagg)."""
        graph = "the complete graph (SecAgg)" if self._graph == "complete" else "a random sparse graph (SecAgg+)"
        common = (
            f"Masked secure aggregation over {graph}, {self._encoder.bits}-bit ring. The server sees each client's "
            "update only masked by pseudorandom pairwise and self masks (AES-256-CTR keystreams of 256-bit X25519/HKDF "
            "secrets; each masked vector is uniform in the ring) and learns only the sum of the inputs of the clients "
            "whose masked input reached it; a round with fewer than threshold survivors fails before any secret is "
            "rebuilt. Clients refuse a round set-up below the threshold, degree and participants they plan themselves "
            "from this configuration (a threshold of 1 is refused), refuse a second unmask request (so one client never "
            "gives both secrets of a peer), refuse messages replayed from another round, and leave a round in which "
            "fewer than threshold of their holders shared with them. A corrupted share is set aside by its digest and "
            "its sender named; the round completes while threshold good shares remain. "
        )
        if self._signed:
            mode = (
                "Signed mode, against an active server that colludes with at most floor(corrupted_fraction * n) "
                "clients: every client message is Ed25519-signed over its bytes (round and stage bound), so a changed "
                "or substituted masked input, unmask response or public key is rejected; each advertisement signs the "
                "set-up the client saw, so clients shown different set-ups refuse each other. The graph seed is a hash "
                "of every advertisement, fixed only once the keys are in; a graph of the server's choosing is refused, "
                "and the planner's condition 2t > k + 2 + corrupted holds for every graph. A consistency check runs "
                "after the masked inputs: each client signs the survivor set it was shown, answers the unmask request "
                "only under that set and only after threshold valid signatures over it from its own holders, and "
                "reveals a dropped neighbour's key only after threshold signatures from that neighbour's holders; a "
                "server that shows different clients different survivor sets therefore cannot rebuild an individual "
                "input (see secagg.graph for the argument). "
            )
        else:
            mode = (
                "Unsigned mode: honest-but-curious server, possibly colluding with fewer than threshold of any "
                "client's share holders. Nothing is claimed against an active server: it could substitute public "
                "keys, show different clients different survivor sets, or alter messages unnoticed (integrity of the "
                "channel is left to TLS); use signed_keys=True against an active server. "
            )
        return (
            common
            + mode
            + "Not covered: a server that drops honest clients selectively (it still learns only a sum over at least "
            "threshold clients), more colluding clients than planned, and clients that submit out-of-range values "
            "(masking hides, it does not validate). Dropouts are tolerated at every stage while every needed secret "
            "keeps threshold answering holders (see describe()['guarantee']). The decoded sum equals the exact sum of "
            "the contributors within the encoder's rounding bound, plus any distributed integer noise the clients add."
        )

    def describe(self) -> dict[str, object]:
        """Mode, ring, scale, graph, degree, threshold, signing and the planner's guarantee.

        Degree and threshold are those of the last round, or of a round of ``max_clients``
        before any round ran (they are re-planned for each round's participant count).
        """
        plan = self._last_plan or self.plan(self._encoder.max_clients)
        return {
            "mode": self.mode,
            "bits": self._encoder.bits,
            "scale": self._encoder.scale,
            "step": self._encoder.step,
            "value_bound": self._encoder.value_bound,
            "max_clients": self._encoder.max_clients,
            "graph": self._graph,
            "planned_graph": plan.graph,
            "n": plan.n,
            "degree": plan.degree,
            "threshold": plan.threshold,
            "tolerated_dropouts": plan.tolerated_dropouts,
            "signed_keys": self._signed,
            "integer_noise": type(self._noise).__name__ if self._noise is not None else None,
            "noise_headroom": self._encoder.noise_headroom,
            "guarantee": plan.guarantee,
        }

    # ---------------------------------------------------------------- party halves
    @property
    def signed_keys(self) -> bool:
        """Whether rounds use Ed25519 identity keys (the active-server mode)."""
        return self._signed

    def client_session(
        self,
        client_id: str,
        *,
        round_index: int,
        participants: Sequence[str],
        rng: np.random.Generator,
        keys: "ClientKeys | None" = None,
    ) -> "MaskedClientSession":
        """One client's half of a round, built inside the client party.

        Args:
            client_id: this client.
            round_index: the round it takes part in (messages of other rounds are refused).
            participants: the round's participants as the client was told them.
            rng: the client's own generator (stochastic rounding and integer noise).
            keys: the client's identity key and the federation's public-key directory
                (required with ``signed_keys``; ignored otherwise).

        Raises:
            TypeError: ``rng`` is not a numpy Generator.
            KeyMaterialError: signed mode without an identity key or directory.
        """
        return MaskedClientSession(self, client_id, round_index=round_index, participants=participants, rng=rng, keys=keys)

    def server_session(
        self,
        *,
        round_index: int,
        participants: Sequence[str],
        length: int,
        public_context: bytes | None = None,
        keep_masked: bool = False,
    ) -> "MaskedServerSession":
        """The server's half of a round: it receives bytes only and returns the decoded sum.

        Args:
            public_context: signed mode: :meth:`public_context` of the participants' identity
                public keys (required); unsigned mode: None.
            keep_masked: keep the server's view of each masked vector (notebooks).

        Raises:
            ValueError: no plan for ``len(participants)``; :class:`OverflowRiskError` for more
                than ``max_clients``.
            KeyMaterialError: signed mode without the directory, or unsigned mode with one.
        """
        if self._signed and public_context is None:
            raise KeyMaterialError("signed_keys=True: server_session needs public_context=backend.public_context(directory)")
        if not self._signed and public_context is not None:
            raise KeyMaterialError("signed_keys=False: server_session takes no public_context")
        identities = decode_directory(public_context) if public_context is not None else None
        return MaskedServerSession(
            self,
            round_index=round_index,
            participants=participants,
            length=length,
            identities=identities,
            keep_masked=keep_masked,
        )

    def public_context(self, peer_identities: Mapping[str, bytes]) -> bytes:
        """The server session's public material in signed mode: the identity directory as bytes.

        The server party holds the participants' Ed25519 public keys (never a private key) to
        check every client message's signature.
        """
        return encode_directory(peer_identities)

    def policy(self, participants: Sequence[str]) -> RoundPolicy:
        """What a client accepts as the set-up of a round with these participants.

        Planned by the client itself from this public configuration with the same planner
        the server uses, so a server that sends a lower threshold, another degree or other
        participants is refused.

        Raises:
            ValueError: no plan for that many participants; :class:`OverflowRiskError` for
                more than ``max_clients``.
        """
        ids = tuple(sorted(participants))
        self._check_size(len(ids))
        plan = self.plan(len(ids))
        source = (
            f"MaskedSum(graph={self._graph!r}, dropout_rate={self._dropout_rate!r}, "
            f"corrupted_fraction={self._corrupted!r}, signed_keys={self._signed!r})"
        )
        return RoundPolicy(ids, plan.threshold, plan.degree, self._encoder.bits, self._signed, source=source)

    def _round_plan(self, n: int) -> SecAggPlan:
        self._check_size(n)
        plan = self.plan(n)
        self._last_plan = plan
        return plan

    # ---------------------------------------------------------------- rounds
    def encode_client(self, vector: np.ndarray, *, rng: np.random.Generator, who: str = "input") -> np.ndarray:
        """What one client sends into masking: encoded words plus its integer noise, if any."""
        if self._noise is None:
            return self._encoder.encode(vector, rng=rng, who=who)
        ints = self._encoder.quantize(vector, rng=rng, who=who)
        noise = np.asarray(self._noise.sample(ints.size, scale=self._encoder.scale, rng=rng))
        if noise.shape != ints.shape or noise.dtype.kind not in "iu":
            raise TypeError(f"integer_noise.sample must return {ints.size} integers, got {noise.dtype} of shape {noise.shape}")
        return self._encoder.wrap(ints + noise.astype(np.int64))

    def _throwaway_keys(self, ids: Sequence[str]) -> dict[str, "ClientKeys"] | None:
        """Fresh identity keys for one in-process round, one per simulated client (None unless signed)."""
        from .session import ClientKeys

        if not self._signed:
            return None
        private = {cid: prim.new_identity_key() for cid in ids}
        directory = {cid: prim.identity_public_raw(key) for cid, key in private.items()}
        return {cid: ClientKeys(identity_key=private[cid], peer_identities=directory) for cid in ids}

    def aggregate_integers(
        self,
        vectors: Mapping[str, np.ndarray],
        *,
        round_index: int,
        dropouts: Mapping[str, Stage] | None = None,
        keep_masked: bool = False,
    ) -> IntegerSumResult:
        """Sum already-encoded ring words with this backend's graph, threshold and signing.

        Returns the ring sum and, with ``keep_masked``, the server's view of every
        masked vector (what notebooks show beside the true update).
        """
        ids = sorted(vectors)
        plan = self._round_plan(len(ids))
        keys = self._throwaway_keys(ids)
        return secure_sum_integers(
            vectors,
            round_index=round_index,
            threshold=plan.threshold,
            degree=plan.degree,
            bits=self._encoder.bits,
            dropouts=dropouts,
            identity_keys={cid: k.identity_key for cid, k in keys.items()} if keys is not None else None,
            keep_masked=keep_masked,
        )

    def _check_size(self, n: int) -> None:
        if n > self._encoder.max_clients:
            raise OverflowRiskError(
                f"a round of {n} clients exceeds max_clients={self._encoder.max_clients}, for which the "
                f"{self._encoder.bits}-bit encoding was sized; their sum could overflow"
            )

    def aggregate(
        self,
        updates: Mapping[str, np.ndarray],
        *,
        round_index: int,
        rng: np.random.Generator,
        dropouts: Mapping[str, Stage] | None = None,
    ) -> SumResult:
        """Run one masked round over float updates in process; return the decoded sum.

        Each simulated client gets its own child of ``rng`` and, in signed mode, a throwaway
        identity key made for this call; the halves run through :func:`secagg.drive_round`.

        Raises:
            ValueError: invalid updates (naming the client), a coordinate beyond
                ``value_bound``, bad dropouts; :class:`OverflowRiskError` for more than
                ``max_clients`` clients.
            DropoutError: too few survivors for the threshold.
            ProtocolError: a message broke the protocol.
        """
        from .session import drive_round

        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        ids, length = check_updates(updates, value_bound=self._encoder.value_bound)
        self._check_size(len(ids))
        silent = check_dropouts(dropouts, ids)
        keys = self._throwaway_keys(ids)
        directory = next(iter(keys.values())).peer_identities if keys is not None else None
        server = self.server_session(
            round_index=round_index,
            participants=ids,
            length=length,
            public_context=None if directory is None else self.public_context(directory),
        )
        parties = {}
        for cid, child in zip(ids, rng.spawn(len(ids))):  # one independent stream per client, whatever drops
            session = self.client_session(
                cid, round_index=round_index, participants=ids, rng=child, keys=keys[cid] if keys is not None else None
            )
            session.set_input(updates[cid])
            parties[cid] = session.handle
        return drive_round(server, parties, dropouts=silent)


class MaskedClientSession:
    """A client's half of a masked round; lives in the client party and holds its secrets.

    It encodes the client's vector with the client's own generator and runs a
    :class:`SecAggClient` (signed with the client's identity key in signed mode).
    """

    def __init__(
        self,
        backend: MaskedSum,
        client_id: str,
        *,
        round_index: int,
        participants: Sequence[str],
        rng: np.random.Generator,
        keys: "ClientKeys | None",
    ) -> None:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        identity = directory = None
        if backend.signed_keys:
            if keys is None or keys.identity_key is None or keys.peer_identities is None:
                raise KeyMaterialError(
                    f"client {client_id!r}: signed_keys=True needs ClientKeys with identity_key and peer_identities"
                )
            identity, directory = keys.identity_key, keys.peer_identities
        self.client_id = client_id
        self._backend = backend
        self._rng = rng
        self._session = SecAggClientSession(
            SecAggClient(
                client_id,
                round_index=round_index,
                policy=backend.policy(participants),
                identity_key=identity,
                identity_keys=directory,
            )
        )

    def set_input(self, vector: np.ndarray) -> None:
        """Encode the clipped, weighted float vector with this client's generator.

        Raises:
            ValueError / TypeError: a malformed vector or a coordinate beyond ``value_bound``.
        """
        check_updates({self.client_id: vector}, value_bound=self._backend.value_bound)
        words = self._backend.encode_client(vector, rng=self._rng, who=f"update of client {self.client_id!r}")
        self._session.set_words(words)

    def handle(self, message: bytes) -> bytes | None:
        """Answer one server message (None: the client left the round).

        Raises:
            ProtocolError: a malformed, replayed, misaddressed or out-of-protocol message.
        """
        return self._session.handle(message)


class MaskedServerSession:
    """The server's half of a masked round: bytes in, the decoded sum of the contributors out."""

    def __init__(
        self,
        backend: MaskedSum,
        *,
        round_index: int,
        participants: Sequence[str],
        length: int,
        identities: Mapping[str, bytes] | None,
        keep_masked: bool = False,
    ) -> None:
        ids = sorted(participants)
        plan = backend._round_plan(len(ids))
        self._encoder = backend.encoder
        self._mode = backend.mode
        self._session = SecAggServerSession(
            SecAggServer(
                round_index=round_index,
                participants=ids,
                threshold=plan.threshold,
                degree=plan.degree,
                bits=self._encoder.bits,
                length=length,
                identities=identities,
                keep_masked=keep_masked,
            )
        )

    @property
    def stage(self) -> Stage:
        """The stage of the batch the last :meth:`outgoing` returned."""
        return self._session.stage

    @property
    def server(self) -> SecAggServer:
        """The state machine beneath (setup, graph, byte counters, the masked views kept)."""
        return self._session.server

    def outgoing(self) -> dict[str, bytes]:
        """Close the current stage; the next batch by recipient (``{}`` once unmasked).

        Raises:
            DropoutError: too few clients answered; nothing was revealed.
        """
        return self._session.outgoing()

    def receive(self, sender: str, message: bytes) -> None:
        """One client's reply (bytes whose sender field is ``sender``).

        Raises:
            ProtocolError: anything but a well-formed message of this stage from ``sender``.
        """
        self._session.receive(sender, message)

    def finish(self) -> SumResult:
        """The decoded sum of the contributors, with the bytes each way and the error bound."""
        ring = self._session.finish()
        m = len(ring.contributors)
        return SumResult(
            total=self._encoder.decode(ring.total, num_clients=m),
            contributors=ring.contributors,
            dropped=ring.dropped,
            bytes_up=ring.bytes_up,
            bytes_down=ring.bytes_down,
            max_abs_error=self._encoder.error_bound(m),
            mode=self._mode,
        )
