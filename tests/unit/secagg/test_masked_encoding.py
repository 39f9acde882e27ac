"""Fixed-point encoding into Z_2^b: scale derivation, overflow refusal, exact decoding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg import OverflowRiskError
from secagg.encoding import FixedPointEncoder, pack, unpack


class _FlatNoise:
    """Deterministic stand-in for distributed noise: a fixed headroom in steps per unit scale."""

    def __init__(self, per_scale: float) -> None:
        self.per_scale = per_scale

    def sample(self, size, *, scale, rng):
        return rng.integers(-3, 4, size).astype(np.int64)

    def sum_bound(self, *, scale, num_clients):
        return self.per_scale * scale


def test_scale_is_largest_that_cannot_overflow():
    enc = FixedPointEncoder(value_bound=2.0, max_clients=100, bits=32)
    p = enc.per_client_bound
    assert p == (2**31 - 1) // 100
    assert enc.scale == p / 2.0
    assert 100 * (p + 1) > 2**31 - 1  # one more step per client would not fit


def test_weight_bound_widens_the_accepted_range():
    enc = FixedPointEncoder(value_bound=1.0, max_clients=10, weight_bound=4.0)
    assert enc.value_bound == 4.0
    words = enc.encode(np.array([3.9, -4.0]), rng=np.random.default_rng(0))
    assert np.allclose(enc.decode(words, num_clients=1), [3.9, -4.0], atol=enc.step)


def test_noise_headroom_is_reserved():
    noise = _FlatNoise(per_scale=1e3)
    enc = FixedPointEncoder(value_bound=1.0, max_clients=10, integer_noise=noise)
    limit = 2**31 - 1
    assert enc.noise_headroom == pytest.approx(1e3 * enc.scale, abs=1.0)
    assert 10 * enc.per_client_bound + enc.noise_headroom <= limit
    assert 10 * (enc.per_client_bound + 1) + noise.sum_bound(scale=(enc.per_client_bound + 1), num_clients=10) > limit


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(value_bound=1.0, max_clients=2**31), r"max_clients=2147483648.*2\^31 - 1 = 2147483647"),
        (dict(value_bound=1.0, max_clients=1000, integer_noise=_FlatNoise(per_scale=2**40)), r"max_clients=1000.*noise headroom"),
    ],
)
def test_overflow_refused_naming_the_numbers(kwargs, pattern):
    with pytest.raises(OverflowRiskError, match=pattern):
        FixedPointEncoder(**kwargs)


def test_overflow_refusal_is_a_value_error():
    with pytest.raises(ValueError):
        FixedPointEncoder(value_bound=1.0, max_clients=2**40, bits=32)
    FixedPointEncoder(value_bound=1.0, max_clients=2**40, bits=64)  # fits in 64 bits


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        (dict(value_bound=0.0, max_clients=3), ValueError, r"value_bound must be a finite number > 0, got 0\.0"),
        (dict(value_bound=float("inf"), max_clients=3), ValueError, "value_bound"),
        (dict(value_bound=1.0, max_clients=0), ValueError, r"max_clients must be an int >= 1, got 0"),
        (dict(value_bound=1.0, max_clients=3, bits=16), ValueError, r"bits must be one of \(32, 64\), got 16"),
        (dict(value_bound=1.0, max_clients=3, weight_bound=-1.0), ValueError, "weight_bound"),
        (dict(value_bound="1", max_clients=3), TypeError, "value_bound must be a number"),
    ],
)
def test_bad_parameters(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        FixedPointEncoder(**kwargs)


def test_refuses_values_beyond_the_bound_naming_them():
    enc = FixedPointEncoder(value_bound=1.0, max_clients=4)
    with pytest.raises(ValueError, match=r"c7.*1\.5.*value_bound=1\.0"):
        enc.encode(np.array([0.1, -1.5]), rng=np.random.default_rng(0), who="update of client 'c7'")
    with pytest.raises(ValueError, match="NaN"):
        enc.encode(np.array([np.nan]), rng=np.random.default_rng(0))
    with pytest.raises(TypeError, match="Generator"):
        enc.encode(np.zeros(3), rng=np.random.RandomState(0))


def test_decode_refuses_more_clients_than_sized_for():
    enc = FixedPointEncoder(value_bound=1.0, max_clients=4)
    with pytest.raises(OverflowRiskError, match="5 inputs.*max_clients=4"):
        enc.decode(np.zeros(3, np.uint32), num_clients=5)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 12),
    d=st.integers(1, 40),
    bits=st.sampled_from([32, 64]),
    seed=st.integers(0, 2**32 - 1),
    bound=st.floats(1e-3, 1e3),
)
def test_ring_sum_decodes_within_stated_bound(n, d, bits, seed, bound):
    rng = np.random.default_rng(seed)
    enc = FixedPointEncoder(value_bound=bound, max_clients=n, bits=bits)
    xs = [rng.uniform(-bound, bound, d) for _ in range(n)]
    xs[0][0] = bound  # the extremes must fit too
    if d > 1:
        xs[-1][1] = -bound
    words = [enc.encode(x, rng=np.random.default_rng(seed + i)) for i, x in enumerate(xs)]
    ints = [enc.quantize(x, rng=np.random.default_rng(seed + i)) for i, x in enumerate(xs)]
    # encode is the wrapped quantization, whichever fast path it takes
    assert all(np.array_equal(w, enc.wrap(i)) for w, i in zip(words, ints))
    assert all(np.max(np.abs(i)) <= enc.per_client_bound for i in ints)
    total = words[0].copy()
    for w in words[1:]:
        total += w  # wraps modulo 2^b
    exact = np.sum(xs, axis=0)
    assert np.max(np.abs(enc.decode(total, num_clients=n) - exact)) <= enc.error_bound(n)
    # exact integer arithmetic: the signed reading of the wrapped sum is the integer sum
    int_sum = np.sum([enc.to_signed(w) for w in words], axis=0)
    assert np.array_equal(enc.to_signed(total), int_sum)


def test_stochastic_rounding_is_unbiased():
    enc = FixedPointEncoder(value_bound=1.0, max_clients=2**20)  # coarse steps: about 2^-9
    x = np.full(200_000, (np.floor(0.1 * enc.scale) + 0.3) * enc.step)
    ints = enc.quantize(x, rng=np.random.default_rng(5))
    target = x[0] * enc.scale
    assert abs(target - np.floor(target) - 0.3) < 1e-6
    assert set(np.unique(ints)) == {np.floor(target), np.floor(target) + 1}
    # mean of Bernoulli(frac) over 200k draws: 6 standard errors
    assert abs(ints.mean() - target) < 6 * 0.5 / np.sqrt(x.size)


def test_encoding_is_deterministic_under_the_generator():
    enc = FixedPointEncoder(value_bound=1.0, max_clients=3)
    x = np.linspace(-1, 1, 17)
    a = enc.encode(x, rng=np.random.default_rng(9))
    b = enc.encode(x, rng=np.random.default_rng(9))
    assert np.array_equal(a, b) and a.dtype == np.dtype("<u4")


@pytest.mark.parametrize("bits", [32, 64])
def test_pack_is_b_bits_per_coordinate_and_round_trips(bits):
    words = np.arange(10, dtype="<u4" if bits == 32 else "<u8") * 123456789
    data = pack(words, bits=bits)
    assert len(data) == 10 * bits // 8
    assert np.array_equal(unpack(data, bits=bits, length=10), words)
    with pytest.raises(ValueError, match="expected"):
        unpack(data[:-1], bits=bits, length=10)
