"""BFV: exact integer sums of quantized vectors, and the client count each preset supports."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg import BFV_PRESETS, BFVSum, KeyMaterialError, OverflowRiskError, ProtocolError, Stage, bfv_preset
from secagg import _he_wire as wire
from secagg.bfv import BFVClient, BFVEncoder, BFVKeyHolder, BFVPreset
from secagg.ckks import HEServer

# t is a 20-bit prime: (t - 1) / 2 // (2**15 - 1) = 15 clients at quant_bits=16 (range-limited)
NARROW = BFVPreset(name="narrow", poly_modulus_degree=4096, coeff_mod_bit_sizes=(60,), plain_modulus_bits=20, summary="test")
# q is a 32-bit prime: floor(q / (4 t) / 22) = 47 clients (noise-limited) at quant_bits=4
NOISY = BFVPreset(name="noisy", poly_modulus_degree=4096, coeff_mod_bit_sizes=(32,), plain_modulus_bits=20, summary="test")


def _round(holder, updates, seeds):
    server = HEServer(holder.public_context())
    ctx = holder.client_context(include_secret_key=True)
    for cid, vec in updates.items():
        server.add(cid, BFVClient(ctx, client_id=cid).encrypt(vec, rng=np.random.default_rng(seeds[cid])))
    return holder.decrypt(server.result())


def test_preset_and_encoder_state_their_limits():
    preset = bfv_preset("bfv")
    assert preset is BFV_PRESETS["bfv"]
    assert (preset.poly_modulus_degree, preset.coeff_mod_bit_sizes, preset.plain_modulus_bits) == (4096, (60,), 40)
    assert preset.plain_modulus % (2 * 4096) == 1  # batching prime
    enc = BFVEncoder("bfv", value_bound=1.0, quant_bits=20)
    assert enc.levels == 2**19 - 1 and enc.step == pytest.approx(1.0 / (2**19 - 1))
    assert enc.max_clients == min(enc.range_client_limit, preset.noise_client_limit) == 11915
    assert BFVEncoder(NARROW, value_bound=1.0, quant_bits=16).max_clients == 15
    assert BFVEncoder(NOISY, value_bound=1.0, quant_bits=4).max_clients == 47


def test_refuses_more_clients_than_supported_naming_the_numbers():
    with pytest.raises(OverflowRiskError, match=r"supports at most 15 clients.*got max_clients=16"):
        BFVSum(value_bound=1.0, max_clients=16, preset=NARROW, quant_bits=16)
    with pytest.raises(OverflowRiskError, match="supports at most 11915"):
        BFVKeyHolder(value_bound=1.0, max_clients=11916)
    with pytest.raises(ValueError, match=r"quant_bits must be in \[2, 39\]"):
        BFVEncoder(value_bound=1.0, quant_bits=40)


def test_largest_supported_count_at_the_extremes_is_exact():
    """15 clients all at +value_bound: the integer sum is 15 * levels, with no wrap-around."""
    holder = BFVKeyHolder(NARROW, value_bound=1.0, max_clients=15, quant_bits=16)
    updates = {f"c{i:02d}": np.ones(50) for i in range(15)}
    updates["c00"][::2] = -1.0
    out = _round(holder, updates, {c: 0 for c in updates})
    levels = 2**15 - 1
    expected = np.full(50, 15 * levels)
    expected[::2] -= 2 * levels
    assert np.array_equal(out.integer_total, expected)


def test_noise_limited_count_decrypts_exactly():
    holder = BFVKeyHolder(NOISY, value_bound=1.0, max_clients=47, quant_bits=4)
    ctx = holder.client_context(include_secret_key=True)
    server = HEServer(holder.public_context())
    rng = np.random.default_rng(5)
    ints = rng.integers(-7, 8, size=(47, 100))
    for i, row in enumerate(ints):
        server.add(f"c{i}", BFVClient(ctx, client_id=f"c{i}").encrypt(row / 7.0, rng=rng))
    out = holder.decrypt(server.result())
    assert np.array_equal(out.integer_total, ints.sum(axis=0))
    with pytest.raises(OverflowRiskError, match="noise allows 47"):
        BFVKeyHolder(NOISY, value_bound=1.0, max_clients=48, quant_bits=4)


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=12),
    d=st.integers(min_value=1, max_value=5000),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_integer_sum_is_exact_and_float_sum_within_quantization(n, d, seed):
    rng = np.random.default_rng(seed)
    updates = {f"c{i:02d}": rng.uniform(-1, 1, d) for i in range(n)}
    seeds = {c: seed + i for i, c in enumerate(updates)}
    holder = BFVKeyHolder(value_bound=1.0, max_clients=12)
    out = _round(holder, updates, seeds)
    encoder = BFVEncoder(value_bound=1.0)
    quantized = sum(encoder.encode(v, rng=np.random.default_rng(seeds[c])) for c, v in updates.items())
    assert np.array_equal(out.integer_total, quantized)
    exact = np.sum(list(updates.values()), axis=0)
    assert np.max(np.abs(out.total - exact)) <= out.max_abs_error == encoder.max_abs_error(n)


def test_stochastic_rounding_is_unbiased():
    encoder = BFVEncoder(value_bound=1.0, quant_bits=4)  # step 1/7
    x = np.full(200_000, 0.3)
    q = encoder.encode(x, rng=np.random.default_rng(0))
    assert set(np.unique(q)) == {2, 3}
    assert abs(encoder.decode(q).mean() - 0.3) < 3e-3


def test_bfv_refuses_tampering_and_ckks_contexts():
    holder = BFVKeyHolder(value_bound=1.0, max_clients=3)
    client = BFVClient(holder.client_context(include_secret_key=True), client_id="a")
    message = bytearray(client.encrypt(np.zeros(10), rng=np.random.default_rng(0)))
    message[100] ^= 1
    with pytest.raises(ProtocolError):
        HEServer(holder.public_context()).add("a", bytes(message))
    from secagg.ckks import CKKSKeyHolder

    ckks = CKKSKeyHolder(value_bound=1.0, max_clients=3)
    with pytest.raises(KeyMaterialError, match="ckks context"):
        BFVClient(ckks.client_context(include_secret_key=True), client_id="a")
    env = wire.unpack(holder.public_context(), what="m")
    assert env.header["blobs"] == ["params"] and env.header["has_secret_key"] is False


def test_bfvsum_describe_and_rng_requirement():
    backend = BFVSum(value_bound=2.0, max_clients=10, quant_bits=18)
    desc = backend.describe()
    assert desc["mode"] == "bfv"
    assert desc["max_clients_supported"] == BFVEncoder(value_bound=2.0, quant_bits=18).max_clients
    assert desc["step"] == pytest.approx(2.0 / (2**17 - 1))
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        backend.aggregate({"a": np.zeros(3)}, round_index=0, rng=None)


@settings(max_examples=10, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=8),
    d=st.integers(min_value=1, max_value=5000),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    dropped=st.sets(st.integers(min_value=0, max_value=7), max_size=3),
    stage=st.sampled_from(list(Stage)),
)
def test_sessions_release_the_exact_integer_sum_of_the_contributors(n, d, seed, dropped, stage):
    """Through the parties' sessions: each client quantizes with its own child generator, and the
    released sum is exactly the sum of the contributors' quantized integers, times the step."""
    rng = np.random.default_rng(seed)
    updates = {f"c{i}": rng.uniform(-1, 1, d) for i in range(n)}
    dropouts = {f"c{i}": stage for i in dropped if i < n}
    backend = BFVSum(value_bound=1.0, max_clients=8)
    result = backend.aggregate(updates, round_index=3, rng=np.random.default_rng(seed), dropouts=dropouts)
    encoder = BFVEncoder(value_bound=1.0)
    children = dict(zip(sorted(updates), np.random.default_rng(seed).spawn(n)))
    counted = [c for c in sorted(updates) if c not in dropouts or stage > Stage.MASKED_INPUT]  # its ciphertext was sent
    quantized = sum((encoder.encode(updates[c], rng=children[c]) for c in counted), np.zeros(d, dtype=np.int64))
    assert result.contributors == tuple(counted)
    assert np.array_equal(result.total, encoder.decode(quantized))
