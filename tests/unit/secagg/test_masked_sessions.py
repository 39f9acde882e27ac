"""The party halves of ``MaskedSum``: client sessions in client parties, a server session that sees bytes only."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg import (
    ClientKeys,
    ClientSession,
    KeyMaterialError,
    MaskedSum,
    ProtocolError,
    ServerSession,
    Stage,
    drive_round,
)
from secagg import _primitives as prim


def _updates(n, d, seed):
    rng = np.random.default_rng(seed)
    return {f"c{i:02d}": rng.uniform(-1, 1, d).astype(np.float32) for i in range(n)}


def _keys(ids):
    private = {c: prim.new_identity_key() for c in ids}
    directory = {c: prim.identity_public_raw(k) for c, k in private.items()}
    return {c: ClientKeys(identity_key=private[c], peer_identities=directory) for c in ids}


class _BytesOnlyServer:
    """Wraps a server session and records the type of everything it is handed."""

    def __init__(self, inner):
        self.inner = inner
        self.types: set[type] = set()

    @property
    def stage(self):
        return self.inner.stage

    def outgoing(self):
        batch = self.inner.outgoing()
        for message in batch.values():
            self.types.add(type(message))
        return batch

    def receive(self, sender, message):
        self.types.add(type(message))
        self.inner.receive(sender, message)

    def finish(self):
        return self.inner.finish()


def _session_round(backend, updates, *, round_index, rng, dropouts=None, signed=False):
    """A round as separate parties would run it: each client builds its session from its own rng and keys."""
    ids = sorted(updates)
    keys = _keys(ids) if signed else {c: None for c in ids}
    context = backend.public_context(keys[ids[0]].peer_identities) if signed else None
    server = _BytesOnlyServer(
        backend.server_session(
            round_index=round_index, participants=ids, length=next(iter(updates.values())).size, public_context=context
        )
    )
    parties = {}
    for cid, child in zip(ids, rng.spawn(len(ids))):
        session = backend.client_session(cid, round_index=round_index, participants=ids, rng=child, keys=keys[cid])
        assert isinstance(session, ClientSession)
        session.set_input(updates[cid])
        parties[cid] = session.handle
    assert isinstance(server.inner, ServerSession)
    return drive_round(server, parties, dropouts=dropouts), server


@pytest.mark.parametrize("graph, signed", [("complete", False), ("complete", True), ("secagg+", False), ("secagg+", True)])
def test_session_round_equals_in_process_aggregate(graph, signed):
    backend = MaskedSum(value_bound=1.0, max_clients=30, graph=graph, signed_keys=signed)
    updates = _updates(24, 33, seed=1)
    dropouts = {"c03": Stage.SHARE_KEYS, "c11": Stage.UNMASK}
    reference = backend.aggregate(updates, round_index=4, rng=np.random.default_rng(9), dropouts=dropouts)
    result, server = _session_round(
        backend, updates, round_index=4, rng=np.random.default_rng(9), dropouts=dropouts, signed=signed
    )
    assert np.array_equal(result.total, reference.total)  # same client generators: the same stochastic rounding
    assert (result.contributors, result.dropped) == (reference.contributors, reference.dropped)
    assert result.max_abs_error == reference.max_abs_error and result.mode == "masked"
    assert server.types == {bytes}


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(3, 14),
    d=st.integers(1, 20),
    graph=st.sampled_from(["complete", "secagg+"]),
    signed=st.booleans(),
    data=st.data(),
)
def test_session_round_is_exact_under_random_dropouts(n, d, graph, signed, data):
    """Any dropouts the plan tolerates, at any stage (the consistency check included), give the exact sum."""
    backend = MaskedSum(value_bound=1.0, max_clients=16, graph=graph, bits=64, signed_keys=signed)
    updates = _updates(n, d, seed=n * 17 + d)
    ids = sorted(updates)
    plan = backend.plan(n)
    dropouts = data.draw(st.dictionaries(st.sampled_from(ids), st.sampled_from(list(Stage)), max_size=plan.tolerated_dropouts))
    result, server = _session_round(
        backend, updates, round_index=2, rng=np.random.default_rng(n), dropouts=dropouts, signed=signed
    )
    counted = [c for c in ids if dropouts.get(c, Stage.UNMASK) > Stage.MASKED_INPUT]
    exact = np.sum([updates[c].astype(np.float64) for c in counted], axis=0)
    assert result.contributors == tuple(counted)
    assert result.dropped == tuple(sorted(dropouts))
    assert np.max(np.abs(result.total - exact)) <= result.max_abs_error + 1e-12
    assert server.types == {bytes}


def test_client_input_is_encoded_with_the_clients_own_generator():
    """Only the client's generator decides the stochastic rounding; the server half takes no generator at all."""
    backend = MaskedSum(value_bound=1.0, max_clients=4)
    updates = _updates(3, 200, seed=2)
    a, _ = _session_round(backend, updates, round_index=1, rng=np.random.default_rng(5))
    b, _ = _session_round(backend, updates, round_index=2, rng=np.random.default_rng(5))
    c, _ = _session_round(backend, updates, round_index=3, rng=np.random.default_rng(6))
    assert np.array_equal(a.total, b.total) and not np.array_equal(a.total, c.total)
    with pytest.raises(TypeError):
        backend.server_session(round_index=1, participants=sorted(updates), length=200, rng=np.random.default_rng(0))  # type: ignore[call-arg]


