"""The attacks of issue 17, written as an active server would run them against the real state machines.

Each test plays the server: it runs the honest stages it needs through :class:`SecAggServer`, then
departs from the protocol (a threshold of 1, split survivor sets, mutated messages, a graph of its
choosing) while every client runs the real :class:`SecAggClient` through its session. Each asserts
that the attack yields nothing: refused with one exception type, or too few shares to rebuild.
"""

from __future__ import annotations

import numpy as np
import pytest

from secagg import ClientKeys, MaskedSum, ProtocolError, Stage, shamir
from secagg import _primitives as prim
from secagg.graph import derive_graph_seed, neighbours
from secagg.messages import KeyList, RoundSetup, SurvivorSet, SurvivorSignature, UnmaskRequest, UnmaskResponse, survivor_digest
from secagg.protocol import SecAggClient, SecAggServer, _commitment, _pairwise_seed, _self_seed


def _ids(n):
    return [f"c{i:03d}" for i in range(n)]


def _keys(ids):
    private = {c: prim.new_identity_key() for c in ids}
    directory = {c: prim.identity_public_raw(k) for c, k in private.items()}
    return {c: ClientKeys(identity_key=private[c], peer_identities=directory) for c in ids}, directory


class _Federation:
    """Clients built from a MaskedSum the way client parties build them, and the server's state machine."""

    def __init__(self, backend: MaskedSum, n: int, d: int = 8, round_index: int = 7):
        self.backend = backend
        self.ids = _ids(n)
        self.keys, self.directory = _keys(self.ids) if backend.signed_keys else ({c: None for c in self.ids}, None)
        rng = np.random.default_rng(n)
        self.words = {c: rng.integers(0, 2**32, d, dtype=np.uint32) for c in self.ids}
        self.sessions = {}
        for c in self.ids:
            session = backend.client_session(c, round_index=round_index, participants=self.ids, rng=rng, keys=self.keys[c])
            session._session.set_words(self.words[c])  # ring words directly: the attack targets the masking, not the encoding
            self.sessions[c] = session
        plan = backend.plan(n)
        self.t, self.k = plan.threshold, plan.degree
        self.server = SecAggServer(
            round_index=round_index,
            participants=self.ids,
            threshold=plan.threshold,
            degree=plan.degree,
            length=d,
            identities=self.directory,
            keep_masked=True,
        )

    def honest_until_masked_input(self):
        s = self.server
        for batch, receive in ((s.setup_messages(), s.receive_advertisement),):
            for c, m in batch.items():
                receive(self.sessions[c].handle(m))
        for c, m in s.key_lists().items():
            s.receive_shares(self.sessions[c].handle(m))
        for c, m in s.share_deliveries().items():
            s.receive_masked_input(self.sessions[c].handle(m))
        s._close_masked_input()
        return s


# ----------------------------------------------------------------------------- 1. threshold below the floor


def test_a_set_up_with_threshold_1_is_refused_by_every_client():
    backend = MaskedSum(value_bound=1.0, max_clients=12)
    fed = _Federation(backend, 12)
    floor = backend.plan(12).threshold
    honest = fed.server.setup
    attack = RoundSetup(honest.round_index, honest.participants, 1, honest.degree, honest.bits, honest.length, honest.signed)
    for c in fed.ids:
        with pytest.raises(ProtocolError, match=f"threshold=1 is below the floor {floor} it plans itself for n=12"):
            fed.sessions[c].handle(attack.to_bytes())
    # what the refusal prevents: a client that accepted t=1 (no policy) hands out its secrets as shares
    naive = SecAggClient("c000", round_index=honest.round_index)
    naive.advertise(attack.to_bytes())
    seed_share = shamir.split(naive._seed, threshold=1, xs=[2])[0]
    assert shamir.combine({2: seed_share}, threshold=1) == naive._seed


@pytest.mark.parametrize(
    "attack",
    [
        lambda p: (dict(degree=4, threshold=3), f"degree=4 below the floor {p.degree} it plans itself for n=40"),
        lambda p: (dict(degree=p.degree + 2), f"degree={p.degree + 2} differs from the floor {p.degree}"),
        lambda p: (
            dict(participants=tuple(_ids(40)[:10]), degree=9, threshold=3),
            r"participants differ from the 40 it was told \(missing \['c010'",
        ),
        lambda p: (dict(threshold=p.threshold - 1), f"threshold={p.threshold - 1} is below the floor {p.threshold}"),
        lambda p: (dict(bits=64), "bits=64, signed=False; its configuration says bits=32, signed=False"),
    ],
)
def test_set_ups_below_the_clients_own_plan_are_refused_naming_the_parameter(attack):
    backend = MaskedSum(value_bound=1.0, max_clients=40, graph="secagg+", dropout_rate=0.1)
    plan = backend.plan(40)
    change, pattern = attack(plan)
    fed = _Federation(backend, 40)
    s = fed.server.setup
    bad = RoundSetup(**{**vars(s), **change}).to_bytes()
    with pytest.raises(ProtocolError, match=pattern):
        fed.sessions["c000"].handle(bad)


