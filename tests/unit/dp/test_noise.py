"""Client-level noise: central Gaussian, distributed Skellam and discrete Gaussian."""

from __future__ import annotations

import inspect
import math
from typing import Protocol, runtime_checkable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dp
from dp._noise import rounded_l1_sensitivity, rounded_l2_sensitivity, sample_discrete_gaussian


@runtime_checkable
class IntegerNoise(Protocol):  # the shape of secagg.IntegerNoise (secagg/base.py), copied, not imported
    def sample(self, size: int, *, scale: float, rng: np.random.Generator) -> np.ndarray: ...

    def sum_bound(self, *, scale: float, num_clients: int) -> float: ...


def variance_ci(samples: np.ndarray, z: float = 5.0) -> tuple[float, float]:
    """A 5-sigma interval for the variance from the sample (uses the sample 4th moment)."""
    n = samples.size
    x = samples - samples.mean()
    v = float(np.mean(x * x))
    se = math.sqrt(max(float(np.mean(x**4)) - v * v, 0.0) / n)
    return v - z * se, v + z * se


@pytest.mark.parametrize("cls", [dp.SkellamNoise, dp.DiscreteGaussianNoise])
def test_distributed_noise_matches_the_secagg_protocol(cls):
    noise = cls(noise_multiplier=1.0, clip_bound=1.0, dim=10, min_clients=3)
    assert isinstance(noise, IntegerNoise)
    for name in ("sample", "sum_bound"):
        ours = inspect.signature(getattr(cls, name))
        theirs = inspect.signature(getattr(IntegerNoise, name))
        assert [(p.name, p.kind) for p in ours.parameters.values()] == [(p.name, p.kind) for p in theirs.parameters.values()]
    out = noise.sample(10, scale=100.0, rng=np.random.default_rng(0))
    assert out.dtype == np.int64 and out.shape == (10,)


def test_skellam_sum_over_survivors_has_the_stated_variance():
    rng = np.random.default_rng(42)
    noise = dp.SkellamNoise(noise_multiplier=0.8, clip_bound=1.0, dim=4000, min_clients=5)
    scale = 30.0
    d2 = noise.l2_sensitivity(scale=scale)
    assert d2 == pytest.approx(30.0 + math.sqrt(4000))
    per_client = noise.per_client_variance(scale=scale)
    assert per_client == pytest.approx((0.8 * d2) ** 2 / 5)
    survivors = 7
    total = sum(noise.sample(4000, scale=scale, rng=rng) for _ in range(survivors))
    lo, hi = variance_ci(total.astype(np.float64))
    ev = noise.event(round_index=0, scale=scale, participants=9, survivors=survivors)
    assert lo <= ev.variance <= hi
    assert ev.variance == pytest.approx(survivors * per_client)
    assert abs(float(total.mean())) < 5 * math.sqrt(ev.variance / 4000)
    assert np.all(np.abs(total) <= noise.sum_bound(scale=scale, num_clients=survivors))
    # sized for min_clients: with exactly that many survivors the sum carries the target noise
    assert noise.event(round_index=0, scale=scale, participants=9, survivors=5).noise_multiplier == pytest.approx(0.8)


def test_discrete_gaussian_sampler_variance_and_symmetry():
    rng = np.random.default_rng(7)
    for sigma in (0.7, 3.0, 250.0):
        x = sample_discrete_gaussian(sigma, 60_000, rng=rng)
        lo, hi = variance_ci(x.astype(np.float64))
        # for sigma >= 1 the discrete Gaussian's variance is sigma^2 to within 1e-8 (CKS20 Fact 19)
        expected = (
            sigma**2
            if sigma >= 1
            else sum(k * k * math.exp(-k * k / (2 * sigma**2)) for k in range(-40, 41))
            / sum(math.exp(-k * k / (2 * sigma**2)) for k in range(-40, 41))
        )
        assert lo <= expected <= hi
        assert abs(float(x.mean())) < 5 * sigma / math.sqrt(x.size)
    noise = dp.DiscreteGaussianNoise(noise_multiplier=1.0, clip_bound=1.0, dim=2000, min_clients=4)
    total = sum(noise.sample(2000, scale=10.0, rng=rng) for _ in range(4))
    lo, hi = variance_ci(total.astype(np.float64))
    assert lo <= noise.event(round_index=0, scale=10.0, participants=4, survivors=4).variance <= hi


