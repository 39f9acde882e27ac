"""Accountants: known answers with provenance, cross-accountant agreement, Skellam / DDG bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dp
from dp._accounting import (
    RDP_ORDERS,
    _curve,
    _groups,
    discrete_gaussian_rdp,
    poisson_subsampled_rdp,
    prv_bounds,
    skellam_rdp,
)


def gauss(z: float, q: float, count: int, *, round_index: int = 0) -> dp.GaussianEvent:
    return dp.GaussianEvent(
        round_index=round_index,
        noise_multiplier=z,
        clip_bound=1.0,
        sample_rate=q,
        participants=10,
        survivors=10,
        count=count,
    )


# ------------------------------------------------------------------ known answers


def test_rdp_known_answer_from_opacus():
    # opacus/tests/accountants_test.py::test_rdp_accountant: sigma 1.5, q 0.04, 90 epochs
    # (int(90 / 0.04) = 2250 steps), delta 1e-5 -> epsilon 7.32911117143.
    ev = gauss(1.5, 0.04, int(90 / 0.04))
    assert dp.epsilon([ev], delta=1e-5, accountant="rdp") == pytest.approx(7.32911117143, abs=1e-9)
    # the PLD headline of the same history is tighter than the pinned RDP value, never above it
    assert 6.7 < dp.epsilon([ev], delta=1e-5) <= 7.32911117143


def test_rdp_known_answer_holds_step_by_step_and_as_sample_level_event():
    # The same history recorded as 2250 one-step events, or as one DP-SGD event of a client.
    events = [gauss(1.5, 0.04, 1, round_index=r) for r in range(2250)]
    assert dp.epsilon(events, delta=1e-5, accountant="rdp") == pytest.approx(7.32911117143, abs=1e-9)
    sl = dp.SampleLevelEvent(client_id="c1", round_index=0, noise_multiplier=1.5, max_grad_norm=1.0, sample_rate=0.04, steps=2250)
    assert dp.sample_level_epsilons([sl], delta=1e-5, accountant="rdp") == {"c1": pytest.approx(7.32911117143, abs=1e-9)}
    assert dp.sample_level_epsilons([sl], delta=1e-5) == {"c1": dp.epsilon(events, delta=1e-5)}


def test_prv_known_answer_from_opacus():
    # opacus/tests/accountants_test.py::test_prv_accountant: sigma 1.5, q 0.04,
    # int(90 // 0.04) = 2249 steps, delta 1e-5, eps_error 0.01 -> 6.777395712150674.
    groups = _groups([gauss(1.5, 0.04, int(90 // 0.04))])
    lower, estimate, upper = prv_bounds(groups, 1e-5, eps_error=0.01)
    assert upper == pytest.approx(6.777395712150674, abs=1e-7)
    assert lower <= estimate <= upper
    assert dp.epsilon([gauss(1.5, 0.04, 2249)], delta=1e-5, accountant="prv") == pytest.approx(upper, abs=1e-9)


# ------------------------------------------------------------------ cross-accountant agreement

# The DP-SGD / DP-FedAvg regime: at least 10 passes over the data (n * q >= 10).
GRID = [(z, q, n) for z in (0.9, 3.0) for q, n in ((0.01, 1000), (0.1, 100), (0.1, 1000))]


@pytest.mark.parametrize("z,q,n", GRID)
def test_accountants_agree_and_never_under_report(z, q, n):
    events = [gauss(z, q, n)]
    rdp = dp.epsilon(events, delta=1e-5, accountant="rdp")
    prv = dp.epsilon(events, delta=1e-5, accountant="prv")
    pld = dp.epsilon(events, delta=1e-5, accountant="pld")
    tight = dp.epsilon(events, delta=1e-5, accountant="tightest")
    lower, estimate, upper = prv_bounds(_groups(events), 1e-5, eps_error=0.003 * rdp)
    # all are upper bounds, so none may fall below PRV's certified lower bound
    assert rdp >= lower and prv >= lower and pld >= lower
    # PRV reports the upper end of its error interval, within 2% of its estimate
    assert estimate <= prv <= 1.02 * estimate
    # the accountants agree within tolerance on this grid (RDP is the looser one)
    assert pld <= rdp <= 1.3 * pld and prv <= rdp
    assert pld <= 1.003 * estimate
    assert tight == min(rdp, prv, pld)


def test_composition_order_and_grouping_do_not_matter():
    a = [gauss(1.0, 0.05, 30), gauss(2.0, 0.1, 20), gauss(1.0, 0.05, 10)]
    b = [gauss(2.0, 0.1, 20), gauss(1.0, 0.05, 40)]
    for acc in ("pld", "rdp", "prv"):
        assert dp.epsilon(a, delta=1e-6, accountant=acc) == pytest.approx(dp.epsilon(b, delta=1e-6, accountant=acc))


def test_epsilon_grows_with_rounds_and_is_zero_when_empty():
    assert dp.epsilon([], delta=1e-5) == 0.0
    assert dp.epsilon(dp.Ledger(), delta=1e-5, accountant="tightest") == 0.0
    eps = [dp.epsilon([gauss(1.1, 0.1, n)], delta=1e-5) for n in (1, 10, 100)]
    assert eps[0] < eps[1] < eps[2]


def test_client_and_sample_levels_are_accounted_separately():
    sl = dp.SampleLevelEvent(client_id="a", round_index=0, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, steps=50)
    g = gauss(1.0, 0.1, 50)
    assert dp.epsilon([sl, g], delta=1e-5) == pytest.approx(dp.epsilon([g], delta=1e-5))
    per = dp.sample_level_epsilons([sl, g, sl], delta=1e-5)
    assert list(per) == ["a"]
    assert per["a"] == pytest.approx(dp.epsilon([gauss(1.0, 0.1, 100)], delta=1e-5))


def test_epsilon_by_accountant_marks_prv_not_applicable_for_skellam():
    noise = dp.SkellamNoise(noise_multiplier=1.0, clip_bound=1.0, dim=100, min_clients=5)
    ev = noise.event(round_index=0, scale=100.0, participants=5, survivors=5)
    out = dp.epsilon_by_accountant([ev], delta=1e-5)
    assert out["prv"] is None and out["pld"] is None and out["rdp"] == out["tightest"] and out["rdp"] > 0
    with pytest.raises(dp.AccountingError, match="Gaussian mechanisms only"):
        dp.epsilon([ev], delta=1e-5, accountant="prv")
    # the default headline ("pld") accounts this history with the Skellam RDP bound, and says so
    assert dp.epsilon([ev], delta=1e-5) == out["rdp"]
    assert dp.accountant_used([ev], accountant="pld") == "rdp"
    assert dp.accountant_used([gauss(1.0, 0.1, 3)], accountant="pld") == "pld"


# ------------------------------------------------------------------ Skellam and discrete Gaussian


def test_skellam_rdp_formula_known_values():
    # Agarwal, Kairouz, Liu (NeurIPS 2021) Cor. 3.6 evaluated by hand:
    # a=2, D1=3, D2=2, mu=8: 2*4/16 + min((3*4 + 18)/256, 9/16) = 0.5 + 30/256
    assert skellam_rdp(2, l1_sensitivity=3, l2_sensitivity=2, variance=8) == pytest.approx(0.5 + 30 / 256)
    # a=10, D1=100, D2=10, mu=50: 10*100/100 + min((19*100+600)/10000, 300/100) = 10 + 0.25
    assert skellam_rdp(10, l1_sensitivity=100, l2_sensitivity=10, variance=50) == pytest.approx(10.25)


def test_skellam_approaches_gaussian_for_large_variance():
    # With q = 1 the Gaussian RDP is exactly a / (2 z^2); Skellam's bound tends to it from above.
    z, rounds = 1.2, 20
    d2 = 1000.0
    ev = dp.SkellamEvent(
        round_index=0,
        scale=1.0,
        clip_bound=d2,
        dim=10_000,
        l2_sensitivity=d2,
        l1_sensitivity=d2 * 100,
        per_client_variance=(z * d2) ** 2,
        min_clients=1,
        target_noise_multiplier=z,
        participants=1,
        survivors=1,
        count=rounds,
    )
    key = _groups([ev]).most_common(1)[0][0]
    curve = np.asarray(_curve(key))
    ints = np.array([float(a).is_integer() for a in RDP_ORDERS])
    exact = np.asarray(RDP_ORDERS)[ints] / (2 * z * z)
    assert np.all(curve[ints] >= exact) and np.all(curve[ints] <= exact * 1.001)
    # in (epsilon, delta) the gap also includes rounding fractional orders up to integers
    sk = dp.epsilon([ev], delta=1e-5, accountant="rdp")
    ga = dp.epsilon([gauss(z, 1.0, rounds)], delta=1e-5, accountant="rdp")
    assert ga <= sk <= 1.03 * ga


def test_skellam_sum_uses_the_noise_of_the_survivors():
    noise = dp.SkellamNoise(noise_multiplier=1.0, clip_bound=1.0, dim=1000, min_clients=8)
    full = noise.event(round_index=0, scale=500.0, participants=10, survivors=10)
    sized = noise.event(round_index=0, scale=500.0, participants=10, survivors=8)
    short = noise.event(round_index=0, scale=500.0, participants=10, survivors=4)
    assert sized.noise_multiplier == pytest.approx(1.0)
    assert full.noise_multiplier == pytest.approx(math.sqrt(10 / 8))
    assert short.noise_multiplier == pytest.approx(math.sqrt(4 / 8))
    e = [dp.epsilon([ev], delta=1e-5) for ev in (full, sized, short)]
    assert e[0] < e[1] < e[2]


def test_discrete_gaussian_single_client_is_pure_gaussian_rdp():
    # n = 1: tau = 0, Prop. 14 reduces to the discrete Gaussian's a D2^2 / (2 sigma^2) (CKS20).
    for a in (2, 5, 32):
        v = discrete_gaussian_rdp(a, l1_sensitivity=40, l2_sensitivity=10, local_stddev=12, num_clients=1, dim=100)
        assert v == pytest.approx(a * 100 / (2 * 144))


def test_discrete_gaussian_tau_penalises_small_local_noise():
    base = dict(l1_sensitivity=10.0, l2_sensitivity=3.0, dim=1000)
    # same total variance n * sigma^2 = 36, split over more clients with tiny local sigma
    big = discrete_gaussian_rdp(4, local_stddev=6.0, num_clients=1, **base)
    small = discrete_gaussian_rdp(4, local_stddev=0.2, num_clients=900, **base)
    assert small > big


@settings(max_examples=25, deadline=None)
@given(z=st.floats(0.5, 4.0), q=st.floats(0.005, 0.5), order=st.integers(2, 40))
def test_general_subsampling_bound_upper_bounds_exact_gaussian(z, q, order):
    # Zhu & Wang Thm. 5 applied to the Gaussian's RDP must not fall below Opacus's tight
    # subsampled-Gaussian RDP (Mironov et al. 2019) at the same integer order.
    from opacus.accountants.analysis.rdp import compute_rdp

    eps_at = np.full(order + 1, np.inf)
    eps_at[2:] = np.arange(2, order + 1) / (2 * z * z)
    bound = poisson_subsampled_rdp(eps_at, order, q=q)
    exact = float(compute_rdp(q=q, noise_multiplier=z, steps=1, orders=[float(order)])[0])
    assert bound >= exact * (1 - 1e-9)
    assert bound <= order / (2 * z * z) + 1e-12


def test_subsampling_amplifies_skellam():
    noise = dp.SkellamNoise(noise_multiplier=1.0, clip_bound=1.0, dim=100, min_clients=5)
    full = noise.event(round_index=0, scale=200.0, participants=5, survivors=5, sample_rate=1.0, sampling="full")
    sampled = noise.event(round_index=0, scale=200.0, participants=5, survivors=5, sample_rate=0.05)
    assert dp.epsilon([sampled] * 50, delta=1e-5) < dp.epsilon([full] * 50, delta=1e-5)
    curve = np.asarray(_curve(_groups([sampled]).most_common(1)[0][0]))
    assert curve.shape == (len(RDP_ORDERS),) and np.all(curve >= 0)


# ------------------------------------------------------------------ bad parameters


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(delta=0.0), r"delta must be in \(0, 1\), got 0.0"),
        (dict(delta=1.0), r"delta must be in \(0, 1\), got 1.0"),
        (dict(delta=1e-5, accountant="gdp"), r"accountant must be one of \('pld', 'rdp', 'prv', 'tightest'\), got 'gdp'"),
    ],
)
def test_bad_accounting_parameters_are_refused(kwargs, match):
    with pytest.raises(dp.DPValueError, match=match):
        dp.epsilon([gauss(1.0, 0.1, 1)], **kwargs)


def test_prv_is_not_run_on_meaningless_histories():
    ev = gauss(0.3, 1.0, 1000)  # RDP epsilon in the thousands
    with pytest.raises(dp.AccountingError, match="accountant 'prv' is not run when RDP already gives epsilon="):
        dp.epsilon([ev], delta=1e-5, accountant="prv")
    assert dp.epsilon([ev], delta=1e-5, accountant="tightest") == dp.epsilon([ev], delta=1e-5) > 500


def test_non_events_are_refused():
    with pytest.raises(dp.DPTypeError, match="every item must be a dp event, got dict"):
        dp.epsilon([{"mechanism": "gaussian"}], delta=1e-5)
    with pytest.raises(dp.DPTypeError, match="must be a Ledger or an iterable of events, got str"):
        dp.epsilon("ledger", delta=1e-5)


# ------------------------------------------------------------------ PLD headline against independent computations


def _dp_accounting_pld(z: float, q: float, n: int, delta: float) -> float:
    """dp_accounting's own PLD accountant, built directly from its DpEvents (default discretization 1e-4)."""
    import dp_accounting

    event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), n)
    return dp_accounting.pld.PLDAccountant().compose(event).get_epsilon(delta)