def test_clients_shown_different_set_ups_refuse_each_others_keys():
    """Advertisements sign the set-up digest: a client shown another set-up is isolated, not fooled."""
    backend = MaskedSum(value_bound=1.0, max_clients=6, signed_keys=True)
    fed = _Federation(backend, 6)
    s = fed.server
    setups = s.setup_messages()
    other = RoundSetup(**{**vars(s.setup), "threshold": s.setup.threshold + 1})
    odd = fed.sessions["c001"].handle(other.to_bytes())  # above c001's floor, so it takes part, but others saw t
    with pytest.raises(ProtocolError, match="answers another round set-up"):
        s.receive_advertisement(odd)
    for c in fed.ids:
        if c != "c001":
            s.receive_advertisement(fed.sessions[c].handle(setups[c]))
    from secagg.messages import KeyAdvertisement

    s._ads[1] = KeyAdvertisement.from_bytes(odd)  # a lying server forwards it anyway
    lists = s.key_lists()
    with pytest.raises(ProtocolError, match="'c001' answers another round set-up than 'c000' saw"):
        fed.sessions["c000"].handle(lists["c000"])


# ----------------------------------------------------------------------------- 2. every client message authenticated


def _one_byte_mutations(data: bytes, count: int, rng: np.random.Generator):
    for _ in range(count):
        out = bytearray(data)
        pos = int(rng.integers(0, len(out)))
        out[pos] = (out[pos] + int(rng.integers(1, 256))) % 256
        yield bytes(out)


def test_300_mutated_masked_inputs_and_unmask_responses_are_all_rejected_with_protocol_error():
    backend = MaskedSum(value_bound=1.0, max_clients=6, signed_keys=True)
    fed = _Federation(backend, 6, d=64)
    s = fed.server
    for c, m in s.setup_messages().items():
        s.receive_advertisement(fed.sessions[c].handle(m))
    for c, m in s.key_lists().items():
        s.receive_shares(fed.sessions[c].handle(m))
    deliveries = s.share_deliveries()
    inputs = {c: fed.sessions[c].handle(m) for c, m in deliveries.items()}
    rng = np.random.default_rng(17)
    for bad in _one_byte_mutations(inputs["c000"], 300, rng):
        with pytest.raises(ProtocolError):
            s.receive_masked_input(bad)
    for m in inputs.values():  # the server's sum was never touched by a refused input
        s.receive_masked_input(m)
    for c, m in s.survivor_sets().items():
        s.receive_survivor_signature(fed.sessions[c].handle(m))
    responses = {c: fed.sessions[c].handle(m) for c, m in s.unmask_requests().items()}
    for bad in _one_byte_mutations(responses["c001"], 300, rng):
        with pytest.raises(ProtocolError):
            s.receive_unmask(bad)
    for m in responses.values():
        s.receive_unmask(m)
    assert np.array_equal(s.finish(), sum(fed.words.values()))


# ----------------------------------------------------------------------------- 3. split survivor sets (n=100, SecAgg+, signed)


