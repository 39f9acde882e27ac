"""The HE trust-model text, sentence by sentence, against the running parties.

Each test plays the party a sentence of ``CKKSSum.trust_model`` / ``BFVSum.trust_model`` names
(colluding client, colluding key holder, active server) and shows what it can or cannot learn.
The server refusing secret-key contexts, one decryption per key set, the grid release and the
Li-Micciancio key recovery are tested in test_ckks.py, test_he_sessions.py and
test_ckks_key_recovery.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from secagg import BFVSum, CKKSSum, ClientKeys, KeyMaterialError
from secagg import _he_wire as wire
from secagg._he_core import snap_to_grid
from secagg.ckks import CKKSClient, HEServer

VICTIM = np.linspace(-0.8, 0.8, 100)


def _single_client_aggregate(backend, holder, *, victim_id="b", round_index=1):
    """An active server passes the victim's ciphertext off as the round's aggregate."""
    client = CKKSClient(holder.client_context(victim_id), client_id=victim_id)
    server = HEServer(holder.server_context(), round_index=round_index)
    server.add(victim_id, client.encrypt(VICTIM, round_index=round_index))
    return server.result()


def _released(reply: bytes) -> np.ndarray:
    return np.frombuffer(wire.unpack(reply, what="m").blobs[0], dtype="<f8")


@pytest.mark.parametrize("preset", ["compact", "compact-pk", "compat"])
def test_key_holder_cannot_tell_one_ciphertext_from_an_aggregate(preset):
    backend = CKKSSum(value_bound=1.0, max_clients=5, preset=preset)
    holder = backend.key_holder_session(round_index=1)
    reply = holder.handle(_single_client_aggregate(backend, holder))
    assert np.array_equal(_released(reply), snap_to_grid(VICTIM, grid=backend.release_grid, value_bound=1.0))
    assert "pass one client's ciphertext off as the aggregate" in backend.trust_model


def test_symmetric_preset_any_client_with_the_server_reads_an_update():
    backend = CKKSSum(value_bound=1.0, max_clients=5)
    holder = backend.key_holder_session(round_index=1)
    aggregate = _single_client_aggregate(backend, holder)
    colluder = backend.client_session(
        "a",
        round_index=1,
        participants=["a", "b"],
        rng=np.random.default_rng(0),
        keys=ClientKeys(he_context=holder.client_context("a")),
    )
    read = _released(colluder.handle(aggregate))
    assert np.max(np.abs(read - VICTIM)) <= backend.release_grid
    assert "any client, or the key holder, colluding with the server" in backend.trust_model


@pytest.mark.parametrize("preset", ["compact-pk", "compat"])
def test_public_key_preset_a_client_with_the_server_reads_nothing(preset):
    backend = CKKSSum(value_bound=1.0, max_clients=5, preset=preset)
    holder = backend.key_holder_session(round_index=1)
    context = holder.client_context("a")
    assert wire.unpack(context, what="m").header["has_secret_key"] is False
    colluder = backend.client_session(
        "a", round_index=1, participants=["a", "b"], rng=np.random.default_rng(0), keys=ClientKeys(he_context=context)
    )
    with pytest.raises(KeyMaterialError, match="holds no secret key"):
        colluder.handle(_single_client_aggregate(backend, holder))
    assert "a client colluding with the server decrypts nothing" in backend.trust_model


@pytest.mark.parametrize("backend", [CKKSSum(value_bound=1.0, max_clients=5), BFVSum(value_bound=1.0, max_clients=5)])
def test_every_round_has_fresh_keys(backend):
    first, second = (backend.key_holder_session(round_index=r) for r in (1, 2))
    assert first.info.key_id != second.info.key_id
    assert "each round" in backend.trust_model and "fresh keys" in backend.trust_model


def test_bfv_release_is_the_exact_integer_sum_whatever_the_keys():
    """Same inputs and rounding randomness, independent keys: bit-identical releases."""
    backend = BFVSum(value_bound=1.0, max_clients=5)
    updates = {cid: np.random.default_rng(1).uniform(-1, 1, 5000) for cid in ("a", "b", "c")}
    first = backend.aggregate(updates, round_index=1, rng=np.random.default_rng(9))
    second = backend.aggregate(updates, round_index=2, rng=np.random.default_rng(9))
    assert np.array_equal(first.total, second.total)
    assert "carries nothing about the key" in backend.trust_model
