"""Budget enforcement: training stops before the budget would be exceeded."""

from __future__ import annotations

import re

import numpy as np
import pytest

import dp


def round_event(r: int, z: float = 1.0, q: float = 0.1) -> dp.GaussianEvent:
    return dp.GaussianEvent(round_index=r, noise_multiplier=z, clip_bound=1.0, sample_rate=q, participants=10, survivors=9)


def test_training_stops_before_the_budget_is_exceeded():
    budget = dp.PrivacyBudget(epsilon=3.0, delta=1e-5)
    ledger = dp.Ledger()
    rounds = 0
    with pytest.raises(dp.BudgetExceededError) as info:
        for r in range(10_000):
            nxt = [round_event(r)]
            budget.check(ledger, nxt)
            ledger.extend(nxt)
            rounds += 1
    err = info.value
    assert dp.epsilon(ledger, delta=1e-5) <= 3.0  # never exceeded
    assert err.spent == pytest.approx(dp.epsilon(ledger, delta=1e-5))
    assert err.would_be > 3.0 and err.next_cost == pytest.approx(err.would_be - err.spent)
    msg = str(err)
    assert "epsilon=3, delta=1e-05" in msg
    assert re.search(r"spent epsilon=[0-9.]+ so far, the next round would cost [0-9.e-]+ more", msg)
    assert f"{err.spent:.6g}" in msg and f"{err.next_cost:.6g}" in msg
    # rounds_that_fit from an empty ledger predicts exactly how many rounds ran
    assert budget.rounds_that_fit(dp.Ledger(), [round_event(0)]) == rounds
    assert budget.rounds_that_fit(ledger, [round_event(0)]) == 0
    assert budget.remaining(ledger) == pytest.approx(3.0 - err.spent)


def test_check_returns_the_would_be_epsilon():
    budget = dp.PrivacyBudget(epsilon=10.0, delta=1e-5)
    assert budget.check([], [round_event(0)]) == pytest.approx(dp.epsilon([round_event(0)], delta=1e-5))
    assert budget.check([], []) == 0.0


def sgd(cid: str, r: int, steps: int, z: float = 1.5) -> dp.SampleLevelEvent:
    return dp.SampleLevelEvent(client_id=cid, round_index=r, noise_multiplier=z, max_grad_norm=1.0, sample_rate=0.05, steps=steps)


def test_default_budget_binds_dp_sgd_events_too():
    # issue 20: a default budget used to be client-level only and let DP-SGD spend unchecked
    budget = dp.PrivacyBudget(epsilon=3.0, delta=1e-5)
    assert budget.level == "all" and budget.accountant == "pld"
    ledger = dp.Ledger([sgd("a", 0, 100)])
    assert budget.spent(ledger) == pytest.approx(dp.sample_level_epsilons(ledger, delta=1e-5)["a"])
    assert budget.spent(ledger) > 0
    assert budget.spent_by_level(ledger) == {"client": 0.0, "sample": budget.spent(ledger)}
    with pytest.raises(dp.BudgetExceededError, match="client 'a'") as info:
        budget.check(ledger, [sgd("a", 1, 100_000)])
    assert info.value.level == "sample"
    # both levels at once: each must stay within the budget
    mixed = dp.Ledger([sgd("a", 0, 10), round_event(0)])
    assert budget.spent(mixed) == max(dp.epsilon(mixed, delta=1e-5), dp.sample_level_epsilons(mixed, delta=1e-5)["a"])
    with pytest.raises(dp.BudgetExceededError, match="client-level privacy budget"):
        budget.check(mixed, [round_event(1, z=0.3, q=1.0)])


