"""Client and server state machines of masked secure aggregation (SecAgg / SecAgg+).

The four stages of Bonawitz et al. (CCS 2017, Fig. 4) on a neighbour graph (Bell et al.,
CCS 2020): the complete graph is SecAgg, a random Harary graph of degree O(log n) SecAgg+.
Each side consumes and produces bytes in the formats of :mod:`secagg.messages`.

1. ADVERTISE_KEYS. The server broadcasts :class:`RoundSetup`. Each client makes two fresh
   X25519 key pairs (share transport, masks) and a 256-bit self-mask seed ``b``, and
   advertises both public keys and a commitment to ``b`` (Ed25519-signed if required).
2. SHARE_KEYS. The server sends each client its neighbours' advertisements. The client
   Shamir-shares ``b`` and its mask private key to its holders (neighbours and itself) with
   threshold t, and seals each neighbour's pair of shares with AES-256-GCM under a key from
   X25519 + HKDF; the associated data binds version, round, stage, sender and receiver.
3. MASKED_INPUT. The server forwards the sealed shares. A client adds to its encoded input
   the keystream of its self-mask seed and, for each neighbour that shared, the keystream of
   their pairwise X25519 secret, with sign + if its index is lower and - otherwise; all
   in Z_2^b. It sends the packed masked vector.
4. UNMASK. The server tells each survivor who sent a masked input (alive) and who shared
   but did not (dropped). A client refuses a request whose sets overlap, that names it as
   dropped, that contradicts what it received, or that comes a second time; otherwise it
   returns its shares of alive neighbours' seeds and dropped neighbours' mask keys. The
   server rebuilds each needed secret from exactly t shares, checks it against the
   advertised commitment or public key, and removes the masks.

What each party observes: the server sees public keys, sealed shares, masked vectors
(uniform in Z_2^b), and at the end, for each client, one of its two secrets; a client sees
its neighbours' public keys and its own shares of their secrets. Dropouts are tolerated at
every stage while every needed secret keeps t answering holders (and at least t clients
remain after each stage); otherwise :class:`DropoutError` is raised before any secret is
rebuilt.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

import numpy as np

from . import _primitives as prim
from . import shamir
from .base import Stage
from .encoding import check_bits, unpack
from .errors import DropoutError, KeyMaterialError, ProtocolError
from .graph import neighbours, neighbours_of
from .messages import (
    KeyAdvertisement,
    KeyList,
    MaskedInput,
    MessageKind,
    RoundSetup,
    SealedShare,
    ShareBundle,
    ShareDelivery,
    UnmaskRequest,
    UnmaskResponse,
    message_kind,
    message_sender,
)

__all__ = [
    "SecAggClient",
    "SecAggServer",
    "SecAggClientSession",
    "SecAggServerSession",
    "IntegerSumResult",
    "secure_sum_integers",
]

_DTYPES = {32: np.dtype("<u4"), 64: np.dtype("<u8")}


# ----------------------------------------------------------------------------- shared rules


def _share_aad(round_index: int, sender: str, receiver: str) -> bytes:
    return prim.label(prim.LABEL_SHARE_AAD, prim.PROTOCOL_VERSION, round_index, int(Stage.SHARE_KEYS), sender, receiver)


def _transport_key(shared: bytes, round_index: int, sender: str, receiver: str) -> bytes:
    return prim.hkdf(shared, prim.LABEL_SHARE_TRANSPORT, round_index, sender, receiver)


def _pairwise_seed(shared: bytes, round_index: int, low: str, high: str) -> bytes:
    return prim.hkdf(shared, prim.LABEL_PAIRWISE_MASK, round_index, low, high)


def _self_seed(seed: bytes, round_index: int, owner: str) -> bytes:
    return prim.hkdf(seed, prim.LABEL_SELF_MASK, round_index, owner)


def _commitment(seed: bytes, round_index: int, owner: str) -> bytes:
    return prim.digest(prim.LABEL_SELF_MASK_COMMITMENT, round_index, owner, seed)


def _check_round_index(round_index: object) -> int:
    if isinstance(round_index, bool) or not isinstance(round_index, int) or not 0 <= round_index < (1 << 64):
        raise ValueError(f"round_index must be an int in [0, 2^64), got {round_index!r}")
    return round_index


def _plaintext_share(owner: str, holder: str, x: int, seed_share: bytes, key_share: bytes) -> bytes:
    return prim.context(owner, holder, x) + seed_share + key_share


def _parse_plaintext_share(data: bytes, owner: str, holder: str, x: int) -> tuple[bytes, bytes]:
    head = prim.context(owner, holder, x)
    if len(data) != len(head) + 2 * shamir.SHARE_BYTES or data[: len(head)] != head:
        raise ProtocolError(f"share from {owner!r} is not addressed to {holder!r} at x={x}")
    body = data[len(head) :]
    return body[: shamir.SHARE_BYTES], body[shamir.SHARE_BYTES :]


# ----------------------------------------------------------------------------- client


class SecAggClient:
    """One client's side of one round. Call the four stage methods in order.

    Args:
        client_id: this client's id (as listed in the round's participants).
        round_index: the round it expects; a message of any other round is refused.
        identity_key: its Ed25519 key, to sign its advertisement (signed rounds).
        identity_keys: raw Ed25519 public keys of the participants; when given, the client
            requires a signed round and verifies every neighbour's advertisement.

    Every malformed, replayed, swapped or tampered message, and every server request that
    breaks the protocol, raises :class:`ProtocolError`; the client then stays in its state.
    """

    def __init__(
        self,
        client_id: str,
        *,
        round_index: int,
        identity_key=None,
        identity_keys: Mapping[str, bytes] | None = None,
    ) -> None:
        if not isinstance(client_id, str):
            raise TypeError(f"client_id must be str, got {type(client_id).__name__}")
        self.client_id = client_id
        self.round_index = _check_round_index(round_index)
        self._identity_key = None if identity_key is None else prim.check_identity_private(identity_key, client_id)
        self._pki = (
            {cid: prim.check_identity_public(pk, cid) for cid, pk in identity_keys.items()}
            if identity_keys is not None
            else None
        )
        self._stage: Stage | None = Stage.ADVERTISE_KEYS
        self._setup: RoundSetup | None = None

    @property
    def stage(self) -> Stage | None:
        """The stage whose server message the client expects next (None once done)."""
        return self._stage

    def _expect(self, stage: Stage, what: str) -> None:
        if self._stage != stage:
            raise ProtocolError(
                f"client {self.client_id!r} got a {what} while expecting "
                f"{self._stage.name if self._stage is not None else 'nothing (round finished)'}"
            )

    def _check_header(self, msg, field_name: str) -> None:
        if msg.round_index != self.round_index:
            raise ProtocolError(
                f"client {self.client_id!r} is in round {self.round_index}, message is for round {msg.round_index}"
            )
        if getattr(msg, field_name) != self.client_id:
            raise ProtocolError(f"message for {getattr(msg, field_name)!r} delivered to {self.client_id!r}")

    # -- stage 0 -------------------------------------------------------------------
    def advertise(self, setup: bytes) -> bytes:
        """Read the round setup; return this client's :class:`KeyAdvertisement` bytes."""
        self._expect(Stage.ADVERTISE_KEYS, "round setup")
        s = RoundSetup.from_bytes(setup)
        if s.round_index != self.round_index:
            raise ProtocolError(f"client {self.client_id!r} is in round {self.round_index}, setup is for round {s.round_index}")
        parts = s.participants
        if list(parts) != sorted(set(parts)):
            raise ProtocolError("participants must be sorted and distinct")
        if self.client_id not in parts:
            raise ProtocolError(f"client {self.client_id!r} is not among the round's participants")
        n = len(parts)
        holders = min(s.degree, n - 1) + 1
        if s.degree < n - 1 and s.degree % 2:
            raise ProtocolError(f"sparse degree must be even, got {s.degree}")
        if not 1 <= s.threshold <= holders:
            raise ProtocolError(f"threshold {s.threshold} outside [1, {holders}] for {holders} holders")
        if s.bits not in _DTYPES:
            raise ProtocolError(f"ring width {s.bits} bits is not supported")
        if self._pki is not None and not s.signed:
            raise ProtocolError("this client requires signed key advertisement; the setup disables it")
        if s.signed and self._identity_key is None:
            raise ProtocolError(f"signed round but client {self.client_id!r} holds no identity key")
        if s.signed and self._pki is None:
            raise ProtocolError(f"signed round but client {self.client_id!r} knows no identity keys to verify")
        self._setup = s
        self._index = {cid: i for i, cid in enumerate(parts)}
        self._me = self._index[self.client_id]
        self._nbrs = frozenset(parts[j] for j in neighbours_of(n, degree=s.degree, seed=s.graph_seed, node=self._me))
        self._enc_sk, enc_pk = prim.new_x25519()
        self._mask_sk, mask_pk = prim.new_x25519()
        self._seed = prim.random_secret()
        ad = KeyAdvertisement(
            s.round_index, self.client_id, enc_pk, mask_pk, _commitment(self._seed, s.round_index, self.client_id)
        )
        if s.signed:
            ad = KeyAdvertisement(
                ad.round_index, ad.sender, ad.enc_public, ad.mask_public, ad.commitment,
                prim.sign(self._identity_key, ad.signed_bytes()),
            )
        self._own_ad = ad
        self._stage = Stage.SHARE_KEYS
        return ad.to_bytes()

    # -- stage 1 -------------------------------------------------------------------
    def share_keys(self, key_list: bytes) -> bytes:
        """Check the neighbours' keys; return the sealed shares (:class:`ShareBundle` bytes).

        Raises:
            ProtocolError: a non-neighbour, a repeated id or key, or a bad signature.
            DropoutError: fewer than t holders (itself included) advertised: its secrets
                could never be rebuilt, so it leaves the round here.
        """
        self._expect(Stage.SHARE_KEYS, "key list")
        kl = KeyList.from_bytes(key_list)
        self._check_header(kl, "recipient")
        s = self._setup
        peers: dict[str, KeyAdvertisement] = {}
        seen_keys = {self._own_ad.enc_public, self._own_ad.mask_public}
        for ad in kl.advertisements:
            if ad.sender not in self._nbrs:
                raise ProtocolError(f"key list names {ad.sender!r}, not a neighbour of {self.client_id!r}")
            if ad.sender in peers:
                raise ProtocolError(f"key list names {ad.sender!r} twice")
            if ad.enc_public in seen_keys or ad.mask_public in seen_keys or ad.enc_public == ad.mask_public:
                raise ProtocolError(f"key list repeats a public key (at {ad.sender!r})")
            seen_keys.update((ad.enc_public, ad.mask_public))
            if s.signed:
                if ad.sender not in self._pki:
                    raise ProtocolError(f"no identity key known for {ad.sender!r}")
                prim.verify(self._pki[ad.sender], ad.signature, ad.signed_bytes())
            peers[ad.sender] = ad
        if len(peers) + 1 < s.threshold:
            self._stage = None
            raise DropoutError(
                f"client {self.client_id!r}: only {len(peers) + 1} holders advertised keys, fewer than "
                f"threshold={s.threshold}; it leaves the round before sharing"
            )
        self._peers = peers
        holders = sorted([self.client_id, *peers], key=self._index.__getitem__)
        xs = [self._index[h] + 1 for h in holders]
        table = shamir.split_many(
            [self._seed, self._mask_sk.private_bytes_raw()], threshold=s.threshold, xs=xs
        )
        sealed = []
        for holder, x, (seed_share, key_share) in zip(holders, xs, table):
            if holder == self.client_id:
                self._own_shares = (seed_share, key_share)
                continue
            key = _transport_key(prim.agree(self._enc_sk, peers[holder].enc_public), s.round_index, self.client_id, holder)
            blob = prim.seal(
                key,
                _plaintext_share(self.client_id, holder, x, seed_share, key_share),
                _share_aad(s.round_index, self.client_id, holder),
            )
            sealed.append(SealedShare(holder, blob))
        self._stage = Stage.MASKED_INPUT
        return ShareBundle(s.round_index, self.client_id, tuple(sealed)).to_bytes()

    # -- stage 2 -------------------------------------------------------------------
    def masked_input(self, delivery: bytes, *, vector: np.ndarray) -> bytes:
        """Open the shares addressed to it; return its masked vector (:class:`MaskedInput` bytes).

        The vector is masked in place inside the outgoing buffer, returned as a ``bytearray``.

        ``vector`` holds the encoded input as ring words (``uint32`` for 32 bits,
        ``uint64`` for 64) of the round's length.

        Raises:
            ProtocolError: a share from a non-neighbour, twice, or failing authentication.
            ValueError, TypeError: ``vector`` of the wrong length or type.
        """
        self._expect(Stage.MASKED_INPUT, "share delivery")
        s = self._setup
        if not isinstance(vector, np.ndarray):
            raise TypeError(f"vector must be a numpy array, got {type(vector).__name__}")
        if vector.ndim != 1 or vector.size != s.length:
            raise ValueError(f"vector of client {self.client_id!r} must have length {s.length}, got shape {vector.shape}")
        if vector.dtype.kind != "u" or vector.dtype.itemsize * 8 != s.bits:
            raise TypeError(f"vector must hold {s.bits}-bit unsigned ring words, got {vector.dtype}")
        dl = ShareDelivery.from_bytes(delivery)
        self._check_header(dl, "recipient")
        held: dict[str, tuple[bytes, bytes]] = {}
        for entry in dl.shares:
            sender = entry.peer
            if sender not in self._peers:
                raise ProtocolError(f"delivery holds a share from {sender!r}, not a neighbour that advertised")
            if sender in held:
                raise ProtocolError(f"delivery holds two shares from {sender!r}")
            key = _transport_key(
                prim.agree(self._enc_sk, self._peers[sender].enc_public), s.round_index, sender, self.client_id
            )
            plain = prim.open_sealed(key, entry.blob, _share_aad(s.round_index, sender, self.client_id))
            held[sender] = _parse_plaintext_share(plain, sender, self.client_id, self._me + 1)
        self._held = held
        message, masked = MaskedInput.allocate(s.round_index, self.client_id, s.bits, s.length)
        masked[:] = vector
        streams = [(_self_seed(self._seed, s.round_index, self.client_id), 1)]
        for peer in sorted(held, key=self._index.__getitem__):
            mine_first = self._me < self._index[peer]
            low, high = (self.client_id, peer) if mine_first else (peer, self.client_id)
            shared = prim.agree(self._mask_sk, self._peers[peer].mask_public)
            streams.append((_pairwise_seed(shared, s.round_index, low, high), 1 if mine_first else -1))
        prim.add_keystreams(masked, streams)
        self._stage = Stage.UNMASK
        return message

    # -- stage 3 -------------------------------------------------------------------
    def unmask(self, request: bytes) -> bytes:
        """Answer the one unmask request of the round (:class:`UnmaskResponse` bytes).

        Raises:
            ProtocolError: alive and dropped overlap; this client listed as dropped or not
                as alive; a neighbour listed that did not share with it, or listed twice;
                an unknown id; fewer than t alive; or a second request.
        """
        self._expect(Stage.UNMASK, "unmask request")
        req = UnmaskRequest.from_bytes(request)
        self._check_header(req, "recipient")
        s = self._setup
        alive, dropped = set(req.alive), set(req.dropped)
        if len(alive) != len(req.alive) or len(dropped) != len(req.dropped):
            raise ProtocolError("unmask request lists a client twice")
        both = alive & dropped
        if both:
            raise ProtocolError(
                f"unmask request lists {sorted(both)!r} as both alive and dropped; "
                f"client {self.client_id!r} refuses to reveal both secrets of a peer"
            )
        if self.client_id in dropped:
            raise ProtocolError(f"unmask request names client {self.client_id!r} itself as dropped")
        if self.client_id not in alive:
            raise ProtocolError(f"unmask request does not list client {self.client_id!r} as alive")
        unknown = (alive | dropped) - self._index.keys()
        if unknown:
            raise ProtocolError(f"unmask request names non-participants {sorted(unknown)!r}")
        listed = ((alive | dropped) & self._nbrs) - {self.client_id}
        stray = listed - self._held.keys()
        if stray:
            raise ProtocolError(f"unmask request lists neighbours {sorted(stray)!r} that never shared with {self.client_id!r}")
        if len(alive) < s.threshold:
            raise ProtocolError(f"unmask request lists {len(alive)} alive clients, fewer than threshold={s.threshold}")
        seeds = [(self.client_id, self._own_shares[0])]
        keys = []
        for peer in sorted(listed, key=self._index.__getitem__):
            if peer in alive:
                seeds.append((peer, self._held[peer][0]))
            else:
                keys.append((peer, self._held[peer][1]))
        self._stage = None
        return UnmaskResponse(s.round_index, self.client_id, tuple(seeds), tuple(keys)).to_bytes()


