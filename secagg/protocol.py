"""Client and server state machines of masked secure aggregation (SecAgg / SecAgg+).

The stages of Bonawitz et al. (CCS 2017, Fig. 4, with the consistency check of its
malicious-server version) on a neighbour graph (Bell et al., CCS 2020): the complete graph is
SecAgg, a random Harary graph of degree O(log n) SecAgg+. Each side consumes and produces
bytes in the formats of :mod:`secagg.messages`.

0. ADVERTISE_KEYS. The server broadcasts :class:`RoundSetup`. Each client checks it against
   the :class:`RoundPolicy` it computed itself from the public configuration (participants,
   a threshold floor, the degree, ring width, signing) and refuses anything below, then makes
   two fresh X25519 key pairs (share transport, masks) and a 256-bit self-mask seed ``b``,
   and advertises both public keys, a commitment to ``b`` and the digest of the set-up it saw
   (Ed25519-signed in signed rounds, so clients shown different set-ups refuse each other).
1. SHARE_KEYS. The server sends each client the roster of every advertisement's digest and
   its neighbours' advertisements. The graph seed is a hash of the roster, fixed only once
   every key is in; the client recomputes its neighbours and checks each advertisement
   against the roster (and its signature). It Shamir-shares ``b`` and its mask private key
   to its holders (neighbours and itself) with threshold t, seals each neighbour's pair with
   AES-256-GCM under a key from X25519 + HKDF (associated data: version, round, stage, sender,
   receiver), and sends a digest of every share beside them.
2. MASKED_INPUT. The server forwards the sealed shares. A client that got shares from fewer
   than t holders (itself included) leaves; otherwise it adds to its encoded input the
   keystream of its self-mask seed and, per neighbour that shared, the keystream of their
   pairwise secret (sign + if its index is lower, - otherwise), in Z_2^b.
3. CONSISTENCY_CHECK (signed rounds). The server sends every client whose masked input
   arrived the survivor set; each checks it (itself in it, every listed neighbour one that
   shared with it, t of its holders in it) and signs it, once.
4. UNMASK. The server tells each survivor which of its holders are alive and, in signed
   rounds, forwards the survivor signatures of its holders and of the holders of each of its
   dropped neighbours. The client answers once, only under the set it signed, after at least
   t valid signatures over that set from its own holders, and reveals a dropped neighbour's
   key only after t from that neighbour's holders. It returns its shares of alive holders'
   seeds and dropped neighbours' mask keys. The server checks each share against its digest
   (a bad share is set aside and its sender named in :attr:`SecAggServer.rejected_shares`),
   rebuilds each secret from t good shares, checks it against the commitment or public key,
   and removes the masks.

In signed rounds every client message carries an Ed25519 signature over its bytes (bound to
round and stage by its header), checked by the server against the public-key directory.

What each party observes: the server sees public keys, sealed shares and their digests,
masked vectors (uniform in Z_2^b), signatures, and at the end, for each client, one of its
two secrets; a client sees its neighbours' public keys and its own shares of their secrets.
Dropouts are tolerated at every stage while every needed secret keeps t answering holders
(and at least t clients remain after each stage); otherwise :class:`DropoutError` is raised
before any secret is rebuilt.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

import numpy as np

from . import _primitives as prim
from . import shamir
from .base import Stage
from .encoding import check_bits, unpack
from .errors import DropoutError, KeyMaterialError, ProtocolError
from .graph import LocalGraph, derive_graph_seed, neighbours
from .messages import (
    KeyAdvertisement,
    KeyList,
    MaskedInput,
    MessageKind,
    RoundSetup,
    SealedShare,
    ShareBundle,
    ShareDelivery,
    ShareDigest,
    SurvivorSet,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskResponse,
    message_kind,
    message_sender,
    message_signature_digest,
    sign_message,
    survivor_digest,
    verify_message,
)

__all__ = [
    "RoundPolicy",
    "SecAggClient",
    "SecAggServer",
    "SecAggClientSession",
    "SecAggServerSession",
    "IntegerSumResult",
    "secure_sum_integers",
]

_DTYPES: dict[int, np.dtype] = {32: np.dtype("<u4"), 64: np.dtype("<u8")}
_SEED, _KEY = "seed", "key"


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


def _share_digest(round_index: int, owner: str, holder: str, which: str, share: bytes) -> bytes:
    return prim.digest(prim.LABEL_SHARE_DIGEST, round_index, owner, holder, which, share)


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


@dataclass(frozen=True)
class RoundPolicy:
    """What a client accepts in a round set-up, computed by the client from public parameters.

    Attributes:
        participants: the round's participants as the client was told them (sorted).
        threshold: the floor: a set-up with a lower threshold is refused.
        degree: the graph degree the client planned (``n - 1``: complete graph).
        bits: ring width.
        signed: whether the round must be signed.
        source: what the floor was planned from (named in refusals).
    """

    participants: tuple[str, ...]
    threshold: int
    degree: int
    bits: int
    signed: bool
    source: str = "the round's public parameters"


# ----------------------------------------------------------------------------- client


class SecAggClient:
    """One client's side of one round. Call the stage methods in order.

    Args:
        client_id: this client's id (as listed in the round's participants).
        round_index: the round it expects; a message of any other round is refused.
        policy: the parameters it planned itself; a set-up below them is refused. (None
            accepts any consistent set-up: only for tests of the state machine itself.)
        identity_key: its Ed25519 key, to sign its messages (signed rounds).
        identity_keys: raw Ed25519 public keys of the participants; when given, the client
            requires a signed round and verifies its neighbours' advertisements and survivor
            signatures.

    Every malformed, replayed, swapped or tampered message, and every server request that
    breaks the protocol, raises :class:`ProtocolError`; the client then stays in its state.
    """

    _setup: RoundSetup  # the set-up accepted by advertise(); every later stage runs only after it

    def __init__(
        self,
        client_id: str,
        *,
        round_index: int,
        policy: RoundPolicy | None = None,
        identity_key=None,
        identity_keys: Mapping[str, bytes] | None = None,
    ) -> None:
        if not isinstance(client_id, str):
            raise TypeError(f"client_id must be str, got {type(client_id).__name__}")
        self.client_id = client_id
        self.round_index = _check_round_index(round_index)
        self._policy = policy
        self._identity_key = None if identity_key is None else prim.check_identity_private(identity_key, client_id)
        self._pki = (
            {cid: prim.check_identity_public(pk, cid) for cid, pk in identity_keys.items()} if identity_keys is not None else None
        )
        self._stage: Stage | None = Stage.ADVERTISE_KEYS

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

    def _sign(self, unsigned: bytes) -> bytes:
        return sign_message(unsigned, self._identity_key) if self._setup.signed else unsigned

    def _check_policy(self, s: RoundSetup) -> None:
        p = self._policy
        if p is None:
            return
        n = len(s.participants)
        if s.participants != p.participants:
            missing = sorted(set(p.participants) - set(s.participants))
            extra = sorted(set(s.participants) - set(p.participants))
            raise ProtocolError(
                f"client {self.client_id!r} refuses the set-up: participants differ from the {len(p.participants)} "
                f"it was told (missing {missing!r}, extra {extra!r})"
            )
        if s.degree != p.degree:
            relation = "below" if s.degree < p.degree else "differs from"
            raise ProtocolError(
                f"client {self.client_id!r} refuses the set-up: degree={s.degree} {relation} the floor {p.degree} it "
                f"plans itself for n={n} from {p.source}"
            )
        if s.threshold < p.threshold:
            raise ProtocolError(
                f"client {self.client_id!r} refuses the set-up: threshold={s.threshold} is below the floor "
                f"{p.threshold} it plans itself for n={n} from {p.source}"
            )
        if s.bits != p.bits or s.signed != p.signed:
            raise ProtocolError(
                f"client {self.client_id!r} refuses the set-up: bits={s.bits}, signed={s.signed}; its configuration "
                f"says bits={p.bits}, signed={p.signed}"
            )

    # -- stage 0 -------------------------------------------------------------------
    def advertise(self, setup: bytes) -> bytes:
        """Check the round set-up; return this client's :class:`KeyAdvertisement` bytes.

        Raises:
            ProtocolError: a malformed set-up, or one below this client's policy (naming the
                parameter and the floor).
        """
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
        self._check_policy(s)
        self._setup = s
        self._setup_digest = s.digest()
        self._index = {cid: i for i, cid in enumerate(parts)}
        self._me = self._index[self.client_id]
        self._enc_sk, enc_pk = prim.new_x25519()
        self._mask_sk, mask_pk = prim.new_x25519()
        self._seed = prim.random_secret()
        ad = KeyAdvertisement(
            s.round_index,
            self.client_id,
            enc_pk,
            mask_pk,
            _commitment(self._seed, s.round_index, self.client_id),
            self._setup_digest,
        )
        if s.signed:
            assert self._identity_key is not None  # a signed set-up without one was refused above
            ad = replace(ad, signature=prim.sign(self._identity_key, ad.signed_bytes()))
        self._own_ad = ad
        self._stage = Stage.SHARE_KEYS
        return ad.to_bytes()

    # -- stage 1 -------------------------------------------------------------------
    def _check_roster(self, roster: tuple[tuple[str, bytes], ...]) -> None:
        ids = [cid for cid, _ in roster]
        if any(cid not in self._index for cid in ids):
            raise ProtocolError(f"key list roster names non-participants {sorted(set(ids) - self._index.keys())!r}")
        if ids != sorted(set(ids), key=self._index.__getitem__):
            raise ProtocolError("key list roster must list each advertiser once, in participant order")
        if dict(roster).get(self.client_id) != self._own_ad.digest():
            raise ProtocolError(f"key list roster does not hold the advertisement client {self.client_id!r} sent")
        if len(roster) < self._setup.threshold:
            raise ProtocolError(
                f"key list roster holds {len(roster)} advertisements, fewer than threshold={self._setup.threshold}"
            )

    def share_keys(self, key_list: bytes) -> bytes:
        """Check the roster and the neighbours' keys; return the sealed shares (:class:`ShareBundle` bytes).

        Raises:
            ProtocolError: a bad roster, a non-neighbour, a missing, repeated or altered
                advertisement, a repeated key, or a bad signature.
            DropoutError: fewer than t holders (itself included) advertised: its secrets
                could never be rebuilt, so it leaves the round here.
        """
        self._expect(Stage.SHARE_KEYS, "key list")
        kl = KeyList.from_bytes(key_list)
        self._check_header(kl, "recipient")
        s = self._setup
        self._check_roster(kl.roster)
        roster = dict(kl.roster)
        seed = derive_graph_seed(round_index=s.round_index, setup_digest=self._setup_digest, roster=kl.roster)
        self._graph = LocalGraph(len(s.participants), degree=s.degree, seed=seed, node=self._me)
        self._nbrs = frozenset(s.participants[j] for j in self._graph.neighbours)
        peers: dict[str, KeyAdvertisement] = {}
        seen_keys = {self._own_ad.enc_public, self._own_ad.mask_public}
        for ad in kl.advertisements:
            if ad.sender not in self._nbrs:
                raise ProtocolError(f"key list names {ad.sender!r}, not a neighbour of {self.client_id!r}")
            if ad.sender in peers:
                raise ProtocolError(f"key list names {ad.sender!r} twice")
            if roster.get(ad.sender) != ad.digest():
                raise ProtocolError(f"advertisement of {ad.sender!r} does not match its roster entry")
            if ad.setup_digest != self._setup_digest:
                raise ProtocolError(f"advertisement of {ad.sender!r} answers another round set-up than {self.client_id!r} saw")
            if ad.enc_public in seen_keys or ad.mask_public in seen_keys or ad.enc_public == ad.mask_public:
                raise ProtocolError(f"key list repeats a public key (at {ad.sender!r})")
            seen_keys.update((ad.enc_public, ad.mask_public))
            if s.signed:
                assert self._pki is not None  # advertise() refuses a signed round without the directory
                if ad.sender not in self._pki:
                    raise ProtocolError(f"no identity key known for {ad.sender!r}")
                prim.verify(self._pki[ad.sender], ad.signature, ad.signed_bytes())
            peers[ad.sender] = ad
        withheld = sorted((self._nbrs & roster.keys()) - peers.keys())
        if withheld:
            raise ProtocolError(f"key list withholds the advertisements of neighbours {withheld!r} listed in its roster")
        if len(peers) + 1 < s.threshold:
            self._stage = None
            raise DropoutError(
                f"client {self.client_id!r}: only {len(peers) + 1} holders advertised keys, fewer than "
                f"threshold={s.threshold}; it leaves the round before sharing"
            )
        self._peers = peers
        # one X25519 agreement per neighbour for transport, reused to open what it sends back
        self._transport = {peer: prim.agree(self._enc_sk, ad.enc_public) for peer, ad in peers.items()}
        holders = sorted([self.client_id, *peers], key=self._index.__getitem__)
        xs = [self._index[h] + 1 for h in holders]
        table = shamir.split_many([self._seed, self._mask_sk.private_bytes_raw()], threshold=s.threshold, xs=xs)
        sealed, digests = [], []
        r = s.round_index
        for holder, x, (seed_share, key_share) in zip(holders, xs, table):
            digests.append(
                ShareDigest(
                    holder,
                    _share_digest(r, self.client_id, holder, _SEED, seed_share),
                    _share_digest(r, self.client_id, holder, _KEY, key_share),
                )
            )
            if holder == self.client_id:
                self._own_shares = (seed_share, key_share)
                continue
            key = _transport_key(self._transport[holder], r, self.client_id, holder)
            blob = prim.seal(
                key, _plaintext_share(self.client_id, holder, x, seed_share, key_share), _share_aad(r, self.client_id, holder)
            )
            sealed.append(SealedShare(holder, blob))
        self._stage = Stage.MASKED_INPUT
        return self._sign(ShareBundle(r, self.client_id, tuple(sealed), tuple(digests)).to_bytes())

    # -- stage 2 -------------------------------------------------------------------
    def masked_input(self, delivery: bytes, *, vector: np.ndarray) -> bytearray:
        """Open the shares addressed to it; return its masked vector (:class:`MaskedInput` bytes).

        The vector is masked in place inside the outgoing buffer, returned as a ``bytearray``.
        ``vector`` holds the encoded input as ring words (``uint32`` for 32 bits, ``uint64``
        for 64) of the round's length.

        Raises:
            ProtocolError: a share from a non-neighbour, twice, or failing authentication.
            DropoutError: fewer than t holders (itself included) shared with it; masking with
                so few would let the server isolate its input, so it leaves the round.
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
            key = _transport_key(self._transport[sender], s.round_index, sender, self.client_id)
            plain = prim.open_sealed(key, entry.blob, _share_aad(s.round_index, sender, self.client_id))
            held[sender] = _parse_plaintext_share(plain, sender, self.client_id, self._me + 1)
        if len(held) + 1 < s.threshold:
            self._stage = None
            raise DropoutError(
                f"client {self.client_id!r}: only {len(held) + 1} holders shared with it, fewer than "
                f"threshold={s.threshold}; it leaves the round without sending its input"
            )
        self._held = held
        message, masked = MaskedInput.allocate(s.round_index, self.client_id, s.bits, s.length, signed=s.signed)
        masked[:] = vector
        streams = [(_self_seed(self._seed, s.round_index, self.client_id), 1)]
        for peer in sorted(held, key=self._index.__getitem__):
            mine_first = self._me < self._index[peer]
            low, high = (self.client_id, peer) if mine_first else (peer, self.client_id)
            shared = prim.agree(self._mask_sk, self._peers[peer].mask_public)
            streams.append((_pairwise_seed(shared, s.round_index, low, high), 1 if mine_first else -1))
        prim.add_keystreams(masked, streams)
        del masked
        if s.signed:
            MaskedInput.sign_in_place(message, self._identity_key)
        self._stage = Stage.CONSISTENCY_CHECK if s.signed else Stage.UNMASK
        return message

    def _check_alive(self, alive: tuple[str, ...], what: str) -> None:
        unknown = set(alive) - self._index.keys()
        if unknown:
            raise ProtocolError(f"{what} names non-participants {sorted(unknown)!r}")
        if list(alive) != sorted(set(alive), key=self._index.__getitem__):
            raise ProtocolError(f"{what} must list each client once, in participant order")
        if self.client_id not in alive:
            raise ProtocolError(f"{what} does not list client {self.client_id!r} as alive")
        stray = (set(alive) & self._nbrs) - self._held.keys()
        if stray:
            raise ProtocolError(f"{what} lists neighbours {sorted(stray)!r} that never shared with {self.client_id!r}")
        mine = 1 + len(set(alive) & self._nbrs)
        if mine < self._setup.threshold:
            raise ProtocolError(
                f"{what} lists {mine} holders of client {self.client_id!r} alive, fewer than threshold={self._setup.threshold}"
            )

    # -- stage 3 -------------------------------------------------------------------
    def consistency_check(self, survivor_set: bytes) -> bytes:
        """Check and sign the survivor set, once (:class:`SurvivorSignature` bytes; signed rounds).

        Raises:
            ProtocolError: itself not listed, a listed neighbour that never shared with it,
                fewer than t of its holders listed, a malformed set, or a second request.
        """
        self._expect(Stage.CONSISTENCY_CHECK, "survivor set")
        msg = SurvivorSet.from_bytes(survivor_set)
        self._check_header(msg, "recipient")
        self._check_alive(msg.alive, "survivor set")
        s = self._setup
        self._alive = frozenset(msg.alive)
        self._survivor_digest = survivor_digest(s.round_index, self._setup_digest, msg.alive)
        self._stage = Stage.UNMASK
        return sign_message(
            SurvivorSignature(s.round_index, self.client_id, self._survivor_digest).to_bytes(), self._identity_key
        )

    def _confirmations(self, signatures: tuple[tuple[str, bytes], ...]) -> "_Confirmations":
        """The survivor signatures offered, checked for form now and verified as they are counted."""
        offered: dict[int, bytes] = {}
        for signer, sig in signatures:
            if signer == self.client_id or self._index.get(signer) in offered:
                raise ProtocolError(f"unmask request carries a survivor signature of {signer!r} twice or of the client itself")
            if signer not in self._alive:
                raise ProtocolError(f"unmask request carries a survivor signature of {signer!r}, not in the set it signed")
            offered[self._index[signer]] = sig
        return _Confirmations(self, offered)

    # -- stage 4 -------------------------------------------------------------------
    def unmask(self, request: bytes) -> bytes:
        """Answer the one unmask request of the round (:class:`UnmaskResponse` bytes).

        Raises:
            ProtocolError: a malformed request or one this client refuses: itself not alive,
                a listed neighbour that never shared with it, fewer than t of its holders
                alive; in signed rounds, an alive set other than the one it signed, an invalid
                signature, fewer than t of its holders (or of a dropped neighbour's holders)
                confirming the set; or a second request.
        """
        self._expect(Stage.UNMASK, "unmask request")
        req = UnmaskRequest.from_bytes(request)
        self._check_header(req, "recipient")
        s = self._setup
        t = s.threshold
        mine = self._nbrs | {self.client_id}
        if s.signed:
            expected = tuple(c for c in s.participants if c in self._alive and c in mine)
            if req.alive != expected:
                raise ProtocolError(
                    f"unmask request lists {list(req.alive)!r} alive among the holders of client {self.client_id!r}; "
                    f"the survivor set it signed says {list(expected)!r}"
                )
            confirmations = self._confirmations(req.signatures)
            confirmed = confirmations.count(self._graph.of(self._me) | {self._me}, t)
            if confirmed < t:
                raise ProtocolError(
                    f"only {confirmed} holders of client {self.client_id!r} confirmed the survivor set it signed, "
                    f"fewer than threshold={t}; it reveals nothing"
                )
        else:
            if req.signatures:
                raise ProtocolError("unmask request of an unsigned round carries signatures")
            self._check_alive(req.alive, "unmask request")
            if any(c not in mine for c in req.alive):
                raise ProtocolError(f"unmask request lists {sorted(set(req.alive) - mine)!r}, not holders of {self.client_id!r}")
        alive = set(req.alive)
        dropped = sorted(set(self._held) - alive, key=self._index.__getitem__)
        if s.signed:
            for peer in dropped:
                backing = confirmations.count(self._graph.of(self._index[peer]), t)
                if backing < t:
                    raise ProtocolError(
                        f"only {backing} holders of dropped neighbour {peer!r} confirmed the survivor set, fewer than "
                        f"threshold={t}; client {self.client_id!r} does not reveal its key"
                    )
        seeds = [(self.client_id, self._own_shares[0])]
        keys = []
        for peer in sorted(self._held, key=self._index.__getitem__):
            if peer in alive:
                seeds.append((peer, self._held[peer][0]))
            else:
                keys.append((peer, self._held[peer][1]))
        self._stage = None
        return self._sign(UnmaskResponse(s.round_index, self.client_id, tuple(seeds), tuple(keys)).to_bytes())


