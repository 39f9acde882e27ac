"""CKKS aggregation: presets, precision, key handling, byte-level failures."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import tenseal as ts
from hypothesis import given, settings
from hypothesis import strategies as st

import secagg
from secagg import CKKS_PRESETS, CKKSSum, DropoutError, KeyMaterialError, OverflowRiskError, ProtocolError, Stage, ckks_preset
from secagg import _he_wire as wire
from secagg.ckks import CKKSClient, CKKSKeyHolder, CKKSPreset, HEServer


def _round(holder: CKKSKeyHolder, updates: dict[str, np.ndarray], weights=None) -> bytes:
    server = HEServer(holder.public_context())
    ctx = holder.client_context(include_secret_key=holder.info.encryption == "symmetric")
    for cid, vec in updates.items():
        w = 1.0 if weights is None else weights[cid]
        server.add(cid, CKKSClient(ctx, client_id=cid).encrypt(vec, weight=w))
    return server.result()


def _exact(updates) -> np.ndarray:
    return np.sum([u.astype(np.float64) for u in updates.values()], axis=0)


# -- presets ----------------------------------------------------------------------------------------
def test_presets_state_their_parameters():
    compact = ckks_preset("compact")
    assert (compact.poly_modulus_degree, compact.coeff_mod_bit_sizes) == (4096, (50,))
    assert compact.values_per_ciphertext == 4096 and compact.slots == 2048
    assert compact.encryption == "symmetric" and compact.engine == "sealapi"
    compat = ckks_preset("compat")
    assert (compat.poly_modulus_degree, compat.coeff_mod_bit_sizes, compat.scale_bits) == (8192, (60, 40, 40), 40)
    assert compat.engine == "tenseal" and compat.values_per_ciphertext == 4096
    assert all(p.security_bits == 128 for p in CKKS_PRESETS.values())
    with pytest.raises(ValueError, match="preset must be one of"):
        ckks_preset("fast")
    with pytest.raises(TypeError):
        CKKS_PRESETS["x"] = compact  # read-only registry


def test_describe_names_preset_modulus_scale_slots_and_security():
    desc = CKKSSum(value_bound=1.0, max_clients=12).describe()
    assert desc["mode"] == "ckks" and desc["preset"] == "compact"
    assert desc["poly_modulus_degree"] == 4096 and desc["modulus_bits"] == 50
    assert desc["scale"] == 2.0**44 and desc["slots"] == 2048 and desc["security_bits"] == 128
    # the precision target, as a stated (worst-case) bound, for 12 clients of magnitude <= 1
    assert desc["max_abs_error_at_max_clients"] <= 1e-4
    assert desc["release_grid"] == 2.0**-21


def test_trust_model_says_who_can_break_it():
    sym = CKKSSum(value_bound=1.0, max_clients=4).trust_model
    assert "holds only the public context" in sym and "never the raw decryption" in sym
    assert "any client, or the key holder, colluding with the server" in sym
    pk = CKKSSum(value_bound=1.0, max_clients=4, preset="compact-pk", key_holder="c0").trust_model
    assert "key holder colluding with the server" in pk and "client 'c0'" in pk
    assert "one bit (refused or not)" in pk


# -- scale and overflow -----------------------------------------------------------------------------------
def test_scale_is_the_largest_safe_power_of_two():
    assert CKKSSum(value_bound=1.0, max_clients=12).scale == 2.0**44
    assert CKKSSum(value_bound=1.0, max_clients=10).scale == 2.0**45
    assert CKKSSum(value_bound=1.0, max_clients=1000).scale == 2.0**38
    assert CKKSSum(value_bound=1.0, max_clients=12, preset="compat").scale == 2.0**40


def test_refuses_settings_that_could_overflow_naming_the_numbers():
    named = r"max_clients=1000000 x value_bound=1000000.0.*largest safe scale is 2\^"
    with pytest.raises(OverflowRiskError, match=named):
        CKKSSum(value_bound=1e6, max_clients=10**6)
    # a fixed scale one bit above the largest safe one is refused
    base = ckks_preset("compact")
    too_big = CKKSPreset(**{**base.__dict__, "name": "too-big", "scale_bits": 45})
    with pytest.raises(OverflowRiskError, match="scale 2\\^45"):
        too_big.scale_for(value_bound=1.0, max_clients=12)
    assert too_big.__class__ is CKKSPreset


def test_worst_case_inputs_at_max_clients_do_not_wrap():
    """Every client at +value_bound on every coordinate (both reals of each slot): the extreme sum."""
    n, bound = 12, 1.0
    holder = CKKSKeyHolder("compact", value_bound=bound, max_clients=n)
    updates = {f"c{i}": np.full(5000, bound, dtype=np.float64) for i in range(n)}
    updates["c0"][::2] = -bound
    out = holder.decrypt(_round(holder, updates))
    assert np.max(np.abs(out.total - _exact(updates))) <= out.max_abs_error


def test_server_refuses_more_contributions_than_max_clients():
    holder = CKKSKeyHolder("compact", value_bound=1.0, max_clients=2)
    server = HEServer(holder.public_context())
    ctx = holder.client_context(include_secret_key=True)
    for cid in ("a", "b"):
        server.add(cid, CKKSClient(ctx, client_id=cid).encrypt(np.zeros(3)))
    with pytest.raises(OverflowRiskError, match="max_clients=2"):
        server.add("c", CKKSClient(ctx, client_id="c").encrypt(np.zeros(3)))
    with pytest.raises(OverflowRiskError, match="max_clients=2"):
        CKKSSum(value_bound=1.0, max_clients=2).aggregate(
            {k: np.zeros(3) for k in "abc"}, round_index=0, rng=np.random.default_rng(0)
        )


# -- precision ------------------------------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=12),
    d=st.integers(min_value=1, max_value=9000),
    bound=st.sampled_from([1e-3, 0.5, 1.0, 37.0]),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_compact_sum_within_stated_precision(n, d, bound, seed):
    rng = np.random.default_rng(seed)
    updates = {f"c{i:02d}": rng.uniform(-bound, bound, d) for i in range(n)}
    updates["c00"][: min(d, 3)] = bound  # extremes included
    backend = CKKSSum(value_bound=bound, max_clients=12)
    result = backend.aggregate(updates, round_index=0, rng=rng)
    err = np.max(np.abs(result.total - _exact(updates)))
    assert err <= result.max_abs_error == backend.max_abs_error(n)
    if bound <= 1.0:
        assert err <= 1e-4  # the target for updates of magnitude <= 1


@pytest.mark.parametrize("preset", ["compact-pk", "compat"])
def test_public_key_presets_within_stated_precision(preset):
    rng = np.random.default_rng(7)
    updates = {f"c{i}": rng.uniform(-1, 1, 4500) for i in range(10)}
    result = CKKSSum(value_bound=1.0, max_clients=12, preset=preset).aggregate(updates, round_index=0, rng=rng)
    assert np.max(np.abs(result.total - _exact(updates))) <= result.max_abs_error


def test_packing_spans_as_many_ciphertexts_as_needed():
    holder = CKKSKeyHolder("compact", value_bound=1.0, max_clients=3)
    client = CKKSClient(holder.client_context(include_secret_key=True), client_id="a")
    d = 2 * 4096 + 1
    vec = np.linspace(-1, 1, d)
    message = client.encrypt(vec)
    assert len(wire.unpack(message, what="m").blobs) == 3
    server = HEServer(holder.public_context())
    server.add("a", message)
    out = holder.decrypt(server.result()).total
    assert out.shape == (d,)
    assert np.max(np.abs(out - vec)) <= holder.info.error_bound(1)


def test_compact_upload_is_under_eight_bytes_per_parameter():
    holder = CKKSKeyHolder("compact", value_bound=1.0, max_clients=10)
    client = CKKSClient(holder.client_context(include_secret_key=True), client_id="a")
    d = 10 * 4096
    message = client.encrypt(np.random.default_rng(0).uniform(-1, 1, d))
    assert len(message) / d <= 8.0


# -- weighted averaging -------------------------------------------------------------------------------------
def test_weighted_mean_divides_after_decryption_by_the_public_weight_sum():
    rng = np.random.default_rng(3)
    raw = {f"c{i}": rng.uniform(-1, 1, 300) for i in range(4)}
    weights = {"c0": 0.1, "c1": 0.4, "c2": 0.2, "c3": 0.3}
    weighted = {c: weights[c] * v for c, v in raw.items()}
    holder = CKKSKeyHolder("compact", value_bound=1.0, max_clients=4)
    aggregate = _round(holder, weighted, weights)
    out = holder.decrypt(aggregate)
    assert out.weight_sum == pytest.approx(1.0)
    assert out.contributors == ("c0", "c1", "c2", "c3") and out.count == 4
    expected = sum(weights[c] * raw[c] for c in raw) / sum(weights.values())
    assert np.max(np.abs(out.weighted_mean() - expected)) <= out.max_abs_error / out.weight_sum
    with pytest.raises(ValueError, match="weight must be a finite number > 0"):
        CKKSClient(holder.client_context(include_secret_key=True), client_id="x").encrypt(np.zeros(3), weight=0.0)


# -- key handling ---------------------------------------------------------------------------------------------
def _blob(message: bytes, name: str) -> bytes:
    return wire.unpack(message, what="m").named(name)


@pytest.mark.parametrize("preset,blobs", [("compact", ["params"]), ("compact-pk", ["params", "public_key"])])
def test_public_context_never_holds_the_secret_key(preset, blobs):
    holder = CKKSKeyHolder(preset, value_bound=1.0, max_clients=5)
    public = holder.public_context()
    env = wire.unpack(public, what="m")
    assert env.kind == wire.PUBLIC_CONTEXT and env.header["blobs"] == blobs
    assert env.header["has_secret_key"] is False
    secret = _blob(holder.client_context(include_secret_key=True), "secret_key")
    assert secret not in public


def test_compat_public_context_is_a_public_tenseal_context():
    holder = CKKSKeyHolder("compat", value_bound=1.0, max_clients=5)
    context = ts.context_from(_blob(holder.public_context(), "tenseal_context"))
    assert not context.is_private() and context.has_public_key()


def test_secret_key_leaves_only_when_asked_explicitly():
    sym = CKKSKeyHolder("compact", value_bound=1.0, max_clients=5)
    with pytest.raises(TypeError):
        sym.client_context()  # no default: the caller must say it
    with pytest.raises(KeyMaterialError, match="include_secret_key=True"):
        sym.client_context(include_secret_key=False)
    pk = CKKSKeyHolder("compact-pk", value_bound=1.0, max_clients=5)
    public_only = pk.client_context(include_secret_key=False)
    assert "secret_key" not in wire.unpack(public_only, what="m").header["blobs"]
    client = CKKSClient(public_only, client_id="a")
    assert not client.holds_secret_key
    server = HEServer(pk.public_context())
    server.add("a", client.encrypt(np.ones(4)))
    with pytest.raises(KeyMaterialError, match="holds no secret key"):
        client.decrypt(server.result())


def test_symmetric_client_cannot_encrypt_without_the_secret_key():
    holder = CKKSKeyHolder("compact", value_bound=1.0, max_clients=5)
    with pytest.raises(KeyMaterialError, match="lacks"):
        CKKSClient(holder.public_context(), client_id="a")


def test_server_refuses_any_context_holding_a_secret_key():
    holder = CKKSKeyHolder("compact", value_bound=1.0, max_clients=5)
    with pytest.raises(KeyMaterialError, match="holds a secret key"):
        HEServer(holder.client_context(include_secret_key=True))
    with pytest.raises(KeyMaterialError, match="refuses a context that holds a secret key"):
        HEServer(holder)
    # a forged "public" context that smuggles the secret key in
    env = wire.unpack(holder.client_context(include_secret_key=True), what="m")
    forged = wire.pack(wire.PUBLIC_CONTEXT, {**env.header, "has_secret_key": False}, list(env.blobs))
    with pytest.raises(KeyMaterialError, match="holds a secret key"):
        HEServer(forged)
    # a private TenSEAL context, live or serialized inside a "public" envelope
    compat = CKKSKeyHolder("compat", value_bound=1.0, max_clients=5)
    private = compat._engine._ctx
    with pytest.raises(KeyMaterialError):
        HEServer(private)
    env = wire.unpack(compat.client_context(include_secret_key=True), what="m")
    forged = wire.pack(wire.PUBLIC_CONTEXT, {**env.header, "has_secret_key": False}, list(env.blobs))
    with pytest.raises(KeyMaterialError, match="secret key inside its tenseal context"):
        HEServer(forged)


# -- dropouts and key holders ---------------------------------------------------------------------------------
def _updates(n=5, d=40, seed=0):
    rng = np.random.default_rng(seed)
    return {f"c{i}": rng.uniform(-1, 1, d) for i in range(n)}


def test_named_key_holder_silent_before_keys_is_a_dropout_error():
    backend = CKKSSum(value_bound=1.0, max_clients=8, key_holder="c1")
    with pytest.raises(DropoutError, match="'c1' went silent at ADVERTISE_KEYS"):
        backend.aggregate(_updates(), round_index=0, rng=np.random.default_rng(0), dropouts={"c1": Stage.ADVERTISE_KEYS})


def test_symmetric_preset_survives_a_silent_key_holder():
    updates = _updates()
    backend = CKKSSum(value_bound=1.0, max_clients=8, key_holder="c1")
    dropouts = {"c1": Stage.MASKED_INPUT}
    result = backend.aggregate(updates, round_index=0, rng=np.random.default_rng(0), dropouts=dropouts)
    exact = _exact({c: v for c, v in updates.items() if c != "c1"})
    assert result.contributors == ("c0", "c2", "c3", "c4")
    assert np.max(np.abs(result.total - exact)) <= result.max_abs_error


def test_public_key_preset_needs_its_key_holder_to_decrypt():
    backend = CKKSSum(value_bound=1.0, max_clients=8, preset="compact-pk", key_holder="c1")
    with pytest.raises(DropoutError, match="no one else holds the secret key"):
        backend.aggregate(_updates(), round_index=0, rng=np.random.default_rng(0), dropouts={"c1": Stage.UNMASK})
    result = backend.aggregate(_updates(), round_index=0, rng=np.random.default_rng(0), dropouts={"c3": Stage.UNMASK})
    assert result.contributors == ("c0", "c1", "c2", "c3", "c4")


def test_key_holder_outside_the_round_acts_as_key_service():
    updates = _updates()
    result = CKKSSum(value_bound=1.0, max_clients=8, key_holder="silo-9").aggregate(
        updates, round_index=0, rng=np.random.default_rng(0)
    )
    assert np.max(np.abs(result.total - _exact(updates))) <= result.max_abs_error


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="value_bound must be finite and > 0, got -1"):
        CKKSSum(value_bound=-1, max_clients=3)
    with pytest.raises(ValueError, match="max_clients must be >= 1, got 0"):
        CKKSSum(value_bound=1.0, max_clients=0)
    with pytest.raises(TypeError, match="key_holder"):
        CKKSSum(value_bound=1.0, max_clients=3, key_holder=7)
    with pytest.raises(ValueError, match="dropouts names client 'zz'"):
        CKKSSum(value_bound=1.0, max_clients=8).aggregate(
            _updates(), round_index=0, rng=np.random.default_rng(0), dropouts={"zz": Stage.UNMASK}
        )
    with pytest.raises(ValueError, match="'c0'.*above value_bound"):
        CKKSSum(value_bound=0.5, max_clients=8).aggregate(_updates(), round_index=0, rng=np.random.default_rng(0))


# -- bytes on the wire ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup():
    holder = CKKSKeyHolder("compact", value_bound=1.0, max_clients=5)
    ctx = holder.client_context(include_secret_key=True)
    vec = np.linspace(-1, 1, 5000)
    return holder, ctx, CKKSClient(ctx, client_id="a").encrypt(vec), vec


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_tampered_or_truncated_ciphertext_is_a_protocol_error(setup, data):
    holder, _ctx, message, _vec = setup
    server = HEServer(holder.public_context())
    if data.draw(st.booleans()):
        bad = message[: data.draw(st.integers(min_value=0, max_value=len(message) - 1))]
    else:
        pos = data.draw(st.integers(min_value=0, max_value=len(message) - 1))
        bad = message[:pos] + bytes([message[pos] ^ 0x20]) + message[pos + 1 :]
    with pytest.raises(ProtocolError):
        server.add("a", bad)
    assert server.contributors == ()


def test_resealed_garbage_inside_a_valid_envelope_is_a_protocol_error(setup):
    holder, _ctx, message, _vec = setup
    env = wire.unpack(message, what="m")
    blob = bytearray(env.blobs[0])
    blob[16:40] = b"\xff" * 24  # SEAL payload, envelope digest recomputed by the attacker
    forged = wire.pack(wire.CIPHERTEXT, dict(env.header), [bytes(blob), env.blobs[1]])
    with pytest.raises(ProtocolError, match="ciphertext of client 'a'"):
        HEServer(holder.public_context()).add("a", forged)
    cut = wire.pack(wire.CIPHERTEXT, dict(env.header), [env.blobs[0][:-100], env.blobs[1]])
    with pytest.raises(ProtocolError, match="truncated or padded"):
        HEServer(holder.public_context()).add("a", cut)


def test_tampered_contexts_and_aggregates_are_protocol_errors(setup):
    holder, ctx, message, _vec = setup
    public = bytearray(holder.public_context())
    public[20] ^= 1
    with pytest.raises(ProtocolError):
        HEServer(bytes(public))
    with pytest.raises(ProtocolError):
        CKKSClient(ctx[:-1], client_id="a")
    server = HEServer(holder.public_context())
    server.add("a", message)
    aggregate = bytearray(server.result())
    aggregate[len(aggregate) // 2] ^= 4
    with pytest.raises(ProtocolError, match="aggregate"):
        holder.decrypt(bytes(aggregate))


def test_ciphertext_under_another_key_set_is_caught(setup):
    holder, _ctx, message, vec = setup
    other = CKKSKeyHolder("compact", value_bound=1.0, max_clients=5)
    foreign = CKKSClient(other.client_context(include_secret_key=True), client_id="a").encrypt(vec)
    with pytest.raises(ProtocolError, match="key set"):
        HEServer(holder.public_context()).add("a", foreign)
    # relabelled with the right key id, the server cannot tell; decryption under the wrong key can
    env = wire.unpack(foreign, what="m")
    relabelled = wire.pack(wire.CIPHERTEXT, {**env.header, "key_id": holder.key_id}, list(env.blobs))
    server = HEServer(holder.public_context())
    server.add("a", relabelled)
    with pytest.raises(ProtocolError, match="wrong key, or tampered"):
        holder.decrypt(server.result())


def test_swapped_duplicate_and_misdirected_messages_are_refused(setup):
    holder, _ctx, message, _vec = setup
    server = HEServer(holder.public_context())
    with pytest.raises(ProtocolError, match="names client 'a' inside"):
        server.add("b", message)
    server.add("a", message)
    with pytest.raises(ProtocolError, match="already contributed"):
        server.add("a", message)
    with pytest.raises(ProtocolError, match="expected a client ciphertext"):
        server.add("a", holder.public_context())
    with pytest.raises(ProtocolError, match="expected an aggregate"):
        holder.decrypt(message)
    with pytest.raises(DropoutError, match="no client ciphertext"):
        HEServer(holder.public_context()).result()


@pytest.mark.parametrize(
    "client_preset,client_bound,server_preset,field",
    [
        ("compact", 1.0, "compact-pk", "preset"),
        ("compact", 1.0, "compat", "preset"),
        ("compact", 3.0, "compact", "scale"),
    ],
)
def test_mismatched_client_and_server_parameters_are_key_material_errors(client_preset, client_bound, server_preset, field):
    client_holder = CKKSKeyHolder(client_preset, value_bound=client_bound, max_clients=5)
    server_holder = CKKSKeyHolder(server_preset, value_bound=1.0, max_clients=5)
    message = CKKSClient(client_holder.client_context(include_secret_key=True), client_id="a").encrypt(np.ones(10))
    with pytest.raises(KeyMaterialError, match=f"{field}=.*mismatched parameters"):
        HEServer(server_holder.public_context()).add("a", message)


def test_context_whose_parameters_contradict_its_header_is_refused():
    small = CKKSKeyHolder("compact", value_bound=1.0, max_clients=5)
    big = CKKSKeyHolder("compat", value_bound=1.0, max_clients=5)
    env = wire.unpack(small.public_context(), what="m")
    # header claims N=8192 [60,40,40] but fingerprint is the N=4096 one
    forged = wire.pack(
        wire.PUBLIC_CONTEXT, {**env.header, "poly_modulus_degree": 8192, "coeff_mod_bit_sizes": [60, 40, 40]}, list(env.blobs)
    )
    with pytest.raises(KeyMaterialError, match="fingerprint"):
        HEServer(forged)
    # header and fingerprint say compact, but the SEAL parameter blob is another parameter set
    other = secagg._he_seal.SealEngine.generate(
        secagg._he_seal.SealSpec(scheme="ckks", poly_modulus_degree=8192, coeff_mod_bit_sizes=(60, 40, 40)),
        scale=2.0**40,
    ).export(secret_key=False, public_key=False)["params"]
    forged = wire.pack(wire.PUBLIC_CONTEXT, dict(env.header), [other])
    with pytest.raises(KeyMaterialError, match="differ from the preset"):
        HEServer(forged)
    assert big.info.poly_modulus_degree == 8192


def test_client_decrypts_in_symmetric_preset_and_bounds_are_consistent():
    holder = CKKSKeyHolder("compact", value_bound=2.0, max_clients=7)
    updates = _updates(n=3, d=100)
    aggregate = _round(holder, updates)
    client = CKKSClient(holder.client_context(include_secret_key=True), client_id="c0")
    mine, theirs = client.decrypt(aggregate), holder.decrypt(aggregate)
    assert np.max(np.abs(mine.total - theirs.total)) == 0.0
    assert theirs.max_abs_error == pytest.approx(
        ckks_preset("compact").max_abs_error(scale=holder.scale, num_clients=3, value_bound=2.0, max_clients=7)
    )
    assert math.log2(holder.scale) == int(math.log2(holder.scale))


def test_serialization_scratch_file_is_not_shared_with_a_forked_child():
    """SEAL's bytes go through an in-memory file; a process that inherited it opens its own."""
    scratch = secagg._he_seal._SCRATCH
    holder = CKKSKeyHolder("compact", value_bound=1.0, max_clients=2)
    holder.public_context()
    old_fd = scratch.fd
    scratch.pid = -1  # as seen from a forked child
    try:
        message = CKKSClient(holder.client_context(include_secret_key=True), client_id="a").encrypt(np.ones(3))
        assert scratch.pid == os.getpid() and scratch.fd != old_fd
        server = HEServer(holder.public_context())
        server.add("a", message)
        assert np.allclose(holder.decrypt(server.result()).total, 1.0)
    finally:
        os.close(old_fd)
