"""Client-level clipping: fixed L2 clipping bounds hold; adaptive clipping tracks a quantile."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import dp

vectors = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64]),
    shape=st.integers(1, 300),
    elements=st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32),
)


@settings(max_examples=80, deadline=None)
@given(vec=vectors, bound=st.floats(1e-3, 1e3))
def test_l2_clip_bound_holds_and_direction_is_kept(vec, bound):
    clipped, norm = dp.L2Clip(bound).clip(vec)
    assert clipped.dtype == vec.dtype and clipped.shape == vec.shape
    assert norm == pytest.approx(float(np.linalg.norm(vec.astype(np.float64))))
    out_norm = float(np.linalg.norm(clipped.astype(np.float64)))
    assert out_norm <= bound  # exactly, in the dtype returned
    if norm <= bound:
        assert np.array_equal(clipped, vec) and clipped is not vec
    else:
        assert out_norm == pytest.approx(bound, rel=1e-5)
        # same direction: clipped is a positive multiple of vec
        v64, c64 = vec.astype(np.float64), clipped.astype(np.float64)
        assert float(v64 @ c64) == pytest.approx(norm * out_norm, rel=1e-4)


def test_zero_vector_is_guarded():
    clipped, norm = dp.L2Clip(1.0).clip(np.zeros(5))
    assert norm == 0.0 and np.array_equal(clipped, np.zeros(5))


def run_adaptive(clip: dp.AdaptiveClip, rng: np.random.Generator, rounds: int, clients: int = 200):
    """Rounds through the two halves: clients clip and send bits, the server noises the sum and updates."""
    events = []
    for r in range(rounds):
        norms = rng.lognormal(mean=0.0, sigma=0.3, size=clients)  # median norm 1.0
        bound = clip.bound  # broadcast with the model
        bits = 0
        for n in norms:
            clipped, bit = dp.AdaptiveClip.client_half(np.array([n, 0.0]), bound=bound)
            assert np.linalg.norm(clipped) <= bound and bit == int(n <= bound)
            bits += bit
        noised = clip.noise_count(bits, rng=rng)
        new, ev = clip.update(noised, expected_clients=clients, participants=clients + 10, survivors=clients, round_index=r)
        assert new == clip.bound and ev.bound_before == bound and ev.bound_after == new
        events.append(ev)
    return events


@pytest.mark.parametrize("target", [0.3, 0.5, 0.8])
def test_adaptive_clip_bound_moves_to_its_target_quantile(target):
    rng = np.random.default_rng(0)
    clip = dp.AdaptiveClip(initial_bound=0.1, target_quantile=target, learning_rate=0.2, count_noise_multiplier=10.0)
    events = run_adaptive(clip, rng, 150)
    # the tracked bound ends near the target quantile of the norms (lognormal, sigma 0.3)
    from scipy import stats

    assert clip.bound == pytest.approx(float(np.exp(0.3 * stats.norm.ppf(target))), rel=0.15)
    # each update is geometric: log-step at most learning_rate * (|b - target| <= 1 + noise)
    steps = np.abs(np.diff(np.log([e.bound_before for e in events] + [clip.bound])))
    assert np.all(steps <= 0.2 * 1.3)
    assert steps[:5].min() > 0.05  # far from the target it moves, towards it
    assert all(isinstance(e, dp.QuantileEvent) and e.noise_multiplier == 10.0 for e in events)
    assert dp.epsilon(dp.Ledger(events), delta=1e-5) > 0  # the count has its own privacy cost


@settings(max_examples=40, deadline=None)
@given(
    bits=st.lists(st.integers(0, 1), min_size=0, max_size=60),
    new_bit=st.integers(0, 1),
    m=st.floats(1.0, 100.0),
    noise_seed=st.integers(0, 2**32 - 1),
)
def test_adding_one_client_moves_the_estimate_by_at_most_what_is_accounted(bits, new_bit, m, noise_seed):
    """The accounting assumes sensitivity COUNT_SENSITIVITY of the count, i.e. 1/(2m) of the estimate,
    with noise of standard deviation noise_multiplier * COUNT_SENSITIVITY: check both on neighbours."""
    clip = dp.AdaptiveClip(initial_bound=1.0, count_noise_multiplier=3.0)
    noise = np.random.default_rng(noise_seed).normal(0.0, clip.count_stddev)  # the same draw for both

    def estimate(bs: list[int]) -> float:
        return clip.estimate(sum(bs) + noise, survivors=len(bs), expected_clients=m)

    moved = abs(estimate(bits + [new_bit]) - estimate(bits))
    assert moved == pytest.approx(dp.AdaptiveClip.COUNT_SENSITIVITY / m)
    ev = clip.plan(round_index=0, participants=len(bits) + 1, survivors=len(bits) + 1)
    assert ev.noise_multiplier * dp.AdaptiveClip.COUNT_SENSITIVITY == pytest.approx(clip.count_stddev)


def test_count_noise_has_the_accounted_standard_deviation():
    clip = dp.AdaptiveClip(initial_bound=1.0, count_noise_multiplier=4.0)
    rng = np.random.default_rng(3)
    draws = np.array([clip.noise_count(10, rng=rng) - 10 for _ in range(20_000)])
    assert draws.std() == pytest.approx(2.0, rel=0.03) and abs(draws.mean()) < 0.05


def test_adaptive_clip_shrinks_when_everyone_is_below():
    clip = dp.AdaptiveClip(initial_bound=2.0, target_quantile=0.5, learning_rate=0.2, count_noise_multiplier=0.01)
    bound, _ = clip.update(50.0, expected_clients=50, participants=50, survivors=50, round_index=0)
    assert bound == pytest.approx(2.0 * np.exp(-0.2 * 0.5), rel=1e-3)
    clipped, norm = clip.clip(np.full(4, 3.0))
    assert np.linalg.norm(clipped) <= bound and norm == pytest.approx(6.0)
    assert clip.below(0.5) == 1 and clip.below(6.0) == 0


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: dp.L2Clip(0.0), dp.DPValueError, r"bound must be > 0, got 0.0"),
        (lambda: dp.L2Clip("1"), dp.DPTypeError, r"bound must be a real number, got '1' \(str\)"),
        (lambda: dp.L2Clip(1.0).clip(np.array([1.0, np.nan])), dp.DPValueError, r"vec must be finite"),
        (
            lambda: dp.L2Clip(1.0).clip(np.ones((2, 2))),
            dp.DPValueError,
            r"vec must be a non-empty 1-D vector, got shape \(2, 2\)",
        ),
        (lambda: dp.L2Clip(1.0).clip([1.0, 2.0]), dp.DPTypeError, r"vec must be a numpy array, got list"),
        (lambda: dp.L2Clip(1.0).clip(np.array([1, 2])), dp.DPTypeError, r"vec must have a float dtype, got int64"),
        (
            lambda: dp.AdaptiveClip(initial_bound=1.0, target_quantile=1.0, count_noise_multiplier=1.0),
            dp.DPValueError,
            r"target_quantile must be in \(0, 1\), got 1.0",
        ),
        (
            lambda: dp.AdaptiveClip(initial_bound=1.0, learning_rate=0.0, count_noise_multiplier=1.0),
            dp.DPValueError,
            r"learning_rate must be > 0, got 0.0",
        ),
        (
            lambda: dp.AdaptiveClip(initial_bound=1.0, count_noise_multiplier=1.0).update(
                1.0, expected_clients=0, participants=3, survivors=3, round_index=0
            ),
            dp.DPValueError,
            r"expected_clients must be > 0, got 0",
        ),
        (
            lambda: dp.AdaptiveClip(initial_bound=1.0, count_noise_multiplier=1.0).noise_count(1.0, rng=np.random.RandomState(0)),
            dp.DPTypeError,
            r"rng must be a numpy.random.Generator, got RandomState",
        ),
        (lambda: dp.AdaptiveClip.client_half(np.ones(3), bound=0.0), dp.DPValueError, r"bound must be > 0, got 0.0"),
    ],
)
def test_bad_clipping_parameters_are_refused(make, exc, match):
    with pytest.raises(exc, match=match):
        make()