# ----------------------------------------------------------------------------- server


class SecAggServer:
    """The server's side of one round.

    Args:
        round_index: the round; messages of any other round are refused.
        participants: the selected clients' ids (sorted internally).
        threshold: shares needed per secret (t).
        degree: neighbours per client; ``>= len(participants) - 1`` is the complete graph,
            otherwise even (SecAgg+).
        bits: ring width (32 or 64).
        length: coordinates per vector.
        signed_keys: require Ed25519-signed advertisements.
        keep_masked: keep a copy of every masked vector (the server's view, for notebooks).
        graph_seed: 32 bytes for the SecAgg+ ring order (None: fresh from the OS).

    Sequence: :meth:`setup_messages`, :meth:`receive_advertisement` per client,
    :meth:`key_lists`, :meth:`receive_shares`, :meth:`share_deliveries`,
    :meth:`receive_masked_input`, :meth:`unmask_requests`, :meth:`receive_unmask`,
    :meth:`finish`. ``bytes_up`` / ``bytes_down`` count every message by kind.
    """

    def __init__(
        self,
        *,
        round_index: int,
        participants: Sequence[str],
        threshold: int,
        degree: int,
        bits: int = 32,
        length: int,
        signed_keys: bool = False,
        keep_masked: bool = False,
        graph_seed: bytes | None = None,
    ) -> None:
        self.round_index = _check_round_index(round_index)
        parts = sorted(participants)
        if not parts:
            raise ValueError("participants must name at least one client, got none")
        if len(set(parts)) != len(parts):
            raise ValueError(f"participants must be distinct, got {parts!r}")
        for cid in parts:
            if not isinstance(cid, str):
                raise TypeError(f"client ids must be str, got {cid!r}")
        n = len(parts)
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 0:
            raise ValueError(f"degree must be an int >= 0, got {degree!r}")
        degree = min(degree, n - 1)
        holders = degree + 1
        if isinstance(threshold, bool) or not isinstance(threshold, int) or not 1 <= threshold <= holders:
            raise ValueError(f"threshold must be an int in [1, {holders}] for {holders} holders, got {threshold!r}")
        check_bits(bits)
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be an int >= 1, got {length!r}")
        seed = prim.random_secret() if graph_seed is None else graph_seed
        self._setup = RoundSetup(self.round_index, tuple(parts), threshold, degree, seed, bits, length, bool(signed_keys))
        self._nbrs = neighbours(n, degree=degree, seed=seed)
        self._ids = tuple(parts)
        self._index = {cid: i for i, cid in enumerate(parts)}
        self._t = threshold
        self._stage: Stage | None = Stage.ADVERTISE_KEYS
        self._ads: dict[int, KeyAdvertisement] = {}
        self._bundles: dict[int, ShareBundle] = {}
        self._u1: frozenset[int] = frozenset()
        self._u2: frozenset[int] = frozenset()
        self._u3: frozenset[int] = frozenset()
        self._masked_from: set[int] = set()
        self._responses: dict[int, UnmaskResponse] = {}
        self._sum = np.zeros(length, dtype=_DTYPES[bits])
        self._keep = keep_masked
        self.masked_views: dict[str, np.ndarray] = {}
        self.bytes_up: Counter[str] = Counter()
        self.bytes_down: Counter[str] = Counter()

    # -- helpers -------------------------------------------------------------------
    @property
    def setup(self) -> RoundSetup:
        """The round's setup: participants, threshold, neighbour graph seed, ring size, length."""
        return self._setup

    @property
    def threshold(self) -> int:
        """Survivors needed at every stage for the round to complete."""
        return self._t

    @property
    def degree(self) -> int:
        """Neighbours per client in the masking graph (n - 1 for the complete graph)."""
        return self._setup.degree

    def neighbours_of(self, client_id: str) -> tuple[str, ...]:
        """The clients ``client_id`` shares masks and key shares with."""
        return tuple(self._ids[j] for j in self._nbrs[self._index[client_id]])

    def _expect(self, stage: Stage, what: str) -> None:
        if self._stage != stage:
            now = self._stage.name if self._stage is not None else "finished"
            raise ProtocolError(f"server got {what} during stage {now}")

    def _sender(self, msg, allowed: frozenset[int] | None, seen, what: str) -> int:
        if msg.round_index != self.round_index:
            raise ProtocolError(f"{what} for round {msg.round_index}; the server is in round {self.round_index}")
        idx = self._index.get(msg.sender)
        if idx is None:
            raise ProtocolError(f"{what} from {msg.sender!r}, not a participant")
        if allowed is not None and idx not in allowed:
            raise ProtocolError(f"{what} from {msg.sender!r}, which is not in the previous stage's survivors")
        if idx in seen:
            raise ProtocolError(f"second {what} from {msg.sender!r}")
        return idx

    def _count_up(self, kind: MessageKind, data: bytes) -> None:
        self.bytes_up[kind.label] += len(data)

    def _send(self, kind: MessageKind, data: bytes) -> bytes:
        self.bytes_down[kind.label] += len(data)
        return data

    def _close(self, survivors: frozenset[int], stage: Stage) -> None:
        if len(survivors) < self._t:
            self._stage = None
            raise DropoutError(
                f"only {len(survivors)} clients completed stage {stage.name}, fewer than threshold={self._t}; "
                f"round {self.round_index} aborted before any secret was revealed"
            )

    # -- stage 0 -------------------------------------------------------------------
    def setup_messages(self) -> dict[str, bytes]:
        """The round setup, one copy per participant (stage ADVERTISE_KEYS)."""
        self._expect(Stage.ADVERTISE_KEYS, "a setup call")
        data = self._setup.to_bytes()
        return {cid: self._send(MessageKind.ROUND_SETUP, data) for cid in self._ids}

    def receive_advertisement(self, data: bytes) -> None:
        """Stage 0: take one client's public keys.

        Raises:
            ProtocolError: wrong stage or round, unknown or repeated sender, bad signature.
        """
        self._expect(Stage.ADVERTISE_KEYS, "a key advertisement")
        ad = KeyAdvertisement.from_bytes(data)
        idx = self._sender(ad, None, self._ads, "key advertisement")
        if self._setup.signed and not ad.signature:
            raise ProtocolError(f"unsigned key advertisement from {ad.sender!r} in a signed round")
        self._count_up(MessageKind.KEY_ADVERTISEMENT, data)
        self._ads[idx] = ad

    def key_lists(self) -> dict[str, bytes]:
        """Close ADVERTISE_KEYS; each advertiser's neighbours' advertisements.

        Raises:
            DropoutError: fewer than t clients advertised.
            ProtocolError: two clients advertised the same public key.
        """
        self._expect(Stage.ADVERTISE_KEYS, "a key-list call")
        self._u1 = frozenset(self._ads)
        self._close(self._u1, Stage.ADVERTISE_KEYS)
        keys: dict[bytes, str] = {}
        for idx in sorted(self._u1):
            ad = self._ads[idx]
            for k in (ad.enc_public, ad.mask_public):
                if k in keys:
                    raise ProtocolError(f"clients {keys[k]!r} and {ad.sender!r} advertised the same public key")
                keys[k] = ad.sender
        out = {}
        for idx in sorted(self._u1):
            ads = tuple(self._ads[j] for j in self._nbrs[idx] if j in self._u1)
            out[self._ids[idx]] = self._send(
                MessageKind.KEY_LIST, KeyList(self.round_index, self._ids[idx], ads).to_bytes()
            )
        self._stage = Stage.SHARE_KEYS
        return out

    # -- stage 1 -------------------------------------------------------------------
    def receive_shares(self, data: bytes) -> None:
        """Stage 1: take one client's encrypted key shares for its neighbours (the server cannot read them).

        Raises:
            ProtocolError: wrong stage or round, unknown or repeated sender, shares for non-neighbours.
        """
        self._expect(Stage.SHARE_KEYS, "a share bundle")
        bundle = ShareBundle.from_bytes(data)
        idx = self._sender(bundle, self._u1, self._bundles, "share bundle")
        expected = {self._ids[j] for j in self._nbrs[idx] if j in self._u1}
        got = [e.peer for e in bundle.shares]
        if len(got) != len(set(got)) or set(got) != expected:
            raise ProtocolError(
                f"share bundle of {bundle.sender!r} must address each neighbour that advertised once: "
                f"expected {sorted(expected)!r}, got {sorted(got)!r}"
            )
        self._count_up(MessageKind.SHARE_BUNDLE, data)
        self._bundles[idx] = bundle

    def share_deliveries(self) -> dict[str, bytes]:
        """Close SHARE_KEYS; for each client that shared, the sealed shares addressed to it.

        Raises:
            DropoutError: fewer than t clients shared.
        """
        self._expect(Stage.SHARE_KEYS, "a delivery call")
        self._u2 = frozenset(self._bundles)
        self._close(self._u2, Stage.SHARE_KEYS)
        inbox: dict[int, list[SealedShare]] = {idx: [] for idx in self._u2}
        for idx in sorted(self._u2):
            for entry in self._bundles[idx].shares:
                to = self._index[entry.peer]
                if to in inbox:
                    inbox[to].append(SealedShare(self._ids[idx], entry.blob))
        self._bundles = {}
        out = {
            self._ids[idx]: self._send(
                MessageKind.SHARE_DELIVERY, ShareDelivery(self.round_index, self._ids[idx], tuple(items)).to_bytes()
            )
            for idx, items in sorted(inbox.items())
        }
        self._stage = Stage.MASKED_INPUT
        return out

    # -- stage 2 -------------------------------------------------------------------
    def receive_masked_input(self, data: bytes) -> None:
        """Add one masked vector to the running sum (it is not kept unless ``keep_masked``)."""
        self._expect(Stage.MASKED_INPUT, "a masked input")
        msg = MaskedInput.from_bytes(data)
        idx = self._sender(msg, self._u2, self._masked_from, "masked input")
        s = self._setup
        if msg.bits != s.bits or msg.length != s.length:
            raise ProtocolError(
                f"masked input of {msg.sender!r} has {msg.length} x {msg.bits} bits, expected {s.length} x {s.bits}"
            )
        words = unpack(msg.payload, bits=s.bits, length=s.length)
        np.add(self._sum, words, out=self._sum)
        if self._keep:
            self.masked_views[msg.sender] = words.copy()
        self._count_up(MessageKind.MASKED_INPUT, data)
        self._masked_from.add(idx)

    def _needed(self) -> dict[int, str]:
        """Secrets to rebuild: 'seed' of each alive client, 'key' of each dropped client a survivor masked with."""
        need = {}
        for v in self._u2:
            if v in self._u3:
                need[v] = "seed"
            elif any(u in self._u3 for u in self._nbrs[v]):
                need[v] = "key"
        return need

    def unmask_requests(self) -> dict[str, bytes]:
        """Close MASKED_INPUT; the unmask request for each client that sent a masked input.

        Raises:
            DropoutError: fewer than t masked inputs, or a needed secret with fewer than t
                holders left; raised before any share is requested.
        """
        self._expect(Stage.MASKED_INPUT, "an unmask-request call")
        self._u3 = frozenset(self._masked_from)
        self._close(self._u3, Stage.MASKED_INPUT)
        short = {
            self._ids[v]: (v in self._u3) + sum(u in self._u3 for u in self._nbrs[v])
            for v in self._needed()
        }
        short = {cid: c for cid, c in short.items() if c < self._t}
        if short:
            self._stage = None
            raise DropoutError(
                f"secrets of {sorted(short)!r} have only {sorted(set(short.values()))} live holders, fewer than "
                f"threshold={self._t}; round {self.round_index} aborted before any share was requested"
            )
        alive = tuple(self._ids[i] for i in sorted(self._u3))
        dropped = tuple(self._ids[i] for i in sorted(self._u2 - self._u3))
        out = {
            cid: self._send(MessageKind.UNMASK_REQUEST, UnmaskRequest(self.round_index, cid, alive, dropped).to_bytes())
            for cid in alive
        }
        self._stage = Stage.UNMASK
        return out

    # -- stage 3 -------------------------------------------------------------------
    def receive_unmask(self, data: bytes) -> None:
        """Stage 3: take one client's shares of survivors' self-mask seeds and dropouts' keys.

        Raises:
            ProtocolError: wrong stage or round, unknown or repeated sender, malformed response.
        """
        self._expect(Stage.UNMASK, "an unmask response")
        resp = UnmaskResponse.from_bytes(data)
        idx = self._sender(resp, self._u3, self._responses, "unmask response")
        mine = set(self._nbrs[idx]) | {idx}
        for group, allowed, what in (
            (resp.self_mask_shares, self._u3, "self-mask seed"),
            (resp.mask_key_shares, self._u2 - self._u3, "mask key"),
        ):
            owners = [self._index.get(owner, -1) for owner, _ in group]
            if len(set(owners)) != len(owners):
                raise ProtocolError(f"unmask response of {resp.sender!r} repeats an owner")
            for (owner, share), o in zip(group, owners):
                if o not in mine or o not in allowed:
                    raise ProtocolError(f"unmask response of {resp.sender!r} holds a {what} share of {owner!r} it may not send")
                if len(share) != shamir.SHARE_BYTES:
                    raise ProtocolError(f"share of {owner!r} from {resp.sender!r} has {len(share)} bytes")
        self._count_up(MessageKind.UNMASK_RESPONSE, data)
        self._responses[idx] = resp

    def finish(self) -> np.ndarray:
        """Close UNMASK: rebuild the needed secrets, remove every mask, return the ring sum.

        Raises:
            DropoutError: a needed secret has fewer than t shares (nothing is rebuilt).
            ProtocolError: a rebuilt secret does not match its commitment or public key.
        """
        self._expect(Stage.UNMASK, "a finish call")
        self._stage = None
        need = self._needed()
        pool: dict[int, dict[int, bytes]] = {v: {} for v in need}
        for u, resp in self._responses.items():
            for group in (resp.self_mask_shares, resp.mask_key_shares):
                for owner, share in group:
                    o = self._index[owner]
                    if o in pool:
                        pool[o][u + 1] = share
        short = {self._ids[v]: len(p) for v, p in pool.items() if len(p) < self._t}
        if short:
            raise DropoutError(
                f"only {sorted(set(short.values()))} shares arrived for the secrets of {sorted(short)!r}, fewer "
                f"than threshold={self._t}; round {self.round_index} failed and no secret was rebuilt"
            )
        order = sorted(need)
        chosen = [{x: pool[v][x] for x in sorted(pool[v])[: self._t]} for v in order]
        try:
            secrets_ = shamir.combine_many(chosen, threshold=self._t)
        except ValueError as exc:
            raise ProtocolError(f"share reconstruction failed: {exc}") from None
        r = self.round_index
        streams: list[tuple[bytes, int]] = []
        for v, secret in zip(order, secrets_):
            owner, ad = self._ids[v], self._ads[v]
            if need[v] == "seed":
                if _commitment(secret, r, owner) != ad.commitment:
                    raise ProtocolError(f"rebuilt self-mask seed of {owner!r} does not match its commitment")
                streams.append((_self_seed(secret, r, owner), -1))
                continue
            key = prim.x25519_private_from_raw(secret)
            if prim.x25519_public_raw(key) != ad.mask_public:
                raise ProtocolError(f"rebuilt mask key of {owner!r} does not match its advertised public key")
            for u in self._nbrs[v]:
                if u not in self._u3:
                    continue
                peer = self._ids[u]
                low, high = (peer, owner) if u < v else (owner, peer)
                seed = _pairwise_seed(prim.agree(key, self._ads[u].mask_public), r, low, high)
                # u added +mask if its index is lower, -mask otherwise; undo it.
                streams.append((seed, -1 if u < v else 1))
        prim.add_keystreams(self._sum, streams)
        return self._sum

    @property
    def contributors(self) -> tuple[str, ...]:
        """Clients whose masked inputs are in the sum."""
        return tuple(self._ids[i] for i in sorted(self._u3))

    @property
    def dropped(self) -> tuple[str, ...]:
        """Participants the server did not hear from at some stage (an unmask response is the last)."""
        return tuple(cid for i, cid in enumerate(self._ids) if i not in self._responses)


