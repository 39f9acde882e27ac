"""One-run canary audit (Steinke, Nasr, Jagielski 2023): the bound, its validity, canaries, broken runs."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import tomllib
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import dp
from dp.audit import (
    TESTED_DELTAS,
    AuditResult,
    PrivacyAuditWarning,
    audit_ceiling,
    audit_dp_fedavg,
    audit_dp_sgd,
    audit_scores,
    audited_point,
    default_guess_counts,
    draw_canaries,
    epsilon_lower_bound,
    one_run_p_value,
    run_canary_audit,
)

MAIN_CONFIG = Path(__file__).resolve().parents[3] / "examples" / "main.toml"

# ----------------------------------------------------------------------------- the bound


def test_p_value_without_delta_is_the_binomial_tail():
    q = math.exp(1.0) / (1 + math.exp(1.0))
    assert one_run_p_value(canaries=100, guesses=40, correct=33, epsilon=1.0, delta=0.0) == pytest.approx(
        stats.binom.sf(32, 40, q)
    )
    assert one_run_p_value(canaries=100, guesses=40, correct=0, epsilon=1.0, delta=1e-5) == 1.0


def test_p_value_delta_term_follows_the_theorem():
    """beta + 2 m delta alpha, alpha = max_i P[v > Bin(r, q) >= v - i] / i (computed here by brute force)."""
    m, r, v, eps, delta = 50, 30, 25, 0.7, 1e-3
    q = 1 / (1 + math.exp(-eps))
    pmf = stats.binom.pmf(np.arange(r + 1), r, q)
    beta = pmf[v:].sum()
    alpha = max(pmf[v - i : v].sum() / i for i in range(1, v + 1))
    expected = min(beta + alpha * delta * 2 * m, 1.0)
    assert one_run_p_value(canaries=m, guesses=r, correct=v, epsilon=eps, delta=delta) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("r", [1, 10, 100, 1000])
def test_all_correct_bound_has_a_closed_form(r):
    """With delta = 0 and v = r: q^r = 1 - confidence, so eps = logit((1 - confidence)^(1/r)), floored at 0."""
    q = 0.05 ** (1 / r)
    expected = max(0.0, math.log(q / (1 - q)))
    got = epsilon_lower_bound(canaries=r, guesses=r, correct=r, delta=0.0, confidence=0.95)
    assert got == pytest.approx(expected, abs=1e-5)
    assert epsilon_lower_bound(canaries=r, guesses=r, correct=r, delta=1e-5) <= got + 1e-9


def test_chance_level_guessing_bounds_nothing():
    assert epsilon_lower_bound(canaries=1000, guesses=1000, correct=500, delta=1e-5) == 0.0
    assert epsilon_lower_bound(canaries=10, guesses=0, correct=0, delta=1e-5) == 0.0


@settings(max_examples=30, deadline=None)
@given(m=st.integers(1, 300), data=st.data())
def test_bound_grows_with_correct_guesses_and_shrinks_with_confidence_loss(m, data):
    r = data.draw(st.integers(1, m))
    v = data.draw(st.integers(0, r - 1))
    lower = epsilon_lower_bound(canaries=m, guesses=r, correct=v, delta=1e-5)
    higher = epsilon_lower_bound(canaries=m, guesses=r, correct=v + 1, delta=1e-5)
    assert 0.0 <= lower <= higher
    assert epsilon_lower_bound(canaries=m, guesses=r, correct=v + 1, delta=1e-5, confidence=0.99) <= higher + 1e-9


def test_bound_is_valid_for_randomized_response():
    """An eps-DP mechanism (randomized response on each inclusion bit): the 95% bound exceeds the
    true eps in at most about 5% of 300 independent audits (binomial 99.9% upper limit: 29)."""
    eps_true, m, trials = 1.0, 200, 300
    rng = np.random.default_rng(2024)
    q = 1 / (1 + math.exp(-eps_true))
    exceed = 0
    for _ in range(trials):
        included = rng.random(m) < 0.5
        truthful = rng.random(m) < q
        reported = np.where(truthful, included, ~included)
        scores = reported + 1e-3 * rng.random(m)  # break ties at random
        result = audit_scores(scores, included, delta=0.0, guess_counts=[(m // 2, m - m // 2)])
        exceed += result.epsilon_lower_bound > eps_true
    assert exceed <= stats.binom.ppf(0.999, trials, 0.05)


def test_audit_scores_counts_guesses_from_the_top_and_bottom():
    scores = np.arange(10.0)
    included = np.array([0, 0, 1, 0, 1, 0, 1, 1, 1, 1], dtype=bool)
    res = audit_scores(scores, included, delta=0.0, guess_counts=[(3, 3)])
    # top 3 (scores 9, 8, 7) all included; bottom 3 (0, 1, 2): two excluded
    assert (res.guesses, res.correct, res.positive_guesses, res.negative_guesses) == (6, 5, 3, 3)
    assert res.epsilon_lower_bound == pytest.approx(epsilon_lower_bound(canaries=10, guesses=6, correct=5, delta=0.0))
    two = audit_scores(scores, included, delta=0.0, guess_counts=[(3, 3), (4, 0)])
    assert two.candidates == 2  # significance split in two: each bound is smaller
    assert two.epsilon_lower_bound <= res.epsilon_lower_bound


def test_default_guess_counts_depend_on_m_only():
    assert default_guess_counts(100) == (
        (5, 0),
        (3, 2),
        (10, 0),
        (5, 5),
        (25, 0),
        (13, 12),
        (50, 0),
        (25, 25),
        (100, 0),
        (50, 50),
    )
    assert default_guess_counts(1) == ((1, 0),)


def test_exceeding_the_claim_warns_loudly_and_reports():
    scores = np.r_[np.ones(100), np.zeros(100)]
    included = scores.astype(bool)
    with pytest.warns(PrivacyAuditWarning, match=r"^PRIVACY AUDIT FAILED: audited epsilon lower bound"):
        res = audit_scores(scores, included, delta=1e-5, claimed_epsilon=1.0)
    assert res.exceeds_claim and res.epsilon_lower_bound > 1.0
    data = res.to_dict()
    assert json.loads(json.dumps(data))["exceeds_claim"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        noisy = scores.copy()
        noisy[:15], noisy[-15:] = 0.0, 1.0  # 30 of 200 canaries scored the wrong way
        fine = audit_scores(noisy, included, delta=1e-5, claimed_epsilon=3.0)
        above = audit_scores(scores, included, delta=1e-5, claimed_epsilon=50.0)
    assert not fine.exceeds_claim and "consistent with the claim" in fine.summary()
    # a claim above the ceiling cannot be refuted: the result says so instead of "consistent"
    assert not above.exceeds_claim and not above.conclusive and above.summary().startswith("AUDIT INCONCLUSIVE")
    assert data["ceiling"] == res.ceiling and data["conclusive"] is True


@pytest.mark.parametrize("m", [10, 200, 5000])
def test_ceiling_is_the_bound_with_every_guess_right(m):
    ceiling = audit_ceiling(canaries=m, delta=1e-5)
    best = max(epsilon_lower_bound(canaries=m, guesses=a + b, correct=a + b, delta=1e-5,
                                   confidence=1 - 0.05 / len(default_guess_counts(m)))
               for a, b in default_guess_counts(m))  # fmt: skip
    assert ceiling == pytest.approx(best)
    rng = np.random.default_rng(m)
    included = rng.random(m) < 0.5
    res = audit_scores(rng.standard_normal(m) + 5 * included, included, delta=1e-5)
    assert res.ceiling == pytest.approx(ceiling) and res.epsilon_lower_bound <= ceiling
    # at delta 1e-5 these counts cannot certify the main job's epsilon 8 (issue 18 item 7): audited_point moves the delta
    assert ceiling < 6.0


def _main_job_events() -> list[dp.SampleLevelEvent]:
    """One silo's DP-SGD history at the main job's settings (examples/main.toml, calibrated as it is)."""
    with open(MAIN_CONFIG, "rb") as f:
        cfg = tomllib.load(f)
    privacy, epochs, rounds = cfg["privacy"], cfg["train"]["epochs"], cfg["rounds"]
    assert cfg["train"]["batch_size"] >= 1000 and privacy["unit"] == "user"  # one batch of every user: q = 1
    z = dp.calibrate_noise_multiplier(target_epsilon=privacy["target_epsilon"], delta=privacy["delta"],
                                      steps=epochs * rounds, sample_rate=1.0)  # fmt: skip
    return [
        dp.SampleLevelEvent(
            client_id="silo-0",
            round_index=r,
            noise_multiplier=z,
            max_grad_norm=privacy["max_grad_norm"],
            sample_rate=1.0,
            steps=epochs,
            unit="user",
        )  # fmt: skip
        for r in range(1, rounds + 1)
    ]


@pytest.mark.parametrize("cut", [math.inf, 4.0])
def test_the_audit_flags_a_noise_free_dp_sgd_run_at_the_main_jobs_settings(monkeypatch, cut):
    """The library's DP-SGD with its noise switched off (or cut fourfold), while the ledger claims epsilon 8 at 1e-5.

    At delta 1e-5 even 100,000 canaries barely reach epsilon 8 (ceiling 8.11); the audit tests the
    same privacy curve at the delta where it has power, and there the broken run is refuted.
    """
    events = _main_job_events()
    assert dp.sample_level_epsilons(events, delta=1e-5)["silo-0"] == pytest.approx(8.0, rel=2e-3)
    noise = dp.PrivateTraining._noise
    monkeypatch.setattr(dp.PrivateTraining, "_noise", lambda self, p, std: noise(self, p, std / cut))
    with pytest.warns(PrivacyAuditWarning, match="PRIVACY AUDIT FAILED"):
        broken = audit_dp_sgd(events, seed=1)
    assert broken.exceeds_claim and broken.conclusive and broken.summary().startswith("PRIVACY AUDIT FAILED")
    assert broken.delta < 1e-5 and broken.claimed_epsilon == pytest.approx(
        dp.sample_level_epsilons(events, delta=broken.delta)["silo-0"]
    )
    if cut == math.inf:
        assert broken.correct == broken.guesses  # a run that leaks everything gets every guess right


def test_the_audit_tests_the_curve_of_the_runs_own_accountant():
    """The report says the audit tested the headline's curve: with accountant 'rdp' the claim is RDP's, not PLD's."""
    events = _main_job_events()
    rdp = audit_dp_sgd(events, num_canaries=2000, accountant="rdp")
    assert rdp.claimed_epsilon == pytest.approx(dp.sample_level_epsilons(events, delta=rdp.delta, accountant="rdp")["silo-0"])
    assert rdp.claimed_epsilon > dp.sample_level_epsilons(events, delta=rdp.delta, accountant="pld")["silo-0"]
    assert "the rdp accountant" in rdp.method