def test_server_session_refuses_non_bytes_and_a_sender_it_is_not():
    backend = MaskedSum(value_bound=1.0, max_clients=4)
    ids = ["c00", "c01", "c02"]
    server = backend.server_session(round_index=1, participants=ids, length=2)
    client = backend.client_session("c00", round_index=1, participants=ids, rng=np.random.default_rng(0))
    ad = client.handle(server.outgoing()["c00"])
    with pytest.raises(ProtocolError, match="must be bytes"):
        server.receive("c00", object())  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="signed 'c00' arrived from 'c01'"):
        server.receive("c01", ad)
    server.receive("c00", ad)
    with pytest.raises(ProtocolError, match="second key advertisement"):
        server.receive("c00", ad)
    with pytest.raises(ProtocolError, match="not over"):
        server.finish()


def test_client_session_refuses_messages_clients_never_receive_and_input_missing():
    backend = MaskedSum(value_bound=1.0, max_clients=4)
    ids = ["c00", "c01", "c02"]
    server = backend.server_session(round_index=1, participants=ids, length=2)
    sessions = {c: backend.client_session(c, round_index=1, participants=ids, rng=np.random.default_rng(0)) for c in ids}
    setups = server.outgoing()
    ads = {c: sessions[c].handle(setups[c]) for c in ids}
    with pytest.raises(ProtocolError, match="does not accept KEY_ADVERTISEMENT"):
        sessions["c01"].handle(ads["c00"])
    for c in ids:
        server.receive(c, ads[c])
    lists = server.outgoing()
    for c in ids:
        server.receive(c, sessions[c].handle(lists[c]))
    deliveries = server.outgoing()
    with pytest.raises(ProtocolError, match="before it had an input"):
        sessions["c00"].handle(deliveries["c00"])


def test_signed_client_session_needs_its_keys():
    backend = MaskedSum(value_bound=1.0, max_clients=4, signed_keys=True)
    with pytest.raises(KeyMaterialError, match="'c00': signed_keys=True needs ClientKeys"):
        backend.client_session("c00", round_index=1, participants=["c00", "c01"], rng=np.random.default_rng(0), keys=None)
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        backend.client_session("c00", round_index=1, participants=["c00"], rng=0, keys=None)  # type: ignore[arg-type]


def _reachable(obj, seen=None):
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    yield obj
    children = (
        obj.values()
        if isinstance(obj, dict)
        else obj
        if isinstance(obj, (list, tuple, set))
        else vars(obj).values()
        if hasattr(obj, "__dict__")
        else ()
    )
    for child in children:
        yield from _reachable(child, seen)


def test_backend_keeps_no_identity_key_after_a_signed_round():
    backend = MaskedSum(value_bound=1.0, max_clients=6, signed_keys=True)
    backend.aggregate(_updates(4, 5, seed=3), round_index=1, rng=np.random.default_rng(0))
    assert not any(isinstance(o, Ed25519PrivateKey) for o in _reachable(backend))


def test_signed_server_session_needs_the_directory_and_refuses_a_bad_one():
    backend = MaskedSum(value_bound=1.0, max_clients=4, signed_keys=True)
    ids = ["c00", "c01", "c02"]
    with pytest.raises(KeyMaterialError, match="needs public_context=backend.public_context"):
        backend.server_session(round_index=1, participants=ids, length=2)
    with pytest.raises(ProtocolError, match="not a secagg identity directory"):
        backend.server_session(round_index=1, participants=ids, length=2, public_context=b"not a directory")
    _, directory = next(iter(_keys(ids).values())), _keys(ids)["c00"].peer_identities
    partial = backend.public_context({c: directory[c] for c in ids[:2]})
    with pytest.raises(KeyMaterialError, match=r"identity key of every participant; missing \['c02'\]"):
        backend.server_session(round_index=1, participants=ids, length=2, public_context=partial)
    with pytest.raises(KeyMaterialError, match="takes no public_context"):
        MaskedSum(value_bound=1.0, max_clients=4).server_session(
            round_index=1, participants=ids, length=2, public_context=partial
        )
    with pytest.raises(KeyMaterialError, match="'c00' must be 32 raw Ed25519 public bytes"):
        backend.public_context({"c00": b"short"})