# ----------------------------------------------------------------------------- sessions

_STAGE_NAMES = {
    Stage.ADVERTISE_KEYS: "advertise",
    Stage.SHARE_KEYS: "share_keys",
    Stage.MASKED_INPUT: "masked_input",
    Stage.UNMASK: "unmask",
}


def stage_name(stage: Stage) -> str:
    """Short name of a stage in ``cpu_seconds`` keys: advertise, share_keys, masked_input, ..."""
    return _STAGE_NAMES[stage]


class SecAggClientSession:
    """One client's half of one masked round over ring words: it answers the server's bytes.

    Wraps a :class:`SecAggClient` and dispatches each message on its kind byte; the ring words
    (the encoded input) are set before the masked-input stage. A client that leaves the round
    (too few holders advertised) answers nothing from then on.
    """

    def __init__(self, client: SecAggClient) -> None:
        self._client = client
        self._words: np.ndarray | None = None

    @property
    def client_id(self) -> str:
        """The client's id."""
        return self._client.client_id

    def set_words(self, words: np.ndarray) -> None:
        """The ring words this client masks and sends."""
        self._words = words

    def handle(self, message: bytes) -> bytes | None:
        """Answer one server message (None once the client has left the round).

        Raises:
            ProtocolError: malformed or out-of-protocol message, or no input set in time.
        """
        kind = message_kind(message)
        c = self._client
        if kind == MessageKind.ROUND_SETUP:
            return c.advertise(message)
        if kind == MessageKind.KEY_LIST:
            try:
                return c.share_keys(message)
            except DropoutError:
                return None
        if kind == MessageKind.SHARE_DELIVERY:
            if self._words is None:
                raise ProtocolError(f"client {c.client_id!r} was asked for its masked input before it had an input")
            return bytes(c.masked_input(message, vector=self._words))
        if kind == MessageKind.UNMASK_REQUEST:
            return c.unmask(message)
        raise ProtocolError(f"client {c.client_id!r} does not accept {kind.name} messages")