def test_the_audit_passes_a_run_whose_noise_is_cut_threefold_its_stated_limit(monkeypatch):
    """The audit's power, as the README states it: a threefold cut (true epsilon far above 8) stays below the claim."""
    noise = dp.PrivateTraining._noise
    monkeypatch.setattr(dp.PrivateTraining, "_noise", lambda self, p, std: noise(self, p, std / 3.0))
    mild = audit_dp_sgd(_main_job_events(), seed=1)
    assert not mild.exceeds_claim and 4.0 < mild.epsilon_lower_bound < mild.claimed_epsilon


@pytest.mark.parametrize("lazy_noise", [False, True])
def test_the_audit_passes_the_honest_dp_sgd_run_at_the_main_jobs_settings(lazy_noise):
    """Eager and lazy noise (the canary table is large enough to be deferred): consistent with the claim."""
    honest = audit_dp_sgd(_main_job_events(), seed=2, lazy_noise=lazy_noise)
    assert honest.conclusive and not honest.exceeds_claim
    assert 0.0 < honest.epsilon_lower_bound < 0.5 * honest.claimed_epsilon


def test_the_audit_catches_clipping_that_lets_a_large_gradient_through(monkeypatch):
    """Canary gradients are 100 times the clip bound: a clip that does not cut is a leak the audit sees."""
    from dp import _fastclip

    monkeypatch.setattr(_fastclip.BookKeepingClipper, "__init__", _unclipped(_fastclip.BookKeepingClipper.__init__))
    with pytest.warns(PrivacyAuditWarning):
        broken = audit_dp_sgd(_main_job_events(), seed=3)
    assert broken.exceeds_claim


