"""Robust aggregation: the rules' arithmetic, their guarantees against arbitrary updates, refusals."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dp
from fedcore import ConfigError, FedAvg, Federation, InProcessExecutor, LocalModel, RoundFailedError, TrainConfig, UpdatePipeline
from fedcore.strategies.attacks import PoisonedExecutor, Scaling, SignFlip
from fedcore.strategies.robust import CoordinateMedian, Krum, MultiKrum, TrimmedMean, norm_bound_updates
from secagg import MaskedSum

from .toy import ToyTask, toy_clients

TRAIN = TrainConfig(lr=0.05, epochs=1, batch_size=8)


RULES = [CoordinateMedian(), TrimmedMean(trim_fraction=0.2), Krum(num_byzantine=1), MultiKrum(num_byzantine=1)]


def _models(deltas: np.ndarray, base: np.ndarray | None = None) -> tuple[np.ndarray, list[LocalModel]]:
    base = np.zeros(deltas.shape[1], dtype=np.float32) if base is None else base
    return base, [LocalModel(f"c{i}", (base + d).astype(np.float32), 1.0) for i, d in enumerate(deltas)]


# ----------------------------------------------------------------------------- arithmetic


def test_median_and_trimmed_mean_known_answers():
    deltas = np.array([[1.0, -5.0], [2.0, 0.0], [3.0, 1.0], [4.0, 2.0], [100.0, 3.0]])
    base, models = _models(deltas, base=np.array([10.0, 10.0], dtype=np.float32))
    assert np.allclose(CoordinateMedian().combine(base, models), [13.0, 11.0])
    # floor(0.2 * 5) = 1 trimmed from each end: mean of {2, 3, 4} and of {0, 1, 2}
    assert TrimmedMean(trim_fraction=0.2).trimmed(5) == 1
    assert np.allclose(TrimmedMean(trim_fraction=0.2).combine(base, models), [13.0, 11.0])
    # nothing trimmed: the plain mean
    assert np.allclose(TrimmedMean(trim_fraction=0.0).combine(base, models), base + deltas.mean(axis=0))
    # the server learning rate scales the step
    assert np.allclose(CoordinateMedian(server_lr=0.5).combine(base, models), [11.5, 10.5])


def test_krum_scores_follow_the_definition():
    """Score = sum of squared distances to the n - f - 2 nearest other updates (Blanchard et al. 2017)."""
    deltas = np.array([[0.0], [1.0], [2.0], [10.0], [11.0]])
    base, models = _models(deltas)
    krum = Krum(num_byzantine=1)
    out = krum.combine(base, models)
    # n - f - 2 = 2 nearest: c0 {1, 4} = 5, c1 {1, 1} = 2, c2 {1, 4} = 5, c3 {1, 64} = 65, c4 {1, 81} = 82
    assert krum.last_scores == {"c0": 5.0, "c1": 2.0, "c2": 5.0, "c3": 65.0, "c4": 82.0}
    assert krum.last_selected == ("c1",) and np.allclose(out, [1.0])
    multi = Krum(num_byzantine=1, multi=3)
    assert np.allclose(multi.combine(base, models), [1.0])  # mean of c0, c1, c2
    assert multi.last_selected == ("c0", "c1", "c2")
    default_multi = MultiKrum(num_byzantine=1)  # multi = n - f = 4
    assert np.allclose(default_multi.combine(base, models), [(0 + 1 + 2 + 10) / 4])


def test_norm_bound_scales_only_long_updates():
    deltas = np.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    bounded, scaled = norm_bound_updates(deltas, 1.0)
    assert scaled == 1
    assert np.allclose(bounded, [[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]])
    rule = CoordinateMedian(norm_bound=1.0)
    base, models = _models(np.array([[30.0, 40.0], [0.3, 0.4], [0.6, 0.8]]))
    assert np.allclose(rule.combine(base, models), [0.6, 0.8]) and rule.last_clipped == 2


# ----------------------------------------------------------------------------- guarantees (properties)


def _honest_and_byzantine(data, n_honest, n_byz, dim):
    honest = np.array(
        data.draw(st.lists(st.lists(st.floats(-1, 1), min_size=dim, max_size=dim), min_size=n_honest, max_size=n_honest))
    )
    byz = np.array(
        data.draw(
            st.lists(
                st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=dim, max_size=dim),
                min_size=n_byz,
                max_size=n_byz,
            )
        )
    ).reshape(n_byz, dim)
    return honest, byz


@settings(max_examples=40, deadline=None)
@given(n_honest=st.integers(3, 9), dim=st.integers(1, 4), data=st.data())
def test_median_and_trimmed_mean_stay_within_the_honest_range(n_honest, dim, data):
    """With fewer Byzantine updates than trimmed per end (or than half, for the median), every
    coordinate of the result lies between the smallest and largest honest value."""
    n_byz = data.draw(st.integers(0, (n_honest - 1) // 2))
    honest, byz = _honest_and_byzantine(data, n_honest, n_byz, dim)
    order = data.draw(st.permutations(range(n_honest + n_byz)))
    deltas = np.concatenate([honest, byz])[list(order)]
    base, models = _models(deltas)
    lo, hi = honest.min(axis=0) - 1e-5, honest.max(axis=0) + 1e-5
    med = CoordinateMedian().combine(base, models)
    assert np.all((lo <= med) & (med <= hi))
    n = n_honest + n_byz
    fraction = data.draw(st.floats(0.0, 0.49)).__round__(3)
    rule = TrimmedMean(trim_fraction=fraction)
    if rule.trimmed(n) >= n_byz:
        out = rule.combine(base, models)
        assert np.all((lo <= out) & (out <= hi))


@settings(max_examples=40, deadline=None)
@given(n_honest=st.integers(4, 8), dim=st.integers(1, 5), data=st.data())
def test_krum_never_selects_a_far_away_byzantine_update(n_honest, dim, data):
    """Honest updates in the unit cube, f Byzantine ones farther than sqrt(n) * diameter away."""
    f = data.draw(st.integers(1, max(1, (n_honest - 3) // 2)))
    n = n_honest + f
    assert n > 2 * f + 2
    honest = np.array(
        data.draw(st.lists(st.lists(st.floats(0, 1), min_size=dim, max_size=dim), min_size=n_honest, max_size=n_honest))
    )
    signs = np.array(data.draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=f, max_size=f)))
    byz = (10.0 * n) * signs[:, None] * np.ones((f, dim)) + np.arange(f)[:, None]
    deltas = np.concatenate([honest, byz])
    base, models = _models(deltas)
    for rule in (Krum(num_byzantine=f), MultiKrum(num_byzantine=f)):
        rule.combine(base, models)
        assert all(int(cid[1:]) < n_honest for cid in rule.last_selected), rule.last_selected


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_rules_are_permutation_invariant(data):
    deltas = np.array(data.draw(st.lists(st.lists(st.floats(-3, 3), min_size=3, max_size=3), min_size=5, max_size=7)))
    order = data.draw(st.permutations(range(len(deltas))))
    base, models = _models(deltas)
    shuffled = [models[i] for i in order]
    for rule in (CoordinateMedian(), TrimmedMean(trim_fraction=0.2), MultiKrum(num_byzantine=1)):
        assert np.allclose(rule.combine(base, models), rule.combine(base, shuffled), atol=1e-6)


# ----------------------------------------------------------------------------- refusals


def test_krum_refuses_too_few_updates_naming_the_numbers():
    base, models = _models(np.zeros((4, 2)))
    with pytest.raises(ConfigError, match=re.escape(
        "krum with num_byzantine=1 needs n > 2*f + 2 = 4 updates per round, got n=4; lower num_byzantine "
        "or sample at least 5 clients per round"
    )):  # fmt: skip
        Krum(num_byzantine=1).combine(base, models)
    assert Krum(num_byzantine=1).min_clients() == 5
    base, models = _models(np.zeros((5, 2)))
    with pytest.raises(ConfigError, match=re.escape("krum: multi=5 exceeds n - num_byzantine = 5 - 1 = 4")):
        Krum(num_byzantine=1, multi=5).combine(base, models)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: Krum(num_byzantine=-1), "num_byzantine must be an int >= 0, got -1"),
        (lambda: Krum(num_byzantine=1.5), "num_byzantine must be an int >= 0, got 1.5"),
        (lambda: Krum(num_byzantine=1, multi=0), "multi must be an int >= 1, got 0"),
        (lambda: TrimmedMean(trim_fraction=0.5), "trim_fraction must be a number in [0, 0.5), got 0.5"),
        (lambda: TrimmedMean(trim_fraction=-0.1), "trim_fraction must be a number in [0, 0.5), got -0.1"),
        (lambda: CoordinateMedian(norm_bound=0.0), "norm_bound must be a finite number > 0 or None, got 0.0"),
        (lambda: CoordinateMedian(norm_bound=float("inf")), "norm_bound must be a finite number > 0 or None, got inf"),
        (lambda: CoordinateMedian(server_lr=-1.0), "server_lr must be a finite number > 0 or None, got -1.0"),
    ],
)
def test_impossible_settings_are_refused(build, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        build()


def test_non_finite_updates_are_left_out_and_named():
    deltas = np.array([[1.0], [2.0], [np.nan], [3.0], [np.inf]])
    base, models = _models(deltas)
    rule = CoordinateMedian()
    assert np.allclose(rule.combine(base, models), [2.0])
    assert rule.last_rejected == ("c2", "c4")
    base, models = _models(np.full((3, 2), np.nan))
    with pytest.raises(RoundFailedError, match=re.escape("median: all 3 updates hold NaN or Inf")):
        rule.combine(base, models)
    with pytest.raises(RoundFailedError, match="no local model"):
        rule.combine(base, [])
    with pytest.raises(RoundFailedError, match=re.escape("local model of client 'c0' has shape (3,), the global model has (2,)")):
        rule.combine(base, [LocalModel("c0", np.zeros(3, dtype=np.float32), 1.0)])


def test_rules_keep_no_state():
    rule = TrimmedMean()
    assert rule.state_dict() == {}
    rule.load_state_dict({})
    with pytest.raises(ConfigError, match=re.escape("trimmed_mean keeps no state, got keys ['m']")):
        rule.load_state_dict({"m": np.zeros(1)})


# ----------------------------------------------------------------------------- in a federation


def _federation(strategy, *, clients=None, **kwargs):
    defaults = dict(
        task=ToyTask(),
        clients=clients or toy_clients(7),
        strategy=strategy,
        train=TRAIN,
        seed=7,
        reproducible=True,
        quiet=True,
        evaluate_every=0,
    )
    defaults.update(kwargs)
    return Federation(**defaults)


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.name)
def test_federation_refuses_robust_rules_without_consent_or_under_masking(rule):
    with pytest.raises(
        ConfigError,
        match=re.escape(f"strategy {rule.name!r} reveals individual local models to the server ({rule.reveal_reason})"),
    ):
        _federation(rule)
    masked = UpdatePipeline(backend=MaskedSum(value_bound=1.0, max_clients=7), clip=dp.L2Clip(1.0), weighting="uniform")
    with pytest.raises(ConfigError, match=re.escape(
        f"strategy {rule.name!r} needs individual local models, which 'masked' aggregation exists to hide"
    )):  # fmt: skip
        _federation(rule, allow_reveal=True, pipeline=masked)


def test_robust_rules_learn_and_resist_one_scaling_attacker_in_seven():
    clients = toy_clients(7)
    clean = _federation(FedAvg(), clients=clients)
    clean.run(4)
    baseline = clean.evaluate()["accuracy"]
    for rule in RULES:
        task = ToyTask()
        executor = PoisonedExecutor(
            InProcessExecutor(task), attackers={"client-3"}, attack=Scaling(factor=-50.0), rng=np.random.default_rng(0)
        )
        fed = _federation(rule, clients=clients, task=task, executor=executor, allow_reveal=True)
        fed.run(4)
        assert fed.evaluate()["accuracy"] >= baseline - 0.1, rule.name
        assert fed.reveals and fed.reveals[-1].what == f"local models ({rule.name})"
        if isinstance(rule, Krum):
            assert "client-3" not in rule.last_selected
    task = ToyTask()
    executor = PoisonedExecutor(
        InProcessExecutor(task), attackers={"client-3"}, attack=Scaling(factor=-50.0), rng=np.random.default_rng(0)
    )
    attacked = _federation(FedAvg(), clients=clients, task=task, executor=executor)
    attacked.run(4)
    assert attacked.evaluate()["accuracy"] < baseline - 0.2  # the attack does hurt the plain mean


def test_norm_bounding_works_under_masking():
    """Clients clip before masking: a boosted update moves the masked mean by at most the bound."""
    clients = toy_clients(5)
    bound = 0.5

    def run(pipeline):
        task = ToyTask()
        executor = PoisonedExecutor(
            InProcessExecutor(task), attackers={"client-1"}, attack=Scaling(factor=1e4), rng=np.random.default_rng(0)
        )
        fed = _federation(FedAvg(), clients=clients, task=task, executor=executor, pipeline=pipeline)
        start = fed.global_vector.copy()
        fed.run_round()
        return np.linalg.norm(fed.global_vector.astype(np.float64) - start)

    masked = UpdatePipeline(backend=MaskedSum(value_bound=bound, max_clients=5), clip=dp.L2Clip(bound), weighting="uniform")
    assert run(masked) <= bound * (1 + 1e-3)
    unbounded = UpdatePipeline(weighting="uniform")
    assert run(unbounded) > 100 * bound


def test_sign_flip_majority_defeats_the_median_as_theory_says():
    """With 4 of 7 attackers the median follows them: the guarantee needs a minority."""
    clients = toy_clients(7)
    task = ToyTask()
    attackers = {"client-0", "client-1", "client-2", "client-3"}
    executor = PoisonedExecutor(
        InProcessExecutor(task), attackers=attackers, attack=SignFlip(scale=3.0), rng=np.random.default_rng(0)
    )
    fed = _federation(CoordinateMedian(), clients=clients, task=task, executor=executor, allow_reveal=True)
    fed.run(4)
    assert fed.evaluate()["accuracy"] < 0.5


def test_impossible_krum_fails_the_round_without_changing_the_model_and_counts_what_it_revealed(tmp_path):
    fed = _federation(
        Krum(num_byzantine=2), clients=toy_clients(5), allow_reveal=True, ledger=dp.Ledger(), checkpoint_dir=tmp_path
    )
    before = fed.global_vector.copy()
    with pytest.raises(
        ConfigError, match=re.escape("krum with num_byzantine=2 needs n > 2*f + 2 = 6 updates per round, got n=5")
    ):
        fed.run_round()
    assert np.array_equal(fed.global_vector, before)
    # the local models had reached the server in the clear: the round is used up and its reveal listed
    assert fed.round_index == 1 and fed.history[-1]["interrupted"] and [r.round_index for r in fed.reveals] == [1]
