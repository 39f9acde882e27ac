"""Calibration from a target (epsilon, delta, steps, sampling rate) to a noise multiplier."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dp


def eps_of(z: float, *, steps: int, q: float, delta: float, accountant: str = "pld") -> float:
    ev = dp.GaussianEvent(
        round_index=0, noise_multiplier=z, clip_bound=1.0, sample_rate=q, participants=1, survivors=1, count=steps
    )
    return dp.epsilon([ev], delta=delta, accountant=accountant)


@settings(max_examples=12, deadline=None)
@given(
    target=st.floats(0.3, 20.0),
    delta=st.sampled_from([1e-4, 1e-5, 1e-7]),
    steps=st.integers(1, 3000),
    q=st.sampled_from([0.01, 0.2, 1.0]),
    accountant=st.sampled_from(["pld", "pld", "rdp"]),
)
def test_calibrated_noise_never_overshoots_and_is_tight(target, delta, steps, q, accountant):
    z = dp.calibrate_noise_multiplier(target_epsilon=target, delta=delta, steps=steps, sample_rate=q, accountant=accountant)
    # charged as the ledger charges it: the same events, the same accountant
    assert eps_of(z, steps=steps, q=q, delta=delta, accountant=accountant) <= target
    # tight: 0.2% less noise would overshoot (the tolerance is 0.1%)
    if z > 2e-4:
        assert eps_of(z * 0.998, steps=steps, q=q, delta=delta, accountant=accountant) > target


def test_calibration_matches_opacus_reference_value():
    # opacus/tests/accountants_test.py::test_get_noise_multiplier_rdp_steps:
    # epsilon 8, delta 1e-5, q 0.04, 2000 steps -> 1.3562 (Opacus stops within 0.01 in epsilon).
    z = dp.calibrate_noise_multiplier(target_epsilon=8.0, delta=1e-5, steps=2000, sample_rate=0.04, accountant="rdp")
    assert z == pytest.approx(1.3562, abs=2e-3)
    assert eps_of(z, steps=2000, q=0.04, delta=1e-5, accountant="rdp") <= 8.0
    # the PLD headline needs less noise for the same target
    assert dp.calibrate_noise_multiplier(target_epsilon=8.0, delta=1e-5, steps=2000, sample_rate=0.04) < z


def test_calibration_with_prv_never_overshoots_prv():
    z = dp.calibrate_noise_multiplier(
        target_epsilon=3.0, delta=1e-5, steps=200, sample_rate=0.05, accountant="prv", rel_tolerance=0.01
    )
    assert eps_of(z, steps=200, q=0.05, delta=1e-5, accountant="prv") <= 3.0
    assert z < dp.calibrate_noise_multiplier(target_epsilon=3.0, delta=1e-5, steps=200, sample_rate=0.05, accountant="rdp")


@pytest.mark.parametrize("cls", [dp.SkellamNoise, dp.DiscreteGaussianNoise])
def test_distributed_noise_is_calibrated_with_the_bound_it_is_charged_with(cls):
    """Issue 18 item 5: calibrated with the Gaussian accountant and charged with Skellam, 10.5 was spent for 8."""
    target, rounds, q, scale = 8.0, 50, 0.1, 2.0**10
    base = cls(noise_multiplier=1.0, clip_bound=1.0, dim=10_000, min_clients=8)

    def charged(noise, survivors: int) -> float:
        events = [
            noise.event(round_index=r, scale=scale, participants=10, survivors=survivors, sample_rate=q) for r in range(rounds)
        ]
        return dp.epsilon(events, delta=1e-5)

    noise = base.calibrated(target_epsilon=target, delta=1e-5, rounds=rounds, scale=scale, sample_rate=q)
    assert isinstance(noise, cls) and noise.min_clients == 8
    assert charged(noise, 8) <= target  # the worst case the noise is sized for: min_clients survive
    assert charged(noise, 10) <= charged(noise, 8)
    less = cls(noise_multiplier=noise.noise_multiplier * 0.998, clip_bound=1.0, dim=10_000, min_clients=8)
    assert charged(less, 8) > target  # and tight
    gaussian = dp.calibrate_noise_multiplier(target_epsilon=target, delta=1e-5, steps=rounds, sample_rate=q)
    assert charged(cls(noise_multiplier=gaussian, clip_bound=1.0, dim=10_000, min_clients=8), 8) > target


def test_distributed_noise_calibration_follows_a_scale_that_depends_on_the_noise():
    calls = []

    def scale_for(noise) -> float:  # the encoder makes room for more noise with a smaller scale
        calls.append(noise.noise_multiplier)
        return 2.0**12 / (1.0 + noise.noise_multiplier)

    base = dp.SkellamNoise(noise_multiplier=1.0, clip_bound=1.0, dim=1000, min_clients=4)
    noise = base.calibrated(target_epsilon=4.0, delta=1e-5, rounds=20, scale=scale_for)
    assert noise.noise_multiplier in calls
    events = [noise.event(round_index=r, scale=scale_for(noise), participants=4, survivors=4) for r in range(20)]
    assert dp.epsilon(events, delta=1e-5) <= 4.0


def test_adaptive_clipping_split_never_overshoots_the_calibrated_effective_noise():
    z_eff = dp.calibrate_noise_multiplier(target_epsilon=5.0, delta=1e-5, steps=40, sample_rate=0.1)
    zb = 10.0
    z = dp.AdaptiveClip.update_noise_multiplier(effective_noise_multiplier=z_eff, count_noise_multiplier=zb)
    assert z > z_eff and dp.effective_noise_multiplier(z, zb) >= z_eff
    clip = dp.AdaptiveClip(initial_bound=1.0, count_noise_multiplier=zb)
    events = []
    for r in range(40):
        events.append(
            dp.CentralGaussian(noise_multiplier=z, clip_bound=clip.bound).event(
                round_index=r, participants=10, survivors=10, sample_rate=0.1
            )
        )
        events.append(clip.plan(round_index=r, participants=10, survivors=10, sample_rate=0.1))
    assert dp.epsilon(events, delta=1e-5) <= 5.0
    with pytest.raises(dp.DPValueError, match=r"count_noise_multiplier must be > effective_noise_multiplier=2.0"):
        dp.AdaptiveClip.update_noise_multiplier(effective_noise_multiplier=2.0, count_noise_multiplier=1.5)


def test_unreachable_target_is_refused():
    # RDP's conversion to (epsilon, delta) cannot reach epsilon 1e-6 at delta 1e-5 (orders <= 256)
    with pytest.raises(dp.DPValueError, match=r"target_epsilon=1e-06 cannot be met"):
        dp.calibrate_noise_multiplier(target_epsilon=1e-6, delta=1e-5, steps=10, sample_rate=1.0, accountant="rdp")


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(target_epsilon=0.0), dp.DPValueError, r"target_epsilon must be > 0, got 0.0"),
        (dict(delta=1.5), dp.DPValueError, r"delta must be in \(0, 1\), got 1.5"),
        (dict(steps=0), dp.DPValueError, r"steps must be >= 1, got 0"),
        (dict(steps=2.5), dp.DPTypeError, r"steps must be an int, got 2.5"),
        (dict(sample_rate=0.0), dp.DPValueError, r"sample_rate must be in \(0, 1\], got 0.0"),
        (dict(accountant="moments"), dp.DPValueError, r"accountant must be one of"),
    ],
)
def test_bad_calibration_parameters_are_refused(kwargs, exc, match):
    args = dict(target_epsilon=2.0, delta=1e-5, steps=10, sample_rate=0.1)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        dp.calibrate_noise_multiplier(**args)