def _unclipped(init):
    def wrapped(self, module, *, max_grad_norm):
        init(self, module, max_grad_norm=1e12)

    return wrapped


def test_tested_point_maximizes_the_margin_of_ceiling_over_claim():
    claimed = {d: 8.0 - math.log10(d) * 0.2 for d in TESTED_DELTAS}  # a curve that rises slowly as delta falls
    delta, eps, ceiling = audited_point(claimed.__getitem__, num_canaries=10_000)
    best = max(TESTED_DELTAS, key=lambda d: audit_ceiling(canaries=10_000, delta=d) - claimed[d])
    assert delta == best and eps == claimed[best]
    assert ceiling == pytest.approx(audit_ceiling(canaries=10_000, delta=best))
    assert audit_ceiling(canaries=10_000, delta=1e-5) < 6.0 < ceiling  # a smaller delta is what makes 8 reachable


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: epsilon_lower_bound(canaries=5, guesses=6, correct=1, delta=0.0),
            dp.DPValueError,
            "guesses must be <= canaries=5, got 6",
        ),
        (
            lambda: epsilon_lower_bound(canaries=5, guesses=3, correct=4, delta=0.0),
            dp.DPValueError,
            "correct must be <= guesses=3, got 4",
        ),
        (
            lambda: epsilon_lower_bound(canaries=5, guesses=3, correct=1, delta=1.0),
            dp.DPValueError,
            "delta must be in [0, 1), got 1.0",
        ),
        (
            lambda: epsilon_lower_bound(canaries=5, guesses=3, correct=1, delta=0.0, confidence=1.0),
            dp.DPValueError,
            "confidence must be in (0, 1), got 1.0",
        ),
        (
            lambda: epsilon_lower_bound(canaries=0, guesses=0, correct=0, delta=0.0),
            dp.DPValueError,
            "canaries must be >= 1, got 0",
        ),
        (
            lambda: one_run_p_value(canaries=5, guesses=3, correct=1, epsilon=-1.0, delta=0.0),
            dp.DPValueError,
            "epsilon must be >= 0, got -1.0",
        ),
        (lambda: audit_scores(np.array([1.0, np.nan]), [True, False], delta=0.0), dp.DPValueError, "scores must be finite"),
        (
            lambda: audit_scores(np.ones(3), [True, False], delta=0.0),
            dp.DPValueError,
            "included must have the shape of scores (3,), got (2,)",
        ),
        (
            lambda: audit_scores(np.ones(2), [2, 0], delta=0.0),
            dp.DPTypeError,
            "included must hold booleans (or 0/1), got dtype int64",
        ),
        (
            lambda: audit_scores(np.ones(2), [True, False], delta=0.0, guess_counts=[(2, 1)]),
            dp.DPValueError,
            "each guess count must be a pair of ints",
        ),
        (
            lambda: audit_scores(np.ones(2), [True, False], delta=0.0, guess_counts=[]),
            dp.DPValueError,
            "guess_counts must hold at least one",
        ),
        (lambda: audit_dp_sgd([]), dp.DPValueError, "events must be a non-empty sequence of SampleLevelEvent, got []"),
        (lambda: audit_dp_sgd([1.0]), dp.DPTypeError, "events[0] must be a SampleLevelEvent, got float"),
        (
            lambda: audit_dp_sgd([dataclasses.replace(_main_job_events()[0], sample_rate=0.3)]),
            dp.DPValueError,
            "events[0].sample_rate must be 1 / (batches per epoch) to be replayed, got 0.3",
        ),
        (lambda: audit_dp_sgd(_main_job_events(), num_canaries=10), dp.DPValueError, "num_canaries must be >= 100, got 10"),
        (
            lambda: draw_canaries(num_canaries=5, dimension=4, clip_bound=1.0, rng=np.random.default_rng(0)),
            dp.DPValueError,
            "num_canaries must be <= dimension=4 so that canary directions are orthonormal, got 5",
        ),
        (
            lambda: draw_canaries(num_canaries=2, dimension=4, clip_bound=0.0, rng=np.random.default_rng(0)),
            dp.DPValueError,
            "clip_bound must be > 0, got 0.0",
        ),
        (
            lambda: draw_canaries(num_canaries=2, dimension=4, clip_bound=1.0, rng=0),
            dp.DPTypeError,
            "rng must be a numpy.random.Generator, got int",
        ),
    ],
)
def test_bad_arguments_are_refused(call, error, message):
    with pytest.raises(error, match=re.escape(message)):
        call()