class _SplitServer:
    """An active server that shows clients different survivor sets to unmask the target's input alone."""

    def __init__(self, fed: _Federation, target: str):
        self.fed = fed
        self.s = fed.honest_until_masked_input()
        self.ids = fed.ids
        self.index = {c: i for i, c in enumerate(self.ids)}
        self.u = self.index[target]
        self.nbrs = self.s._nbrs
        self.alive = frozenset(range(len(self.ids)))  # every client really sent its masked input

    def run(self, view_of) -> dict[str, dict[int, dict[int, bytes]]]:
        """Show client i the set ``view_of(i)``; forward every signature over the same set; collect shares."""
        s, fed = self.s, self.fed
        views = {i: frozenset(view_of(i)) for i in range(len(self.ids))}
        digests, signed = {}, {}
        for i, view in views.items():
            alive = tuple(self.ids[j] for j in sorted(view))
            try:
                reply = fed.sessions[self.ids[i]].handle(SurvivorSet(s.round_index, self.ids[i], alive).to_bytes())
            except ProtocolError:
                continue  # the client refused to sign what it was shown
            sig = SurvivorSignature.from_bytes(reply)
            signed[i] = sig.signature
            digests[i] = survivor_digest(s.round_index, s._setup_digest, alive)
        seeds: dict[int, dict[int, bytes]] = {}
        keys: dict[int, dict[int, bytes]] = {}
        for i in signed:
            same = [(self.ids[j], signed[j]) for j in sorted(signed) if j != i and digests[j] == digests[i]]
            holders = sorted({i, *self.nbrs[i]})
            alive = tuple(self.ids[j] for j in holders if j in views[i])
            try:
                reply = fed.sessions[self.ids[i]].handle(UnmaskRequest(s.round_index, self.ids[i], alive, tuple(same)).to_bytes())
            except ProtocolError:
                continue  # the client refused to answer
            resp = UnmaskResponse.from_bytes(reply)
            for owner, share in resp.self_mask_shares:
                seeds.setdefault(self.index[owner], {})[i + 1] = share
            for owner, share in resp.mask_key_shares:
                keys.setdefault(self.index[owner], {})[i + 1] = share
        return {"seeds": seeds, "keys": keys}

    def try_unmask_target(self, got) -> np.ndarray | None:
        """The target's input, if the shares collected rebuild its seed and every neighbour's mask key."""
        s, t, u = self.s, self.fed.t, self.u
        if len(got["seeds"].get(u, {})) < t or any(len(got["keys"].get(h, {})) < t for h in self.nbrs[u]):
            return None
        r, owner = s.round_index, self.ids[u]
        pick = lambda held: {x: held[x] for x in sorted(held)[:t]}  # noqa: E731
        seed = shamir.combine(pick(got["seeds"][u]), threshold=t)
        assert _commitment(seed, r, owner) == s._ads[u].commitment
        streams = [(_self_seed(seed, r, owner), -1)]
        for h in self.nbrs[u]:
            key = prim.x25519_private_from_raw(shamir.combine(pick(got["keys"][h]), threshold=t))
            peer = self.ids[h]
            low, high = (owner, peer) if u < h else (peer, owner)
            streams.append((_pairwise_seed(prim.agree(key, s._ads[u].mask_public), r, low, high), -1 if u < h else 1))
        return prim.add_keystreams(s.masked_views[owner].copy(), streams)


def _strategies(attack: _SplitServer):
    u, nbrs, alive = attack.u, attack.nbrs, attack.alive
    nu = frozenset(nbrs[u])
    per_neighbour = {}
    for h in nbrs[u]:
        for b in nbrs[h]:
            if b != u and b not in nu:
                per_neighbour.setdefault(b, h)
    return {
        # the attack: everyone sees the target alive, the holders of each neighbour see it dropped
        "drop-neighbours-per-holder": lambda i: alive if i == u else alive - (nu & frozenset(nbrs[i])),
        # one set where the target is alive, one where all its neighbours dropped
        "two-sets": lambda i: alive if i in nu or i == u else alive - nu,
        # each neighbour h dropped in the view of those of its holders outside the target's holders
        "one-neighbour-each": lambda i: alive - {per_neighbour[i]} if i in per_neighbour else alive,
    }


@pytest.fixture(scope="module")
def split_round():
    backend = MaskedSum(value_bound=1.0, max_clients=100, graph="secagg+", signed_keys=True, dropout_rate=0.1)
    plan = backend.plan(100)
    assert plan.graph == "secagg+" and plan.active_secure and plan.degree < 99
    return backend


@pytest.mark.parametrize("strategy", ["drop-neighbours-per-holder", "two-sets", "one-neighbour-each"])
def test_split_survivor_sets_at_n100_secagg_plus_signed_yield_too_few_shares(split_round, strategy):
    fed = _Federation(split_round, 100)
    attack = _SplitServer(fed, target="c042")
    got = attack.run(_strategies(attack)[strategy])
    t, u = fed.t, attack.u
    seed_shares = len(got["seeds"].get(u, {}))
    short_keys = [h for h in attack.nbrs[u] if len(got["keys"].get(h, {})) < t]
    assert seed_shares < t or short_keys, (strategy, seed_shares, len(short_keys))
    assert attack.try_unmask_target(got) is None