@pytest.mark.parametrize(
    "level,events,match",
    [
        ("client", [sgd("a", 0, 10)], r"level='client' does not cover the 1 sample-level \(DP-SGD\) event\(s\)"),
        ("sample", [round_event(0), round_event(1)], r"level='sample' does not cover the 2 client-level event\(s\)"),
    ],
)
def test_a_budget_refuses_a_history_it_does_not_bind(level, events, match):
    budget = dp.PrivacyBudget(epsilon=3.0, delta=1e-5, level=level)
    for call in (
        lambda: budget.spent(events),
        lambda: budget.check([], events),
        lambda: budget.check(events, []),
        lambda: budget.rounds_that_fit([], events),
        lambda: budget.remaining(events),
    ):
        with pytest.raises(dp.DPValueError, match=match):
            call()


def test_budget_planned_with_the_fewest_survivors_is_never_exceeded_by_dropouts():
    """Issue 18 item 3: plan every round with the minimum survivors the masking threshold allows.

    Distributed noise shrinks with dropouts (each survivor adds its share), so a plan made with
    every participant surviving can be overspent (the check below shows it); the worst-case plan
    never is, whatever the dropouts down to the threshold.
    """
    noise = dp.SkellamNoise(noise_multiplier=4.0, clip_bound=1.0, dim=1000, min_clients=6)
    participants, threshold, scale = 10, 6, 256.0
    budget = dp.PrivacyBudget(epsilon=4.0, delta=1e-5)

    def run(plan_survivors: int, seed: int | None) -> dp.Ledger:
        rng = np.random.default_rng(seed)
        ledger = dp.Ledger()
        for r in range(500):
            plan = noise.plan(round_index=r, scale=scale, participants=participants, min_survivors=plan_survivors)
            try:
                budget.check(ledger, [plan])
            except dp.BudgetExceededError:
                return ledger
            # dropouts down to the threshold: random, or (seed None) always the most the protocol tolerates
            survivors = threshold if seed is None else int(rng.integers(threshold, participants + 1))
            ledger.record(noise.event(round_index=r, scale=scale, participants=participants, survivors=survivors))
        raise AssertionError("the budget never stopped the run")

    for seed in (0, 1, 2, None):
        ledger = run(threshold, seed)
        assert len(ledger) > 1 and budget.spent(ledger) <= budget.epsilon
        assert min(e.survivors for e in ledger) == threshold  # the worst case did happen
    # the old way, planning as if every participant survives, overspends when the dropouts happen
    assert budget.spent(run(participants, None)) > budget.epsilon


def test_sample_level_budget_names_the_client():
    budget = dp.PrivacyBudget(epsilon=2.0, delta=1e-5, level="sample")
    run = sgd

    ledger = dp.Ledger([run("a", 0, 100), run("b", 0, 10)])
    budget.check(ledger, [run("b", 1, 10)])
    with pytest.raises(dp.BudgetExceededError, match="client 'a'") as info:
        budget.check(ledger, [run("a", 1, 400), run("b", 1, 10)])
    assert info.value.client_id == "a" and info.value.level == "sample"
    assert budget.spent(ledger) == pytest.approx(dp.sample_level_epsilons(ledger, delta=1e-5)["a"])
    k = budget.rounds_that_fit(ledger, [run("a", 1, 100)])
    assert budget.check(ledger, [run("a", 1, 100 * k)]) <= 2.0
    with pytest.raises(dp.BudgetExceededError):
        budget.check(ledger, [run("a", 1, 100 * (k + 1))])


def test_rounds_that_fit_respects_max_rounds():
    budget = dp.PrivacyBudget(epsilon=50.0, delta=1e-5)
    assert budget.rounds_that_fit([], [round_event(0, z=20.0, q=0.01)], max_rounds=7) == 7


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(epsilon=-1.0, delta=1e-5), r"epsilon must be > 0, got -1.0"),
        (dict(epsilon=1.0, delta=0), r"delta must be in \(0, 1\), got 0"),
        (dict(epsilon=1.0, delta=1e-5, accountant="x"), r"accountant must be one of"),
        (dict(epsilon=1.0, delta=1e-5, level="round"), r"level must be one of \('all', 'client', 'sample'\), got 'round'"),
    ],
)
def test_bad_budget_parameters_are_refused(kwargs, match):
    with pytest.raises(dp.DPValueError, match=match):
        dp.PrivacyBudget(**kwargs)