# ----------------------------------------------------------------------------- canaries


def test_canaries_are_orthonormal_and_scores_are_inner_products():
    canaries = draw_canaries(num_canaries=40, dimension=257, clip_bound=2.0, rng=np.random.default_rng(3))
    directions = np.stack([canaries.direction(i) for i in range(40)])
    assert np.allclose(directions @ directions.T, np.eye(40), atol=1e-12)
    assert np.abs(directions).max() < 0.5  # spread over coordinates, not one-hot
    x = np.random.default_rng(4).standard_normal(257)
    assert np.allclose(canaries.scores(x), directions @ x)
    assert np.allclose(directions @ canaries.orthogonalize(x), 0.0, atol=1e-12)
    updates = canaries.updates()
    assert sorted(updates) == [cid for cid, keep in zip(canaries.ids, canaries.included) if keep]
    assert all(abs(np.linalg.norm(u) - 2.0) < 1e-5 and u.dtype == np.float32 for u in updates.values())
    assert 0 < canaries.included.sum() < 40 and canaries.ids[0] == "canary-0000"
    with pytest.raises(dp.DPValueError, match=re.escape("model_delta must have length 257 (the canaries' dimension), got 3")):
        canaries.scores(np.zeros(3))


def test_run_canary_audit_passes_the_included_canaries_to_training():
    canaries = draw_canaries(num_canaries=60, dimension=300, clip_bound=1.0, rng=np.random.default_rng(8))
    seen = {}

    def train(extra):
        seen.update(extra)
        return np.sum(list(extra.values()), axis=0).astype(np.float64)  # a run that memorises everything

    res = run_canary_audit(train, canaries=canaries, delta=1e-5, claimed_epsilon=lambda: 100.0)
    assert set(seen) == {c for c, keep in zip(canaries.ids, canaries.included) if keep}
    assert res.correct == res.guesses and res.claimed_epsilon == 100.0 and not res.exceeds_claim