def test_the_same_attack_reads_the_input_exactly_from_clients_that_skip_the_consistency_checks(split_round, monkeypatch):
    """The attack is real: clients that accept any signatures and count no holders give the input away."""
    from secagg import protocol

    monkeypatch.setattr(protocol._Confirmations, "count", lambda self, group, need: len(group))
    check_alive = protocol.SecAggClient._check_alive

    def no_count(self, alive, what):
        t = self._setup.threshold
        object.__setattr__(self._setup, "threshold", 1)
        try:
            check_alive(self, alive, what)
        finally:
            object.__setattr__(self._setup, "threshold", t)

    monkeypatch.setattr(protocol.SecAggClient, "_check_alive", no_count)
    fed = _Federation(split_round, 100)
    attack = _SplitServer(fed, target="c042")
    recovered = attack.try_unmask_target(attack.run(_strategies(attack)["drop-neighbours-per-holder"]))
    assert recovered is not None and np.array_equal(recovered, fed.words["c042"])


def test_the_split_attack_harness_does_unmask_when_the_views_are_consistent(split_round):
    """Sanity check of the adversary: with one honest view it collects every seed share it needs."""
    fed = _Federation(split_round, 100)
    attack = _SplitServer(fed, target="c042")
    got = attack.run(lambda i: attack.alive)
    assert all(len(got["seeds"][v]) >= fed.t for v in range(100)) and not got["keys"]


# ----------------------------------------------------------------------------- 4. the graph seed


def test_a_server_chosen_graph_is_refused_and_the_derived_one_cannot_be_steered_to_colluders():
    backend = MaskedSum(
        value_bound=1.0, max_clients=60, graph="secagg+", signed_keys=True, dropout_rate=0.1, corrupted_fraction=0.05
    )
    fed = _Federation(backend, 60)
    s = fed.server
    for c, m in s.setup_messages().items():
        s.receive_advertisement(fed.sessions[c].handle(m))
    honest_lists = s.key_lists()
    target, colluders = 0, set(range(1, 4))  # floor(0.05 * 60) = 3 colluders
    n, k, t = 60, fed.k, fed.t
    # (a) grind a seed of the server's own choosing until the target's neighbourhood holds every colluder
    ground = next(
        seed
        for seed in (i.to_bytes(32, "big") for i in range(20000))
        if colluders <= set(neighbours(n, degree=k, seed=seed)[target])
    )
    g = neighbours(n, degree=k, seed=ground)
    kl = KeyList.from_bytes(honest_lists[fed.ids[target]])
    ads = {a.sender: a for a in KeyList.from_bytes(honest_lists[fed.ids[g[target][0]]]).advertisements}
    ads.update({a.sender: a for a in kl.advertisements})
    for lst in honest_lists.values():
        ads.update({a.sender: a for a in KeyList.from_bytes(lst).advertisements})
    planted = KeyList(kl.round_index, fed.ids[target], kl.roster, tuple(ads[fed.ids[j]] for j in g[target]))
    with pytest.raises(ProtocolError, match="not a neighbour|withholds"):
        fed.sessions[fed.ids[target]].handle(planted.to_bytes())
    # (b) steer the derived seed by withholding advertisements: the colluders never hold t of the target's shares
    best = 0
    rng = np.random.default_rng(0)
    for _ in range(300):
        withheld = set(rng.choice(np.arange(4, n), size=5, replace=False).tolist())
        roster = tuple(e for j, e in enumerate(kl.roster) if j not in withheld)
        seed = derive_graph_seed(round_index=s.round_index, setup_digest=s._setup_digest, roster=roster)
        best = max(best, len(colluders & set(neighbours(n, degree=k, seed=seed)[target])))
    assert best < t and 2 * t > k + 2 + len(colluders)  # graph-independent: enough honest holders whatever the graph


# ----------------------------------------------------------------------------- 5. exact sums with every defence on


def test_signed_secagg_plus_round_at_n100_is_exact_with_dropouts_at_every_stage(split_round):
    ids = _ids(100)
    rng = np.random.default_rng(5)
    updates = {c: rng.uniform(-1, 1, 16).astype(np.float32) for c in ids}
    stages = list(Stage)
    dropouts = {c: stages[i % len(stages)] for i, c in enumerate(ids[::12])}
    result = split_round.aggregate(updates, round_index=3, rng=np.random.default_rng(1), dropouts=dropouts)
    counted = [c for c in ids if dropouts.get(c, Stage.UNMASK) > Stage.MASKED_INPUT]
    assert result.contributors == tuple(counted)
    exact = np.sum([updates[c].astype(np.float64) for c in counted], axis=0)
    assert np.max(np.abs(result.total - exact)) <= result.max_abs_error + 1e-12