def test_central_gaussian_adds_the_stated_noise():
    g = dp.CentralGaussian(noise_multiplier=1.5, clip_bound=0.2)
    total = np.zeros(50_000, dtype=np.float32)
    out = g.add(total, rng=np.random.default_rng(3))
    assert out.dtype == np.float64 and np.all(total == 0)
    lo, hi = variance_ci(out)
    assert lo <= 0.3**2 <= hi
    ev = g.event(round_index=4, participants=10, survivors=9, sample_rate=0.1)
    assert (ev.noise_multiplier, ev.clip_bound, ev.survivors, ev.round_index) == (1.5, 0.2, 9, 4)


@settings(max_examples=40, deadline=None)
@given(
    dim=st.integers(1, 200),
    c=st.floats(0.01, 100.0),
    scale=st.floats(0.5, 1000.0),
    seed=st.integers(0, 2**32 - 1),
    beta=st.sampled_from([0.0, 1e-3]),
)
def test_rounding_inflation_bound_holds(dim, c, scale, seed, beta):
    # Any rounding of a vector of L2 norm <= c (scaled) stays within rounded_l2_sensitivity
    # (c + sqrt(d)); here: stochastic rounding, as the encoder does, and the worst-case floor/ceil.
    rng = np.random.default_rng(seed)
    v = rng.normal(size=dim)
    v = v / np.linalg.norm(v) * c * scale
    floor = np.floor(v)
    stoch = floor + (rng.random(dim) < (v - floor))
    worst = np.where(v >= 0, np.ceil(v), np.floor(v))
    bound = rounded_l2_sensitivity(c * scale, dim=dim, beta=0.0)
    for r in (stoch, worst):
        assert np.linalg.norm(r) <= bound + 1e-9
        assert np.abs(r).sum() <= rounded_l1_sensitivity(bound, dim=dim) + 1e-9
    assert rounded_l2_sensitivity(c * scale, dim=dim, beta=beta) <= bound


def test_short_rounds_are_recorded_with_the_noise_present():
    noise = dp.SkellamNoise(noise_multiplier=1.0, clip_bound=1.0, dim=10, min_clients=8)
    ev = noise.event(round_index=3, scale=64.0, participants=10, survivors=6)
    assert ev.survivors == 6 and ev.noise_multiplier == pytest.approx(math.sqrt(6 / 8))


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (
            lambda: dp.SkellamNoise(noise_multiplier=1.0, clip_bound=1.0, dim=0, min_clients=1),
            dp.DPValueError,
            r"dim must be >= 1, got 0",
        ),
        (
            lambda: dp.SkellamNoise(noise_multiplier=1.0, clip_bound=1.0, dim=4, min_clients=0),
            dp.DPValueError,
            r"min_clients must be >= 1, got 0",
        ),
        (
            lambda: dp.SkellamNoise(noise_multiplier=-1.0, clip_bound=1.0, dim=4, min_clients=1),
            dp.DPValueError,
            r"noise_multiplier must be > 0, got -1.0",
        ),
        (
            lambda: dp.DiscreteGaussianNoise(noise_multiplier=1.0, clip_bound=1.0, dim=4, min_clients=1, beta=1.0),
            dp.DPValueError,
            r"beta must be in \[0, 1\), got 1.0",
        ),
        (
            lambda: dp.SkellamNoise(noise_multiplier=1.0, clip_bound=1.0, dim=4, min_clients=1).sample(
                5, scale=1.0, rng=np.random.default_rng()
            ),
            dp.DPValueError,
            r"size must equal dim=4 \(the noise is sized for it\), got 5",
        ),
        (
            lambda: dp.SkellamNoise(noise_multiplier=1.0, clip_bound=1.0, dim=4, min_clients=1).sample(
                4, scale=0.0, rng=np.random.default_rng()
            ),
            dp.DPValueError,
            r"scale must be > 0, got 0.0",
        ),
        (
            lambda: dp.SkellamNoise(noise_multiplier=1.0, clip_bound=1.0, dim=4, min_clients=1).sample(4, scale=1.0, rng=0),
            dp.DPTypeError,
            r"rng must be a numpy.random.Generator, got int",
        ),
        (
            lambda: dp.SkellamNoise(noise_multiplier=1.0, clip_bound=1.0, dim=4, min_clients=1).event(
                round_index=0, scale=1.0, participants=3, survivors=0
            ),
            dp.DPValueError,
            r"survivors must be >= 1, got 0",
        ),
        (lambda: dp.CentralGaussian(noise_multiplier=1.0, clip_bound=0.0), dp.DPValueError, r"clip_bound must be > 0, got 0.0"),
        (
            lambda: dp.CentralGaussian(noise_multiplier=1.0, clip_bound=1.0).add(np.ones(3), rng=None),
            dp.DPTypeError,
            r"rng must be a numpy.random.Generator, got NoneType",
        ),
    ],
)
def test_bad_noise_parameters_are_refused(make, exc, match):
    with pytest.raises(exc, match=match):
        make()
