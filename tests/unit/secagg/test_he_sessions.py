"""HE modes split into parties: key holder, clients and server exchange bytes only."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg import (
    KEY_HOLDER,
    BFVSum,
    CKKSSum,
    ClientKeys,
    DropoutError,
    KeyMaterialError,
    PlaintextSum,
    ProtocolError,
    SecAggError,
    SelectiveSum,
    Stage,
    drive_round,
)
from secagg import _he_wire as wire
from secagg.ckks import KeyHolderSession
from secagg.selective import pack_parts, unpack_parts

IDS = ("a", "b", "c")


def _vectors(d=50, seed=0):
    rng = np.random.default_rng(seed)
    return {cid: rng.uniform(-1, 1, d) for cid in IDS}


def _parties(backend, vectors, *, round_index=1):
    """Each party built on its own from bytes: what fedcore does across processes."""
    holder = backend.key_holder_session(round_index=round_index)
    public = holder.server_context()
    contexts = {cid: holder.client_context(cid) for cid in vectors}  # delivered out of the server's reach
    server = backend.server_session(round_index=round_index, participants=sorted(vectors), length=50, public_context=public)
    clients = {}
    for cid, vec in vectors.items():
        session = backend.client_session(
            cid,
            round_index=round_index,
            participants=sorted(vectors),
            rng=np.random.default_rng(7),
            keys=ClientKeys(he_context=contexts[cid]),
        )
        session.set_input(vec)
        clients[cid] = session
    return holder, server, clients


@pytest.mark.parametrize(
    "backend",
    [
        CKKSSum(value_bound=1.0, max_clients=5),
        CKKSSum(value_bound=1.0, max_clients=5, preset="compact-pk"),
        BFVSum(value_bound=1.0, max_clients=5),
    ],
    ids=["compact", "compact-pk", "bfv"],
)
def test_separate_parties_sum_within_the_stated_bound(backend):
    vectors = _vectors()
    holder, server, clients = _parties(backend, vectors)
    parties = {cid: s.handle for cid, s in clients.items()} | {KEY_HOLDER: holder.handle}
    result = drive_round(server, parties)
    exact = np.sum(list(vectors.values()), axis=0)
    assert result.contributors == IDS and result.mode == backend.mode
    assert np.max(np.abs(result.total - exact)) <= result.max_abs_error


def test_server_session_holds_only_the_public_context():
    backend = CKKSSum(value_bound=1.0, max_clients=5)
    holder = backend.key_holder_session(round_index=0)
    with pytest.raises(KeyMaterialError, match="holds a secret key"):
        backend.server_session(round_index=0, participants=IDS, length=3, public_context=holder.client_context("a"))
    with pytest.raises(KeyMaterialError, match="needs the key holder's server_context"):
        backend.server_session(round_index=0, participants=IDS, length=3)
    env = wire.unpack(holder.server_context(), what="m")
    assert env.header["has_secret_key"] is False and "secret_key" not in env.header["blobs"]


def test_public_key_preset_gives_clients_no_secret_key():
    holder = CKKSSum(value_bound=1.0, max_clients=5, preset="compact-pk").key_holder_session(round_index=0)
    assert "secret_key" not in wire.unpack(holder.client_context("a"), what="m").header["blobs"]
    sym = CKKSSum(value_bound=1.0, max_clients=5).key_holder_session(round_index=0)
    assert "secret_key" in wire.unpack(sym.client_context("a"), what="m").header["blobs"]


def test_client_needs_its_he_context():
    with pytest.raises(KeyMaterialError, match=r"ClientKeys\(he_context=...\)"):
        CKKSSum(value_bound=1.0, max_clients=5).client_session(
            "a", round_index=0, participants=IDS, rng=np.random.default_rng(0), keys=None
        )


def test_messages_are_bound_to_their_round():
    backend = CKKSSum(value_bound=1.0, max_clients=5)
    vectors = _vectors()
    holder, server, clients = _parties(backend, vectors, round_index=3)
    batch = server.outgoing()
    other = backend.server_session(round_index=4, participants=IDS, length=50, public_context=holder.server_context())
    with pytest.raises(ProtocolError, match="request is for round 4"):
        clients["a"].handle(other.outgoing()["a"])
    reply = clients["a"].handle(batch["a"])
    with pytest.raises(ProtocolError, match="is for round 3, this aggregate is for round 4"):
        other.receive("a", reply)


def test_key_holder_decrypts_one_aggregate_only():
    backend = CKKSSum(value_bound=1.0, max_clients=5)
    holder, server, clients = _parties(backend, _vectors())
    for cid, message in server.outgoing().items():
        server.receive(cid, clients[cid].handle(message))
    aggregate = server.outgoing()[KEY_HOLDER]
    first = holder.handle(aggregate)
    assert wire.unpack(first, what="m").kind == wire.DECRYPTION
    with pytest.raises(ProtocolError, match="decrypts one aggregate only"):
        holder.handle(aggregate)
    # a client holding the secret key (symmetric preset) also decrypts at most once
    clients["a"].handle(aggregate)
    with pytest.raises(ProtocolError, match="decrypts one aggregate only"):
        clients["a"].handle(aggregate)


def test_server_refuses_replies_from_parties_it_did_not_ask():
    backend = CKKSSum(value_bound=1.0, max_clients=5)
    holder, server, clients = _parties(backend, _vectors())
    for cid, message in server.outgoing().items():
        server.receive(cid, clients[cid].handle(message))
    aggregate = server.outgoing()[KEY_HOLDER]
    with pytest.raises(ProtocolError, match="who was not asked"):
        server.receive("a", clients["a"].handle(aggregate))
    with pytest.raises(ProtocolError, match="not a participant"):
        fresh = backend.server_session(round_index=1, participants=IDS, length=50, public_context=holder.server_context())
        fresh.outgoing()
        fresh.receive("zz", b"")


def test_public_key_preset_without_its_key_holder_stops_with_a_dropout_error():
    backend = CKKSSum(value_bound=1.0, max_clients=5, preset="compact-pk")
    _holder, server, clients = _parties(backend, _vectors())
    with pytest.raises(DropoutError, match="no one else holds the secret key"):
        drive_round(server, {cid: s.handle for cid, s in clients.items()})


def test_symmetric_preset_asks_one_contributor_at_a_time_when_the_key_holder_is_silent():
    backend = CKKSSum(value_bound=1.0, max_clients=5)
    vectors = _vectors()
    _holder, server, clients = _parties(backend, vectors)
    asked = []

    def answer(cid):
        def respond(message):
            if wire.unpack(message, what="m").kind == wire.AGGREGATE:
                asked.append(cid)
            return clients[cid].handle(message)

        return respond

    result = drive_round(server, {cid: answer(cid) for cid in IDS}, dropouts={"a": Stage.UNMASK})
    assert asked == ["b"]  # "a" was asked first and stayed silent; one decryption was made
    assert result.contributors == IDS


def test_selective_envelope_round_trips_and_refuses_garbage():
    parts = {"encrypted": b"xyz", "rest": None}
    assert unpack_parts(pack_parts(parts), what="m") == parts
    with pytest.raises(ProtocolError, match="not a selective envelope"):
        unpack_parts(b"PFHE\x01", what="m")
    with pytest.raises(ProtocolError, match="trailing"):
        unpack_parts(pack_parts(parts) + b"\x00", what="m")
    with pytest.raises(ProtocolError, match="the rest part declares 3 bytes, 2 remain"):
        unpack_parts(pack_parts({"encrypted": None, "rest": b"xyz"})[:-1], what="m")


def test_selective_batches_carry_both_paths_for_one_recipient():
    """BFV and CKKS paths: the key holder gets both aggregates in one envelope, in one batch."""
    backend = SelectiveSum(
        encrypted=BFVSum(value_bound=1.0, max_clients=5), rest=CKKSSum(value_bound=1.0, max_clients=5), mask=[0, 3]
    )
    vectors = _vectors()
    holder, server, clients = _parties(backend, vectors)
    seen = []

    def key_holder(message):
        seen.append({p for p, part in unpack_parts(message, what="m").items() if part is not None})
        return holder.handle(message)

    result = drive_round(server, {cid: s.handle for cid, s in clients.items()} | {KEY_HOLDER: key_holder})
    assert seen == [{"encrypted", "rest"}]
    exact = np.sum(list(vectors.values()), axis=0)
    assert np.max(np.abs(result.total - exact)) <= result.max_abs_error


def test_selective_with_plaintext_rest_runs_both_paths():
    backend = SelectiveSum(encrypted=CKKSSum(value_bound=1.0, max_clients=5), rest=PlaintextSum(), mask=[1])
    vectors = _vectors()
    holder, server, clients = _parties(backend, vectors)
    result = drive_round(server, {cid: s.handle for cid, s in clients.items()} | {KEY_HOLDER: holder.handle})
    exact = np.sum(list(vectors.values()), axis=0)
    assert np.array_equal(np.delete(result.total, 1), np.delete(exact, 1))  # plaintext path is exact
    assert abs(result.total[1] - exact[1]) <= result.max_abs_error
    with pytest.raises(TypeError, match="must implement secagg.SecureSum, got _NoSessions"):
        SelectiveSum(encrypted=_NoSessions(), rest=PlaintextSum(), mask=[0])


class _NoSessions:
    mode = "legacy"
    trust_model = "x"

    def aggregate(self, updates, *, round_index, rng, dropouts=None):
        raise NotImplementedError

    def describe(self):
        return {"mode": self.mode}


# -- edited messages: one exception family, whoever receives them -----------------------------------
@pytest.fixture(scope="module")
def transcript():
    """One CKKS round's messages, with the party that reads each kind."""
    backend = CKKSSum(value_bound=1.0, max_clients=5)
    holder, server, clients = _parties(backend, _vectors())
    request = server.outgoing()["a"]
    for cid, s in clients.items():
        server.receive(cid, s.handle(request))
    aggregate = server.outgoing()[KEY_HOLDER]
    decryption = holder.handle(aggregate)
    context = holder.client_context("a")

    def client(data):
        session = backend.client_session(
            "a", round_index=1, participants=IDS, rng=np.random.default_rng(0), keys=ClientKeys(he_context=context)
        )
        session.set_input(np.zeros(50))
        return session.handle(data)

    readers = {
        "request": client,
        "ciphertext": lambda data: _fresh_server(backend, holder).receive("a", data),
        "aggregate": lambda data: KeyHolderSession(holder._holder, round_index=1).handle(data),
        "decryption": lambda data: _waiting_server(backend, holder, clients).receive(KEY_HOLDER, data),
    }
    messages = {"request": request, "ciphertext": clients["a"].handle(request), "aggregate": aggregate, "decryption": decryption}
    for name, message in messages.items():  # each reader accepts the genuine message
        readers[name](message)
    return messages, readers


def _fresh_server(backend, holder):
    server = backend.server_session(round_index=1, participants=IDS, length=50, public_context=holder.server_context())
    server.outgoing()
    return server


def _waiting_server(backend, holder, clients):
    server = _fresh_server(backend, holder)
    request = wire.pack(wire.REQUEST, {**holder.info.link(), "round": 1, "length": 50, "blobs": []}, [])
    for cid, session in clients.items():
        server.receive(cid, session.handle(request))
    server.outgoing()
    return server


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(["request", "ciphertext", "aggregate", "decryption"]), data=st.data())
def test_edited_session_messages_raise_only_secagg_errors(transcript, name, data):
    messages, readers = transcript
    body = bytearray(messages[name][:-32])
    (head_len,) = struct.unpack_from(">I", body, 6)
    span = 10 + head_len if data.draw(st.booleans()) else len(body)  # aim at the JSON header, or anywhere
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        body[data.draw(st.integers(min_value=0, max_value=span - 1))] ^= data.draw(st.integers(min_value=1, max_value=255))
    edited = bytes(body) + hashlib.sha256(bytes(body)).digest()  # resealed: the digest is no signature
    try:
        readers[name](edited)
    except SecAggError:
        pass