# ----------------------------------------------------------------------------- a small federated setup


@pytest.mark.parametrize("sigma, rounds", [(3.0, 3), (5.0, 2)])
def test_correctly_noised_run_stays_under_its_claim_and_a_silently_unnoised_one_exceeds_it(sigma, rounds):
    honest = audit_dp_fedavg(noise_multiplier=sigma, rounds=rounds, rng=np.random.default_rng(0))
    assert honest.extra["noise_added"] and len(honest.extra["ledger"]) == rounds
    assert honest.claimed_epsilon == pytest.approx(dp.epsilon(honest.extra["ledger"], delta=1e-5))
    assert 0 <= honest.epsilon_lower_bound < honest.claimed_epsilon and not honest.exceeds_claim
    with pytest.warns(PrivacyAuditWarning, match="PRIVACY AUDIT FAILED"):
        broken = audit_dp_fedavg(noise_multiplier=sigma, rounds=rounds, rng=np.random.default_rng(0), add_noise=False)
    assert broken.claimed_epsilon == pytest.approx(honest.claimed_epsilon)  # the accountant is told the same
    assert broken.epsilon_lower_bound > broken.claimed_epsilon and broken.exceeds_claim
    assert broken.correct == broken.guesses  # without noise every canary is recognised


def test_audit_figure_goes_into_the_privacy_report():
    result = audit_dp_fedavg(noise_multiplier=3.0, rounds=2, rng=np.random.default_rng(1), num_canaries=200, dimension=1000)
    report = dp.PrivacyReport(
        result.extra["ledger"], delta=1e-5, mode="plaintext", trust_model="the server sees every update", audit=result,
    )  # fmt: skip
    data = json.loads(report.to_json())
    assert data["audit"]["ran"] is True and data["audit"]["lower_bound"] == pytest.approx(result.epsilon_lower_bound)
    assert data["audit"]["ceiling"] == pytest.approx(result.ceiling) and data["audit"]["canaries"] == 200
    assert data["audit"]["claimed_epsilon"] == data["client_level"]["epsilon"] == pytest.approx(result.claimed_epsilon)
    assert data["audit"]["exceeds_claim"] is False and data["audit"]["conclusive"] is True
    page = report.to_html()
    assert "A privacy audit ran" in page and "consistent with the claim" in page and f"{result.ceiling:.3g}" in page
    assert isinstance(result, AuditResult)
    # the summary says so when no audit ran
    assert (
        "No privacy audit ran for this run."
        in dp.PrivacyReport(
            result.extra["ledger"], delta=1e-5, mode="plaintext", trust_model="the server sees every update"
        ).to_html()
    )