class SecAggServerSession:
    """The server's half of one masked round: batches out, bytes in, the ring sum at the end.

    Wraps a :class:`SecAggServer`. :meth:`outgoing` closes the stage whose replies came in and
    returns the next batch; ``{}`` once the masks are removed. It never holds a client object.
    """

    def __init__(self, server: SecAggServer) -> None:
        self._server = server
        self._steps = [
            (Stage.ADVERTISE_KEYS, server.setup_messages),
            (Stage.SHARE_KEYS, server.key_lists),
            (Stage.MASKED_INPUT, server.share_deliveries),
            (Stage.UNMASK, server.unmask_requests),
        ]
        self._next = 0
        self._stage = Stage.ADVERTISE_KEYS
        self._total: np.ndarray | None = None
        self._receivers = {
            MessageKind.KEY_ADVERTISEMENT: server.receive_advertisement,
            MessageKind.SHARE_BUNDLE: server.receive_shares,
            MessageKind.MASKED_INPUT: server.receive_masked_input,
            MessageKind.UNMASK_RESPONSE: server.receive_unmask,
        }

    @property
    def server(self) -> SecAggServer:
        """The state machine beneath (its setup, graph and byte counters are public)."""
        return self._server

    @property
    def stage(self) -> Stage:
        """The stage of the batch the last :meth:`outgoing` returned."""
        return self._stage

    def outgoing(self) -> dict[str, bytes]:
        """Close the current stage and return the next batch (``{}`` after unmasking).

        Raises:
            DropoutError: too few clients answered; nothing was revealed.
        """
        if self._next < len(self._steps):
            stage, step = self._steps[self._next]
            batch = step()
            self._next += 1
            self._stage = stage
            return batch
        if self._total is None:
            self._total = self._server.finish()
        return {}

    def receive(self, sender: str, message: bytes) -> None:
        """One client's reply; its sender field must be ``sender``.

        Raises:
            ProtocolError: not bytes, malformed, of another stage, or claiming another sender.
        """
        if not isinstance(message, (bytes, bytearray, memoryview)):
            raise ProtocolError(f"reply of {sender!r} must be bytes, got {type(message).__name__}")
        kind = message_kind(message)
        receive = self._receivers.get(kind)
        if receive is None:
            raise ProtocolError(f"clients do not send {kind.name} messages (from {sender!r})")
        claimed = message_sender(message)
        if claimed != sender:
            raise ProtocolError(f"a {kind.name} message signed {claimed!r} arrived from {sender!r}")
        receive(message)

    def finish(self) -> "IntegerSumResult":
        """The ring sum of the contributors, after :meth:`outgoing` returned ``{}``.

        Raises:
            ProtocolError: the round is not over.
        """
        if self._total is None:
            raise ProtocolError("the masked round is not over: call outgoing() until it returns {}")
        s = self._server
        return IntegerSumResult(
            total=self._total,
            contributors=s.contributors,
            dropped=s.dropped,
            bytes_up=dict(s.bytes_up),
            bytes_down=dict(s.bytes_down),
            threshold=s.threshold,
            degree=s.degree,
            masked_views=dict(s.masked_views),
        )