class _Confirmations:
    """Survivor signatures a client counts: each verified once, only until enough are found.

    Its own signature (over the set it signed) counts without verification. Any signature it
    checks that does not verify makes it refuse the whole request.
    """

    def __init__(self, client: SecAggClient, offered: dict[int, bytes]) -> None:
        assert client._pki is not None  # counted only in signed rounds, which advertise() refuses without it
        self._client = client
        self._pki = client._pki
        self._offered = offered
        self._valid: set[int] = {client._me}

    def count(self, group: frozenset[int], need: int) -> int:
        """How many of ``group`` confirmed the client's set, verifying until ``need`` are found.

        Raises:
            ProtocolError: a checked signature does not verify.
        """
        c = self._client
        found = len(self._valid & group)
        for i in sorted(group - self._valid):
            if found >= need:
                break
            sig = self._offered.get(i)
            if sig is None:
                continue
            signer = c._setup.participants[i]
            body = SurvivorSignature(c._setup.round_index, signer, c._survivor_digest).body()
            prim.verify(self._pki[signer], sig, message_signature_digest(body), what=f"survivor set of {signer!r}")
            self._valid.add(i)
            found += 1
        return found


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
        identities: the participants' raw Ed25519 public keys (the public-key directory):
            makes the round signed; every client message's signature is checked against it.
        keep_masked: keep a copy of every masked vector (the server's view, for notebooks).

    Sequence: :meth:`setup_messages`, :meth:`receive_advertisement` per client,
    :meth:`key_lists`, :meth:`receive_shares`, :meth:`share_deliveries`,
    :meth:`receive_masked_input`, then (signed) :meth:`survivor_sets` and
    :meth:`receive_survivor_signature`, then :meth:`unmask_requests`, :meth:`receive_unmask`,
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
        identities: Mapping[str, bytes] | None = None,
        keep_masked: bool = False,
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
        self._pki = None
        if identities is not None:
            missing = [cid for cid in parts if cid not in identities]
            if missing:
                raise KeyMaterialError(f"a signed round needs the identity key of every participant; missing {missing!r}")
            self._pki = {cid: prim.check_identity_public(identities[cid], cid) for cid in parts}
        self._setup = RoundSetup(self.round_index, tuple(parts), threshold, degree, bits, length, self._pki is not None)
        self._setup_digest = self._setup.digest()
        self._nbrs: tuple[tuple[int, ...], ...] = ()
        self._ids = tuple(parts)
        self._index = {cid: i for i, cid in enumerate(parts)}
        self._t = threshold
        self._stage: Stage | None = Stage.ADVERTISE_KEYS
        self._ads: dict[int, KeyAdvertisement] = {}
        self._bundles: dict[int, ShareBundle] = {}
        self._digests: dict[tuple[int, int], ShareDigest] = {}
        self._u1: frozenset[int] = frozenset()
        self._u2: frozenset[int] = frozenset()
        self._u3: frozenset[int] = frozenset()
        self._masked_from: set[int] = set()
        self._signatures: dict[int, bytes] = {}
        self._requested: frozenset[int] = frozenset()
        self._responses: dict[int, UnmaskResponse] = {}
        self._sum = np.zeros(length, dtype=_DTYPES[bits])
        self._keep = keep_masked
        self.masked_views: dict[str, np.ndarray] = {}
        self.rejected_shares: dict[str, tuple[str, ...]] = {}
        self.bytes_up: Counter[str] = Counter()
        self.bytes_down: Counter[str] = Counter()

    # -- helpers -------------------------------------------------------------------
    @property
    def setup(self) -> RoundSetup:
        """The round's setup: participants, threshold, degree, ring size, length, signing."""
        return self._setup

    @property
    def signed(self) -> bool:
        """Whether the round is signed (runs the consistency check)."""
        return self._pki is not None

    @property
    def threshold(self) -> int:
        """Survivors needed at every stage for the round to complete."""
        return self._t

    @property
    def degree(self) -> int:
        """Neighbours per client in the masking graph (n - 1 for the complete graph)."""
        return self._setup.degree

    def neighbours_of(self, client_id: str) -> tuple[str, ...]:
        """The clients ``client_id`` shares masks and key shares with (known once keys are in).

        Raises:
            ProtocolError: called before the graph seed exists (advertisements still open).
        """
        if not self._nbrs:
            raise ProtocolError("the graph is derived from the advertisements: it exists once key_lists() ran")
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

    def _verify(self, data: bytes, msg, what: str) -> None:
        if self._pki is None:
            if msg.signature:
                raise ProtocolError(f"{what} of {msg.sender!r} is signed in an unsigned round")
            return
        verify_message(data, msg.signature, self._pki[msg.sender], f"{what} of {msg.sender!r}")

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
            ProtocolError: wrong stage or round, unknown or repeated sender, another set-up,
                a missing or bad signature.
        """
        self._expect(Stage.ADVERTISE_KEYS, "a key advertisement")
        ad = KeyAdvertisement.from_bytes(data)
        idx = self._sender(ad, None, self._ads, "key advertisement")
        if ad.setup_digest != self._setup_digest:
            raise ProtocolError(f"key advertisement of {ad.sender!r} answers another round set-up")
        if self._pki is not None:
            if not ad.signature:
                raise ProtocolError(f"unsigned key advertisement from {ad.sender!r} in a signed round")
            prim.verify(self._pki[ad.sender], ad.signature, ad.signed_bytes(), what=f"key advertisement of {ad.sender!r}")
        elif ad.signature:
            raise ProtocolError(f"key advertisement of {ad.sender!r} is signed in an unsigned round")
        self._count_up(MessageKind.KEY_ADVERTISEMENT, data)
        self._ads[idx] = ad

    def key_lists(self) -> dict[str, bytes]:
        """Close ADVERTISE_KEYS; derive the graph; each advertiser's roster and neighbours' advertisements.

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
        roster = tuple((self._ids[idx], self._ads[idx].digest()) for idx in sorted(self._u1))
        seed = derive_graph_seed(round_index=self.round_index, setup_digest=self._setup_digest, roster=roster)
        self._nbrs = neighbours(len(self._ids), degree=self._setup.degree, seed=seed)
        out = {}
        for idx in sorted(self._u1):
            ads = tuple(self._ads[j] for j in self._nbrs[idx] if j in self._u1)
            out[self._ids[idx]] = self._send(
                MessageKind.KEY_LIST, KeyList(self.round_index, self._ids[idx], roster, ads).to_bytes()
            )
        self._stage = Stage.SHARE_KEYS
        return out

    # -- stage 1 -------------------------------------------------------------------
    def receive_shares(self, data: bytes) -> None:
        """Stage 1: take one client's encrypted key shares for its neighbours (the server cannot read them).

        Raises:
            ProtocolError: wrong stage or round, unknown or repeated sender, shares or digests
                for others than its holders that advertised, a bad signature.
        """
        self._expect(Stage.SHARE_KEYS, "a share bundle")
        bundle = ShareBundle.from_bytes(data)
        idx = self._sender(bundle, self._u1, self._bundles, "share bundle")
        self._verify(data, bundle, "share bundle")
        expected = {self._ids[j] for j in self._nbrs[idx] if j in self._u1}
        got = [e.peer for e in bundle.shares]
        if len(got) != len(set(got)) or set(got) != expected:
            raise ProtocolError(
                f"share bundle of {bundle.sender!r} must address each neighbour that advertised once: "
                f"expected {sorted(expected)!r}, got {sorted(got)!r}"
            )
        holders = [d.holder for d in bundle.digests]
        if len(holders) != len(set(holders)) or set(holders) != expected | {bundle.sender}:
            raise ProtocolError(f"share bundle of {bundle.sender!r} must hold one share digest per holder")
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
            bundle = self._bundles[idx]
            for d in bundle.digests:
                self._digests[idx, self._index[d.holder]] = d
            for entry in bundle.shares:
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
        """Add one masked vector to the running sum (it is not kept unless ``keep_masked``).

        Raises:
            ProtocolError: wrong stage, round or sender, wrong size, a missing or bad signature.
        """
        self._expect(Stage.MASKED_INPUT, "a masked input")
        msg = MaskedInput.from_bytes(data)
        idx = self._sender(msg, self._u2, self._masked_from, "masked input")
        s = self._setup
        if msg.bits != s.bits or msg.length != s.length:
            raise ProtocolError(
                f"masked input of {msg.sender!r} has {msg.length} x {msg.bits} bits, expected {s.length} x {s.bits}"
            )
        self._verify(data, msg, "masked input")
        words = unpack(msg.payload, bits=s.bits, length=s.length)
        np.add(self._sum, words, out=self._sum)
        if self._keep:
            self.masked_views[msg.sender] = words.copy()
        self._count_up(MessageKind.MASKED_INPUT, data)
        self._masked_from.add(idx)

    def _needed(self) -> dict[int, str]:
        """Secrets to rebuild: the seed of each alive client, the key of each dropped client a survivor masked with."""
        need = {}
        for v in self._u2:
            if v in self._u3:
                need[v] = _SEED
            elif any(u in self._u3 for u in self._nbrs[v]):
                need[v] = _KEY
        return need

    def _holders_short(self, answering: frozenset[int], signers: frozenset[int] | None) -> dict[str, int]:
        """Needed secrets that could not reach t shares (or, signed, t backing signatures)."""
        short = {}
        for v, what in self._needed().items():
            count = (v in answering) + sum(u in answering for u in self._nbrs[v])
            if signers is not None and what == _KEY:
                count = min(count, sum(u in signers for u in self._nbrs[v]))
            if count < self._t:
                short[self._ids[v]] = count
        return short

    def _with_live_holders(self, live: frozenset[int]) -> frozenset[int]:
        """The members of ``live`` with t holders (themselves included) in it: only they may answer."""
        return frozenset(w for w in live if 1 + sum(u in live for u in self._nbrs[w]) >= self._t)

    def _close_masked_input(self) -> None:
        self._expect(Stage.MASKED_INPUT, "a close of the masked inputs")
        self._u3 = frozenset(self._masked_from)
        self._close(self._u3, Stage.MASKED_INPUT)
        self._abort_if_short(self._holders_short(self._u3, None))

    def _abort_if_short(self, short: dict[str, int]) -> None:
        if short:
            self._stage = None
            raise DropoutError(
                f"secrets of {sorted(short)!r} have only {sorted(set(short.values()))} live holders, fewer than "
                f"threshold={self._t}; round {self.round_index} aborted before any share was requested"
            )

    # -- stage 3 (signed) ------------------------------------------------------------
    def survivor_sets(self) -> dict[str, bytes]:
        """Close MASKED_INPUT; send the survivor set to sign to every client whose masked input arrived
        and that has t holders among them (the others would refuse it).

        Raises:
            DropoutError: fewer than t masked inputs, or a needed secret with fewer than t
                live holders.
            ProtocolError: an unsigned round (it has no consistency check).
        """
        if self._pki is None:
            raise ProtocolError("the consistency check runs in signed rounds only")
        self._close_masked_input()
        alive = tuple(self._ids[i] for i in sorted(self._u3))
        self._survivor_digest = survivor_digest(self.round_index, self._setup_digest, alive)
        out = {
            self._ids[w]: self._send(MessageKind.SURVIVOR_SET, SurvivorSet(self.round_index, self._ids[w], alive).to_bytes())
            for w in sorted(self._with_live_holders(self._u3))
        }
        self._stage = Stage.CONSISTENCY_CHECK
        return out

    def receive_survivor_signature(self, data: bytes) -> None:
        """Stage 3: one client's signature over the survivor set.

        Raises:
            ProtocolError: wrong stage, round or sender, a signature over another set, or one
                that does not verify.
        """
        self._expect(Stage.CONSISTENCY_CHECK, "a survivor signature")
        msg = SurvivorSignature.from_bytes(data)
        idx = self._sender(msg, self._u3, self._signatures, "survivor signature")
        if msg.set_digest != self._survivor_digest:
            raise ProtocolError(f"survivor signature of {msg.sender!r} is over another survivor set")
        self._verify(data, msg, "survivor signature")
        self._count_up(MessageKind.SURVIVOR_SIGNATURE, data)
        self._signatures[idx] = msg.signature

    # -- stage 4 -------------------------------------------------------------------
    def unmask_requests(self) -> dict[str, bytes]:
        """Close the previous stage; the unmask request for each client that can answer it.

        Unsigned rounds: every client whose masked input arrived and that has t holders among
        those, told which of its holders are alive. Signed rounds: every signer with t signers
        among its holders, also given the signatures of its holders and of its dropped
        neighbours' holders.

        Raises:
            DropoutError: fewer than t clients at the closed stage, or a needed secret with
                fewer than t holders left (or t backing signatures); raised before any share
                is requested.
        """
        if self._pki is None:
            self._close_masked_input()
            signers = None
            answering = self._with_live_holders(self._u3)
        else:
            self._expect(Stage.CONSISTENCY_CHECK, "an unmask-request call")
            signers = frozenset(self._signatures)
            self._close(signers, Stage.CONSISTENCY_CHECK)
            answering = self._with_live_holders(signers)
            self._abort_if_short(self._holders_short(answering, signers))
        out = {}
        for w in sorted(answering):
            holders = sorted({w, *self._nbrs[w]})
            alive = tuple(self._ids[i] for i in holders if i in self._u3)
            sigs: tuple[tuple[str, bytes], ...] = ()
            if signers is not None:
                dropped = [h for h in self._nbrs[w] if h in self._u2 and h not in self._u3]
                backing = set(self._nbrs[w]).union(*(self._nbrs[h] for h in dropped)) & signers
                sigs = tuple((self._ids[i], self._signatures[i]) for i in sorted(backing - {w}))
            request = UnmaskRequest(self.round_index, self._ids[w], alive, sigs)
            out[self._ids[w]] = self._send(MessageKind.UNMASK_REQUEST, request.to_bytes())
        self._requested = answering
        self._stage = Stage.UNMASK
        return out

    def receive_unmask(self, data: bytes) -> None:
        """Stage 4: take one client's shares of survivors' self-mask seeds and dropouts' keys.

        Raises:
            ProtocolError: wrong stage or round, unknown, unasked or repeated sender, a
                malformed response or a bad signature.
        """
        self._expect(Stage.UNMASK, "an unmask response")
        resp = UnmaskResponse.from_bytes(data)
        idx = self._sender(resp, self._requested, self._responses, "unmask response")
        self._verify(data, resp, "unmask response")
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

    def _good_shares(self, need: dict[int, str]) -> dict[int, dict[int, bytes]]:
        """The revealed shares that match their owner's digests; the others are set aside, their senders named."""
        pool: dict[int, dict[int, bytes]] = {v: {} for v in need}
        rejected: dict[str, list[str]] = {}
        r = self.round_index
        for u, resp in sorted(self._responses.items()):
            holder = self._ids[u]
            for group, which in ((resp.self_mask_shares, _SEED), (resp.mask_key_shares, _KEY)):
                for owner, share in group:
                    o = self._index[owner]
                    if need.get(o) != which:
                        continue
                    d = self._digests.get((o, u))
                    expected = None if d is None else (d.seed_share if which == _SEED else d.key_share)
                    if expected != _share_digest(r, owner, holder, which, share):
                        rejected.setdefault(holder, []).append(owner)
                        continue
                    pool[o][u + 1] = share
        self.rejected_shares = {h: tuple(owners) for h, owners in sorted(rejected.items())}
        return pool

    def finish(self) -> np.ndarray:
        """Close UNMASK: rebuild the needed secrets from shares that verify, remove every mask.

        A share that does not match the digest its owner sent is set aside (its sender is
        listed in :attr:`rejected_shares`); any t good shares rebuild the secret.

        Raises:
            DropoutError: a needed secret has fewer than t good shares (nothing is rebuilt).
            ProtocolError: a secret rebuilt from good shares does not match its commitment or
                public key (its owner dealt inconsistent shares).
        """
        self._expect(Stage.UNMASK, "a finish call")
        self._stage = None
        need = self._needed()
        pool = self._good_shares(need)
        short = {self._ids[v]: len(p) for v, p in pool.items() if len(p) < self._t}
        if short:
            bad = f"; shares set aside as corrupted, by sender: {self.rejected_shares!r}" if self.rejected_shares else ""
            raise DropoutError(
                f"only {sorted(set(short.values()))} good shares arrived for the secrets of {sorted(short)!r}, fewer "
                f"than threshold={self._t}; round {self.round_index} failed and no secret was rebuilt{bad}"
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
            if need[v] == _SEED:
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
    Stage.CONSISTENCY_CHECK: "consistency",
    Stage.UNMASK: "unmask",
}


def stage_name(stage: Stage) -> str:
    """Short name of a stage in ``cpu_seconds`` keys: advertise, share_keys, masked_input, ..."""
    return _STAGE_NAMES[stage]


class SecAggClientSession:
    """One client's half of one masked round over ring words: it answers the server's bytes.

    Wraps a :class:`SecAggClient` and dispatches each message on its kind byte; the ring words
    (the encoded input) are set before the masked-input stage. A client that leaves the round
    (too few of its holders advertised or shared) answers nothing from then on.
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
            try:
                return bytes(c.masked_input(message, vector=self._words))
            except DropoutError:
                return None
        if kind == MessageKind.SURVIVOR_SET:
            return c.consistency_check(message)
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
            *([(Stage.CONSISTENCY_CHECK, server.survivor_sets)] if server.signed else []),
            (Stage.UNMASK, server.unmask_requests),
        ]
        self._next = 0
        self._stage = Stage.ADVERTISE_KEYS
        self._total: np.ndarray | None = None
        self._receivers = {
            MessageKind.KEY_ADVERTISEMENT: server.receive_advertisement,
            MessageKind.SHARE_BUNDLE: server.receive_shares,
            MessageKind.MASKED_INPUT: server.receive_masked_input,
            MessageKind.SURVIVOR_SIGNATURE: server.receive_survivor_signature,
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
            rejected_shares=dict(s.rejected_shares),
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
        rejected_shares: senders of revealed shares that did not match their digests, with
            the owners of those shares (the round completed without them).
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
    rejected_shares: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


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
    assert length is not None  # vectors is not empty
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
        if isinstance(stage, bool) or not isinstance(stage, (Stage, int)) or int(stage) not in set(Stage):
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
    clock: Callable[[], float] = time.process_time,
) -> IntegerSumResult:
    """Run one full masked round in process over already-encoded ring words.

    Every client and the server run their sessions through :func:`secagg.drive_round`,
    exchanging real serialized messages; ``dropouts[cid] = stage`` makes ``cid`` silent from
    ``stage`` on. Each client's policy is the given threshold and degree.

    Args:
        vectors: each client's ring words (uint32 for 32 bits, uint64 for 64).
        round_index: the round number bound into every key, label and message.
        threshold: shares needed per secret.
        degree: neighbours per client (None or ``>= n - 1``: complete graph).
        bits: ring width.
        dropouts: first silent stage per client.
        identity_keys: Ed25519 private keys per client: makes the round signed (the server
            gets their public halves, each client its own key and the directory).
        keep_masked: return the server's view of each masked vector.
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
    degree = n - 1 if degree is None else min(degree, n - 1)
    signed = identity_keys is not None
    pki = None
    if identity_keys is not None:
        missing = [cid for cid in ids if cid not in identity_keys]
        if missing:
            raise KeyMaterialError(f"signed round needs an identity key for every client; missing {missing!r}")
        pki = {cid: prim.identity_public_raw(prim.check_identity_private(identity_keys[cid], cid)) for cid in ids}
    cpu: defaultdict[str, float] = defaultdict(float)
    t0 = clock()
    server = _TimedServer(
        SecAggServerSession(
            SecAggServer(
                round_index=round_index,
                participants=ids,
                threshold=threshold,
                degree=degree,
                bits=bits,
                length=length,
                identities=pki,
                keep_masked=keep_masked,
            )
        ),
        cpu,
        clock,
    )
    cpu["server_setup"] += clock() - t0
    policy = RoundPolicy(tuple(ids), threshold, degree, bits, signed, source=f"threshold={threshold}, degree={degree}")
    parties = {}
    for cid in ids:
        session = SecAggClientSession(
            SecAggClient(
                cid,
                round_index=round_index,
                policy=policy,
                identity_key=identity_keys[cid] if identity_keys is not None else None,
                identity_keys=pki,
            )
        )
        session.set_words(vectors[cid])
        parties[cid] = _timed_party(session.handle, server, cpu, clock)
    result = drive_round(server, parties, dropouts=silent)
    return replace(result, cpu_seconds=dict(cpu))


class _TimedServer:
    """A server session that charges its CPU time to ``server_<stage>`` (benchmarks read it)."""

    def __init__(self, inner: SecAggServerSession, cpu: defaultdict[str, float], clock: Callable[[], float]) -> None:
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


def _timed_party(respond, server: _TimedServer, cpu: defaultdict[str, float], clock: Callable[[], float]):
    def timed(message: bytes) -> bytes | None:
        t0 = clock()
        try:
            return respond(message)
        finally:
            cpu[f"client_{stage_name(server.stage)}"] += clock() - t0

    return timed