def test_report_of_a_run_whose_audit_exceeds_its_claim_flags_it_loudly():
    with pytest.warns(PrivacyAuditWarning):
        broken = audit_dp_fedavg(noise_multiplier=3.0, rounds=2, rng=np.random.default_rng(1), num_canaries=200,
                                 dimension=1000, add_noise=False)  # fmt: skip
    with pytest.warns(PrivacyAuditWarning, match=r"^PRIVACY AUDIT FAILED"):
        report = dp.PrivacyReport(broken.extra["ledger"], delta=1e-5, mode="plaintext", trust_model="the server sees every update",
                                  audit=broken.to_dict())  # fmt: skip
    assert json.loads(report.to_json())["audit"]["exceeds_claim"] is True
    assert "PRIVACY AUDIT FAILED" in report.to_html()


def test_an_audit_of_a_run_without_dp_has_no_claim_to_exceed():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = dp.PrivacyReport(dp.Ledger(), delta=1e-5, mode="plaintext", trust_model="the server sees every update",
                                  audited_epsilon_lower_bound=0.5)  # fmt: skip
    audit = json.loads(report.to_json())["audit"]
    assert audit["ran"] is True and audit["lower_bound"] == 0.5 and audit["claimed_epsilon"] is None
    assert audit["exceeds_claim"] is False and audit["ceiling"] is None
    assert "no differential-privacy claim to compare it with" in report.to_html()
    with pytest.raises(dp.DPValueError, match="give either audit= or audited_epsilon_lower_bound=, not both"):
        dp.PrivacyReport(dp.Ledger(), delta=1e-5, mode="plaintext", trust_model="t", audited_epsilon_lower_bound=0.5,
                         audit={"audited_epsilon_lower_bound": 0.5})  # fmt: skip