# ----------------------------------------------------------------------------- driver


@dataclass(frozen=True)
class IntegerSumResult:
    """Outcome of :func:`secure_sum_integers`.

    Attributes:
        total: the sum of the contributors' ring words, modulo 2^bits.
        contributors: ids whose masked input is in ``total``.
        dropped: ids that went silent at any stage (or left for lack of holders).
        bytes_up, bytes_down: serialized bytes per message kind, summed over clients.
        threshold, degree: the round's parameters.
        masked_views: the server's view of each masked input (only with ``keep_masked``).
        cpu_seconds: process CPU time per party and stage (``client_*`` summed over clients).
    """

    total: np.ndarray
    contributors: tuple[str, ...]
    dropped: tuple[str, ...]
    bytes_up: Mapping[str, int]
    bytes_down: Mapping[str, int]
    threshold: int
    degree: int
    masked_views: Mapping[str, np.ndarray] = field(default_factory=dict)
    cpu_seconds: Mapping[str, float] = field(default_factory=dict)


def _validate_vectors(vectors: Mapping[str, np.ndarray], bits: int) -> tuple[list[str], int]:
    if not vectors:
        raise ValueError("vectors must hold at least one client's vector, got none")
    ids = sorted(vectors)
    length = None
    for cid in ids:
        if not isinstance(cid, str):
            raise TypeError(f"client ids must be str, got {cid!r}")
        v = vectors[cid]
        if not isinstance(v, np.ndarray) or v.dtype.kind != "u" or v.dtype.itemsize * 8 != bits:
            raise TypeError(f"vector of client {cid!r} must be a numpy array of {bits}-bit unsigned words")
        if v.ndim != 1 or v.size == 0:
            raise ValueError(f"vector of client {cid!r} must be a non-empty 1-D array, got shape {v.shape}")
        if length is None:
            length = v.size
        elif v.size != length:
            raise ValueError(f"vector of client {cid!r} has length {v.size}, expected {length} like the others")
    return ids, int(length)


