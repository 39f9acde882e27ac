"""Neighbour graphs and the SecAgg / SecAgg+ planner."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secagg import Stage, plan_complete, plan_secagg_plus
from secagg.graph import neighbours, neighbours_of, round_completes, simulate_completion


@settings(max_examples=30, deadline=None)
@given(n=st.integers(3, 60), half=st.integers(1, 10), seed=st.binary(min_size=32, max_size=32))
def test_harary_graph_is_k_regular_symmetric_and_seeded(n, half, seed):
    k = 2 * half
    g = neighbours(n, degree=k, seed=seed)
    expect = min(k, n - 1)
    for i, nb in enumerate(g):
        assert i not in nb and len(nb) == len(set(nb)) == expect
        assert all(i in g[j] for j in nb)
        assert neighbours_of(n, degree=k, seed=seed, node=i) == nb
    assert neighbours(n, degree=k, seed=seed) == g


def test_graph_depends_on_the_seed():
    a, b = neighbours(50, degree=6, seed=b"\x01" * 32), neighbours(50, degree=6, seed=b"\x02" * 32)
    assert a != b


def test_permutation_is_not_the_identity_ring():
    g = neighbours(40, degree=2, seed=os.urandom(32))
    ring_like = sum(set(nb) == {(i - 1) % 40, (i + 1) % 40} for i, nb in enumerate(g))
    assert ring_like < 40


@pytest.mark.parametrize(
    "args, pattern",
    [
        ((10, 3, bytes(32)), "degree must be even"),
        ((10, 4, b"short"), "graph seed must be 32 bytes"),
        ((0, 4, bytes(32)), "n must be an int >= 1, got 0"),
        ((10, -2, bytes(32)), "degree must be an int >= 0"),
    ],
)
def test_bad_graph_parameters(args, pattern):
    n, degree, seed = args
    with pytest.raises(ValueError, match=pattern):
        neighbours(n, degree=degree, seed=seed)


def test_complete_plan_tolerates_the_planned_fraction_in_the_worst_case():
    plan = plan_complete(n=8, dropout_rate=0.25)
    assert (plan.graph, plan.degree, plan.threshold, plan.tolerated_dropouts) == ("complete", 7, 6, 2)
    # exact completion probability P[Binomial(8, 0.75) >= 6]
    exact = sum(math.comb(8, i) * 0.75**i * 0.25 ** (8 - i) for i in range(6, 9))
    assert plan.completion_probability == pytest.approx(exact)
    assert "any 2 clients may drop" in plan.guarantee and "t=6" in plan.guarantee
    assert plan.active_secure


def test_complete_plan_refuses_insecure_settings():
    with pytest.raises(ValueError, match="no threshold fits n=10"):
        plan_complete(n=10, dropout_rate=0.5, corrupted_fraction=0.5)
    with pytest.raises(ValueError, match=r"threshold must be in \[1, 10\]"):
        plan_complete(n=10, threshold=11)


def test_secagg_plus_plan_at_n100_is_logarithmic_and_meets_its_targets():
    plan = plan_secagg_plus(n=100, dropout_rate=0.1, corrupted_fraction=0.1)
    assert plan.graph == "secagg+" and plan.degree % 2 == 0
    assert plan.degree <= 6 * math.log2(100)
    assert plan.threshold > 10  # more than the 10 corrupted clients: they alone never rebuild a secret
    assert plan.completion_probability >= 1 - 2**-20
    assert plan.privacy_failure_bound <= 2**-40
    assert "24-regular" in plan.guarantee or f"{plan.degree}-regular" in plan.guarantee
    rate = simulate_completion(plan, dropout_rate=0.1, trials=4000, rng=np.random.default_rng(0))
    assert rate >= 0.999


def test_degree_grows_slowly_with_n():
    ks = [plan_secagg_plus(n=n, dropout_rate=0.1, corrupted_fraction=0.05).degree for n in (100, 1000, 10000)]
    assert ks[0] < ks[1] < ks[2] <= 3 * ks[0]


def test_active_server_planning_meets_the_signed_condition_for_every_graph():
    plan = plan_secagg_plus(n=100, dropout_rate=0.1, corrupted_fraction=0.1, active_server=True)
    assert plan.active_secure and 2 * plan.threshold > plan.degree + 2 + 10
    assert "Signed mode" in plan.guarantee and ": safe" in plan.guarantee
    passive = plan_secagg_plus(n=100, dropout_rate=0.1, corrupted_fraction=0.1)
    assert plan.degree > passive.degree


def test_unsigned_default_at_n100_is_a_majority_of_holders_and_says_honest_but_curious():
    """Issue 17: degree 16 with threshold 6 was planned here; a minority of holders is no longer planned."""
    plan = plan_secagg_plus(n=100, dropout_rate=0.1)
    assert 2 * plan.threshold > plan.degree + 1 and (plan.degree, plan.threshold) != (16, 6)
    assert plan.completion_probability >= 1 - 2**-20
    assert "honest-but-curious" in plan.guarantee and "nothing is claimed" in plan.guarantee


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 400), rate=st.floats(0.0, 0.3), gamma=st.floats(0.0, 0.1), active=st.booleans())
def test_every_planned_threshold_is_safe_for_the_threat_model_it_states(n, rate, gamma, active):
    try:
        plan = plan_secagg_plus(n=n, dropout_rate=rate, corrupted_fraction=gamma, active_server=active)
    except ValueError:
        return  # no secure plan: refused, not planned
    corrupted = math.floor(gamma * n)
    assert 2 * plan.threshold > plan.degree + 1  # a majority of the holders, in every mode
    if plan.graph == "secagg+":
        assert plan.privacy_failure_bound <= 2**-40  # the random graph gives no client t colluding holders
    if active:
        assert plan.active_secure and 2 * plan.threshold > plan.degree + 2 + corrupted
    else:
        assert "honest-but-curious" in plan.guarantee


def test_small_rounds_fall_back_to_the_complete_graph():
    plan = plan_secagg_plus(n=8, dropout_rate=0.25)
    # no t in the secure range [5, 8] completes with probability 1 - 2^-20: the smallest secure one, said so
    assert plan.graph == "complete" and plan.threshold == 5 and "fallback" in plan.guarantee
    assert "NOT met" in plan.guarantee
    plan = plan_secagg_plus(n=10, dropout_rate=0.02)
    assert plan.graph == "complete" and plan.threshold == 6 and plan.completion_probability >= 1 - 2**-20
    assert "whose completion probability meets the target" in plan.guarantee


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    rate=st.floats(0.0, 0.45),
    gamma=st.floats(0.0, 0.3),
    active=st.booleans(),
)
def test_planned_complete_thresholds_never_fall_below_the_secure_floor(n, rate, gamma, active):
    if active and n == 1:  # 2t > n + 1 has no solution t <= 1: refused, never planned
        with pytest.raises(ValueError, match="no threshold of at most n=1"):
            plan_secagg_plus(n=n, dropout_rate=rate, corrupted_fraction=gamma, active_server=active)
        return
    plan = plan_secagg_plus(n=n, dropout_rate=rate, corrupted_fraction=gamma, active_server=active)
    corrupted = math.floor(gamma * n)
    if plan.graph == "complete":
        assert plan.threshold >= n // 2 + 1 and plan.threshold > corrupted
        if active:
            assert 2 * plan.threshold > n + 1 + corrupted
    else:
        assert plan.threshold > 1 or corrupted == 0
        assert plan.degree < n - 1 and plan.degree % 2 == 0


def test_pinned_degree_and_threshold_are_evaluated_as_given():
    plan = plan_secagg_plus(n=100, dropout_rate=0.1, degree=10, threshold=9)
    assert (plan.degree, plan.threshold) == (10, 9)
    assert plan.completion_probability < 0.9  # honest about a bad choice
    with pytest.raises(ValueError, match="degree must be even"):
        plan_secagg_plus(n=100, dropout_rate=0.1, degree=7)
    with pytest.raises(ValueError, match=r"threshold must be in \[1, 11\]"):
        plan_secagg_plus(n=100, dropout_rate=0.1, degree=10, threshold=12)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(n=10, dropout_rate=1.0), r"dropout_rate must be in \[0, 1\), got 1\.0"),
        (dict(n=10, dropout_rate=0.1, corrupted_fraction=-0.1), "corrupted_fraction"),
        (dict(n=10, dropout_rate=0.1, security_bits=0), "security_bits"),
    ],
)
def test_planner_bad_parameters(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        plan_secagg_plus(**kwargs)


def test_round_completes_rules():
    g = neighbours(6, degree=2, seed=bytes(32))  # each node: 2 neighbours, 3 holders
    assert round_completes(g, threshold=2, silent_from={})
    # a node and both its neighbours silent from the start: still fine (nobody needs them)
    v = 0
    silent = {v: Stage.ADVERTISE_KEYS, **{j: Stage.ADVERTISE_KEYS for j in g[v]}}
    assert round_completes(g, threshold=2, silent_from=silent)
    # a survivor whose two neighbours go silent at UNMASK keeps only itself: 1 < 2 holders
    assert not round_completes(g, threshold=2, silent_from={j: Stage.UNMASK for j in g[v]})
    # threshold above the survivors after a stage
    assert not round_completes(neighbours(4, degree=3, seed=bytes(32)), threshold=4, silent_from={1: Stage.SHARE_KEYS})
    # a node whose neighbours both shared nothing leaves before masking; nobody needs it
    assert round_completes(g, threshold=2, silent_from={j: Stage.SHARE_KEYS for j in g[v]})


def test_round_completes_rules_of_the_consistency_check():
    g = neighbours(10, degree=4, seed=bytes(32))  # 5 holders each
    v = 0
    # two neighbours silent from the consistency check: v has 3 signing holders, enough for t=3 ...
    silent = {j: Stage.CONSISTENCY_CHECK for j in g[v][:2]}
    assert round_completes(g, threshold=3, silent_from=silent, signed=True)
    # ... not for t=4 (v cannot answer), while unsigned the same silence is a silence at UNMASK
    assert not round_completes(g, threshold=4, silent_from=silent, signed=True)
    assert round_completes(g, threshold=3, silent_from=silent) == round_completes(
        g, threshold=3, silent_from={j: Stage.UNMASK for j in g[v][:2]}
    )


@pytest.mark.parametrize("signed", [False, True])
def test_simulation_agrees_with_the_per_round_rule_signed_and_unsigned(signed):
    plan = plan_secagg_plus(n=30, dropout_rate=0.3, degree=6, threshold=4)
    rng = np.random.default_rng(5)
    g = tuple(tuple(sorted(((i + s) % 30) for s in (-3, -2, -1, 1, 2, 3))) for i in range(30))
    trials, hits = 2000, 0
    for _ in range(trials):
        drop = rng.random(30) < 0.3
        stage = rng.integers(0, len(Stage), 30)
        silent = {i: Stage(int(stage[i])) for i in range(30) if drop[i]}
        hits += round_completes(g, threshold=4, silent_from=silent, signed=signed)
    sim = simulate_completion(plan, dropout_rate=0.3, trials=trials, rng=np.random.default_rng(6), signed=signed)
    assert abs(hits / trials - sim) < 0.05


def test_simulation_agrees_with_the_per_round_rule():
    plan = plan_secagg_plus(n=30, dropout_rate=0.3, degree=6, threshold=4)
    rng = np.random.default_rng(3)
    g = tuple(tuple(sorted(((i + s) % 30) for s in (-3, -2, -1, 1, 2, 3))) for i in range(30))
    hits = 0
    trials = 3000
    for _ in range(trials):
        drop = rng.random(30) < 0.3
        stage = rng.integers(0, len(Stage), 30)
        hits += round_completes(g, threshold=4, silent_from={i: Stage(int(stage[i])) for i in range(30) if drop[i]})
    sim = simulate_completion(plan, dropout_rate=0.3, trials=trials, rng=np.random.default_rng(4))
    assert abs(hits / trials - sim) < 0.05
    assert 0.05 < sim < 0.999  # a regime where the two could disagree