def _dp_accounting_rdp(z: float, q: float, n: int, delta: float) -> float:
    import dp_accounting

    event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), n)
    return dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(delta)


def _exact_gaussian_epsilon(mu: float, delta: float) -> float:
    """The exact epsilon of mu-GDP (Dong, Roth, Su 2022, Cor. 2.13): delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    from scipy import optimize, stats

    def gap(eps: float) -> float:
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta

    return float(optimize.brentq(gap, 0.0, mu * mu + 10 * mu + 10, xtol=1e-12))


@pytest.mark.parametrize("z,q,n", [(1.5, 0.04, 2250), (1.1, 0.2, 200), (3.0, 0.01, 1000), (0.8, 0.5, 30)])
def test_pld_headline_matches_dp_accounting_and_is_below_rdp(z, q, n):
    ours = dp.epsilon([gauss(z, q, n)], delta=1e-5)
    theirs = _dp_accounting_pld(z, q, n, 1e-5)
    assert ours == pytest.approx(theirs, rel=1e-3)
    # both RDP figures (Opacus's orders in ours, dp_accounting's own) are looser valid bounds
    assert ours <= dp.epsilon([gauss(z, q, n)], delta=1e-5, accountant="rdp")
    assert ours <= _dp_accounting_rdp(z, q, n, 1e-5)


@settings(max_examples=12, deadline=None)
@given(z=st.floats(0.8, 20.0), n=st.integers(1, 200), delta=st.sampled_from([1e-3, 1e-5, 1e-7]))
def test_pld_headline_is_never_below_the_exact_gaussian_epsilon(z, n, delta):
    # Without sampling, n Gaussian rounds are exactly sqrt(n)/z-GDP: an independent closed form.
    exact = _exact_gaussian_epsilon(math.sqrt(n) / z, delta)
    ours = dp.epsilon([gauss(z, 1.0, n)], delta=delta)
    assert exact * (1 - 1e-9) - 1e-9 <= ours <= exact * 1.001 + 1e-6


@settings(max_examples=8, deadline=None)
@given(z1=st.floats(0.8, 8.0), n1=st.integers(1, 60), z2=st.floats(0.8, 8.0), n2=st.integers(1, 60))
def test_unsampled_rounds_at_several_noise_levels_compose_to_the_exact_gaussian(z1, n1, z2, n2):
    # Rounds without sampling at different noise compose to one Gaussian (mu^2 = sum n / z^2);
    # beside a sampled group they agree with dp_accounting's own PLD composition.
    exact = _exact_gaussian_epsilon(math.sqrt(n1 / z1**2 + n2 / z2**2), 1e-5)
    ours = dp.epsilon([gauss(z1, 1.0, n1), gauss(z2, 1.0, n2, round_index=1)], delta=1e-5)
    assert exact * (1 - 1e-9) - 1e-9 <= ours <= exact * 1.001 + 1e-6
    import dp_accounting

    mixed = [gauss(z1, 1.0, n1), gauss(1.2, 0.1, 50, round_index=1)]
    theirs = (
        dp_accounting.pld.PLDAccountant()
        .compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z1), n1))
        .compose(
            dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.2)), 50)
        )
        .get_epsilon(1e-5)
    )
    assert dp.epsilon(mixed, delta=1e-5) == pytest.approx(theirs, rel=2e-3)


@settings(max_examples=10, deadline=None)
@given(z=st.floats(0.8, 6.0), q=st.floats(0.001, 0.3), n=st.integers(1, 500))
def test_rdp_cross_check_is_never_below_the_pld_headline(z, q, n):
    # Both are upper bounds; PLD is the tight one, so a cross-check below it would mean a bug.
    events = [gauss(z, q, n)]
    pld = dp.epsilon(events, delta=1e-5)
    rdp = dp.epsilon(events, delta=1e-5, accountant="rdp")
    assert pld <= rdp * (1 + 1e-9)


def test_fixed_size_sampling_is_accounted_as_poisson_at_the_same_rate():
    poisson = dp.epsilon([gauss(1.0, 0.1, 50)], delta=1e-5)
    fixed = dp.GaussianEvent(
        round_index=0,
        noise_multiplier=1.0,
        clip_bound=1.0,
        sample_rate=0.1,
        participants=10,
        survivors=10,
        count=50,
        sampling="fixed_size",
    )
    assert dp.epsilon([fixed], delta=1e-5) == poisson


# ------------------------------------------------------------------ adaptive clipping: count and update noise are one mechanism


def quantile(r: int, z: float, q: float) -> dp.QuantileEvent:
    return dp.QuantileEvent(
        round_index=r,
        noise_multiplier=z,
        sample_rate=q,
        participants=10,
        survivors=10,
        target_quantile=0.5,
        learning_rate=0.2,
        bound_before=1.0,
        bound_after=1.0,
    )


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_adaptive_clip_count_is_joined_with_its_rounds_update_noise(accountant):
    z, zb, q, rounds = 1.0, 4.0, 0.1, 30
    joined = [e for r in range(rounds) for e in (gauss(z, q, 1, round_index=r), quantile(r, zb, q))]
    z_eff = dp.effective_noise_multiplier(z, zb)
    assert z_eff == pytest.approx((z**-2 + zb**-2) ** -0.5)
    same = dp.epsilon([gauss(z_eff, q, rounds)], delta=1e-5, accountant=accountant)
    assert dp.epsilon(joined, delta=1e-5, accountant=accountant) == pytest.approx(same, rel=1e-9)
    # composing the two as independent mechanisms would under-report: they share the sampled clients
    independent = dp.epsilon([gauss(z, q, rounds), gauss(zb, q, rounds)], delta=1e-5, accountant=accountant)
    assert independent < same


def test_adaptive_clip_count_joined_with_skellam_costs_more_than_skellam_alone():
    noise = dp.SkellamNoise(noise_multiplier=1.0, clip_bound=1.0, dim=100, min_clients=5)
    sk = [noise.event(round_index=r, scale=200.0, participants=5, survivors=5, sample_rate=0.2) for r in range(10)]
    counts = [quantile(r, 5.0, 0.2) for r in range(10)]
    alone = dp.epsilon(sk, delta=1e-5)
    both = dp.epsilon(sk + counts, delta=1e-5)
    assert alone < both < dp.epsilon(sk, delta=1e-5) + dp.epsilon(counts, delta=1e-5, accountant="rdp")


def test_unpairable_adaptive_clip_counts_are_refused():
    with pytest.raises(dp.AccountingError, match="round 0 holds more than one client-level update-noise event"):
        dp.epsilon([gauss(1.0, 0.1, 1), gauss(2.0, 0.1, 1), quantile(0, 4.0, 0.1)], delta=1e-5)
    with pytest.raises(dp.AccountingError, match=r"round 0: the adaptive-clipping count \(sample_rate \[0.2\]\) must share"):
        dp.epsilon([gauss(1.0, 0.1, 1), quantile(0, 4.0, 0.2)], delta=1e-5)
    with pytest.raises(dp.DPValueError, match="noise_multiplier must be > 0, got 0.0"):
        dp.effective_noise_multiplier(1.0, 0.0)