def check_dropouts(dropouts: Mapping[str, Stage] | None, ids: Sequence[str]) -> dict[str, Stage]:
    """Validate a dropout map (id -> first silent stage).

    Raises:
        ValueError: an id that is not a participant, or a stage that is not a :class:`Stage`.
    """
    out: dict[str, Stage] = {}
    known = set(ids)
    for cid, stage in dict(dropouts or {}).items():
        if cid not in known:
            raise ValueError(f"dropouts names {cid!r}, which is not among the round's clients")
        if isinstance(stage, bool) or not isinstance(stage, (Stage, int)) or int(stage) not in (0, 1, 2, 3):
            raise ValueError(f"dropout stage of {cid!r} must be a Stage, got {stage!r}")
        out[cid] = Stage(int(stage))
    return out


def secure_sum_integers(
    vectors: Mapping[str, np.ndarray],
    *,
    round_index: int,
    threshold: int,
    degree: int | None = None,
    bits: int = 32,
    dropouts: Mapping[str, Stage] | None = None,
    identity_keys: Mapping[str, object] | None = None,
    keep_masked: bool = False,
    graph_seed: bytes | None = None,
    clock: Callable[[], float] = time.process_time,
) -> IntegerSumResult:
    """Run one full masked round in process over already-encoded ring words.

    Every client and the server run their sessions through :func:`secagg.drive_round`,
    exchanging real serialized messages; ``dropouts[cid] = stage`` makes ``cid`` silent from
    ``stage`` on.

    Args:
        vectors: each client's ring words (uint32 for 32 bits, uint64 for 64).
        round_index: the round number bound into every key, label and message.
        threshold: shares needed per secret.
        degree: neighbours per client (None or ``>= n - 1``: complete graph).
        bits: ring width.
        dropouts: first silent stage per client.
        identity_keys: Ed25519 private keys per client: makes the round signed.
        keep_masked: return the server's view of each masked vector.
        graph_seed: the server's 32-byte graph seed (None: drawn from the OS; fix it only
            to reproduce a graph in tests and notebooks).
        clock: timer for ``cpu_seconds``.

    Raises:
        DropoutError: too few survivors for the threshold.
        ProtocolError: a message broke the protocol.
        ValueError, TypeError: bad vectors, ids, dropouts or parameters.
    """
    from .session import drive_round

    check_bits(bits)
    ids, length = _validate_vectors(vectors, bits)
    silent = check_dropouts(dropouts, ids)
    n = len(ids)
    degree = n - 1 if degree is None else degree
    signed = identity_keys is not None
    pki = None
    if signed:
        missing = [cid for cid in ids if cid not in identity_keys]
        if missing:
            raise KeyMaterialError(f"signed round needs an identity key for every client; missing {missing!r}")
        pki = {cid: prim.identity_public_raw(prim.check_identity_private(identity_keys[cid], cid)) for cid in ids}
    cpu: Counter[str] = Counter()
    t0 = clock()
    server = _TimedServer(
        SecAggServerSession(
            SecAggServer(
                round_index=round_index, participants=ids, threshold=threshold, degree=degree, bits=bits,
                length=length, signed_keys=signed, keep_masked=keep_masked, graph_seed=graph_seed,
            )
        ),
        cpu,
        clock,
    )
    cpu["server_setup"] += clock() - t0
    parties = {}
    for cid in ids:
        session = SecAggClientSession(
            SecAggClient(cid, round_index=round_index, identity_key=identity_keys[cid] if signed else None, identity_keys=pki)
        )
        session.set_words(vectors[cid])
        parties[cid] = _timed_party(session.handle, server, cpu, clock)
    result = drive_round(server, parties, dropouts=silent)
    return replace(result, cpu_seconds=dict(cpu))


class _TimedServer:
    """A server session that charges its CPU time to ``server_<stage>`` (benchmarks read it)."""

    def __init__(self, inner: SecAggServerSession, cpu: Counter[str], clock: Callable[[], float]) -> None:
        self._inner, self._cpu, self._clock = inner, cpu, clock

    @property
    def stage(self) -> Stage:
        return self._inner.stage

    def outgoing(self) -> dict[str, bytes]:
        t0 = self._clock()
        try:
            return self._inner.outgoing()
        finally:
            self._cpu[f"server_{stage_name(self._inner.stage)}"] += self._clock() - t0

    def receive(self, sender: str, message: bytes) -> None:
        t0 = self._clock()
        try:
            self._inner.receive(sender, message)
        finally:
            self._cpu[f"server_{stage_name(self._inner.stage)}"] += self._clock() - t0

    def finish(self) -> IntegerSumResult:
        return self._inner.finish()


def _timed_party(respond, server: _TimedServer, cpu: Counter[str], clock: Callable[[], float]):
    def timed(message: bytes) -> bytes | None:
        t0 = clock()
        try:
            return respond(message)
        finally:
            cpu[f"client_{stage_name(server.stage)}"] += clock() - t0

    return timed
