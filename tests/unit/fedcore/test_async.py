"""Asynchronous rounds: virtual clock, staleness weights, FedBuff, FedAsync, DP accounting."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dp
from fedcore import (
    ConfigError,
    FedAdam,
    FedAvg,
    Federation,
    InProcessExecutor,
    ModelSelection,
    TrainConfig,
    UpdatePipeline,
)
from fedcore.rounds.asynchronous import (
    AsyncFederation,
    Constant,
    ConstantStaleness,
    Exponential,
    FedAsync,
    FedBuff,
    HingeStaleness,
    LogNormal,
    PolynomialStaleness,
    VirtualClock,
)
from secagg import MaskedSum

from .toy import ToyTask, toy_clients

TRAIN = TrainConfig(lr=0.05, epochs=1, batch_size=16)
# durations equal the client's example count (toy clients hold 40, 45, 50, 55 training examples)
EXACT_CLOCK = VirtualClock(speed=Constant(1.0), latency=Constant(0.0), seconds_per_example=1.0)


def _federation(num_clients=4, **kwargs):
    defaults = dict(
        task=ToyTask(),
        clients=toy_clients(num_clients),
        strategy=FedAvg(),
        train=TRAIN,
        seed=7,
        reproducible=True,
        quiet=True,
        evaluate_every=0,
    )
    defaults.update(kwargs)
    return Federation(**defaults)


class SpyExecutor(InProcessExecutor):
    """The in-process executor, keeping every result by (client, round_index)."""

    def __init__(self, task):
        super().__init__(task)
        self.results = {}
        self.calls = 0

    def fit(self, clients, **kwargs):
        self.calls += 1
        out = super().fit(clients, **kwargs)
        for r in out:
            key = (r.client_id, kwargs["round_index"])
            assert key not in self.results
            self.results[key] = r
        return out


def _strip(history):
    return [{k: v for k, v in h.items() if k != "wall_seconds"} for h in history]


# ---------------------------------------------------------------- staleness functions
def test_staleness_known_values():
    assert ConstantStaleness()(0) == ConstantStaleness()(1000) == 1.0
    poly = PolynomialStaleness(a=0.5)
    assert poly(0) == 1.0 and poly(3) == 0.5 and poly(8) == pytest.approx(1 / 3)
    assert PolynomialStaleness(a=1.0)(4) == pytest.approx(0.2)
    hinge = HingeStaleness(a=10.0, b=4)
    assert [hinge(t) for t in (0, 4)] == [1.0, 1.0]
    assert hinge(5) == pytest.approx(1 / 11) and hinge(6) == pytest.approx(1 / 21)


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["constant", "polynomial", "hinge"]),
    a=st.floats(0.01, 5.0),
    b=st.integers(0, 10),
    taus=st.lists(st.integers(0, 500), min_size=2, max_size=10),
)
def test_staleness_weights_start_at_one_lie_in_unit_interval_and_never_grow(kind, a, b, taus):
    fn = {"constant": ConstantStaleness(), "polynomial": PolynomialStaleness(a=a), "hinge": HingeStaleness(a=a, b=b)}[kind]
    assert fn(0) == 1.0
    values = [fn(t) for t in sorted(taus)]
    assert all(0.0 < v <= 1.0 for v in values)
    assert all(x >= y for x, y in zip(values, values[1:]))


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: PolynomialStaleness(a=-1.0), ConfigError, "a must be a finite number >= 0, got -1.0"),
        (lambda: HingeStaleness(a=0.0), ConfigError, "a must be a finite number > 0, got 0.0"),
        (lambda: HingeStaleness(b=-1), ConfigError, "b must be >= 0, got -1"),
        (lambda: PolynomialStaleness()(-1), ValueError, "staleness must be >= 0, got -1"),
        (lambda: HingeStaleness()(1.5), TypeError, "staleness must be an int, got 1.5"),
        (lambda: FedBuff(buffer_size=0, concurrency=2), ConfigError, "buffer_size must be >= 1, got 0"),
        (lambda: FedBuff(buffer_size=2, concurrency=0), ConfigError, "concurrency must be >= 1, got 0"),
        (lambda: FedBuff(buffer_size=2, concurrency=2, max_staleness=-1), ConfigError, "max_staleness must be >= 0, got -1"),
        (lambda: FedBuff(buffer_size=2, concurrency=2, staleness=0.5), TypeError, "staleness must be a Staleness"),
        (lambda: FedAsync(alpha=0.0), ConfigError, r"alpha must be in \(0, 1\], got 0.0"),
        (lambda: FedAsync(alpha=1.5), ConfigError, r"alpha must be in \(0, 1\], got 1.5"),
        (lambda: LogNormal(median=0.0), ConfigError, "median must be a finite number > 0, got 0.0"),
        (lambda: Exponential(mean=-1.0), ConfigError, "mean must be a finite number >= 0, got -1.0"),
        (lambda: VirtualClock(speed=Constant(0.0)), ConfigError, r"speed must draw values > 0, got Constant\(0.0\)"),
        (lambda: VirtualClock(seconds_per_example=float("nan")), ConfigError, "seconds_per_example must be a finite"),
    ],
)
def test_bad_settings_name_the_parameter(make, error, message):
    with pytest.raises(error, match=message):
        make()


# ---------------------------------------------------------------- virtual clock
def test_clock_durations():
    clock = VirtualClock(speed=Constant(2.0), latency=Constant(0.5), seconds_per_example=0.01)
    rng = np.random.default_rng(0)
    assert clock.job_duration(examples=100, speed=clock.client_speed(rng), rng=rng) == pytest.approx(1.0)
    random_clock = VirtualClock(speed=LogNormal(1.0, 0.5), latency=Exponential(0.2))
    draws = [random_clock.client_speed(np.random.default_rng(s)) for s in (1, 1, 2)]
    assert draws[0] == draws[1] != draws[2] and min(draws) > 0
    assert random_clock.job_duration(examples=10, speed=1.0, rng=np.random.default_rng(3)) >= 10 * 1e-3


# ---------------------------------------------------------------- FedBuff
def test_fedbuff_is_deterministic_under_a_seed_and_changes_with_it():
    def run(seed):
        fed = _federation(num_clients=6, seed=seed)
        runner = AsyncFederation(fed, schedule=FedBuff(buffer_size=2, concurrency=4), clock=VirtualClock())
        runner.run(6)
        return runner

    a, b, c = run(7), run(7), run(8)
    assert np.array_equal(a.global_vector, b.global_vector)
    assert _strip(a.history) == _strip(b.history)
    assert not np.array_equal(a.global_vector, c.global_vector)
    assert [h["virtual_time"] for h in a.history] != [h["virtual_time"] for h in c.history]
    times = [h["virtual_time"] for h in a.history]
    assert times == sorted(times) and a.history[-1]["client_updates"] == 12


def test_fedbuff_staleness_and_weighted_updates_as_specified():
    """Constant clock, 4 clients always busy, K=1: every arrival is an update; staleness by hand."""
    fed = _federation(executor=SpyExecutor(ToyTask()))
    staleness = PolynomialStaleness(a=0.5)
    runner = AsyncFederation(fed, schedule=FedBuff(buffer_size=1, concurrency=4, staleness=staleness), clock=EXACT_CLOCK)
    vectors = [runner.global_vector.astype(np.float64)]
    for _ in range(8):
        runner.step()
        vectors.append(runner.global_vector.astype(np.float64))
    hist = runner.history
    assert [h["clients"][0] for h in hist] == ["client-0", "client-1", "client-2", "client-3"] * 2
    assert [h["staleness"][0] for h in hist] == [0, 1, 2, 3, 3, 3, 3, 3]
    assert [h["virtual_time"] for h in hist] == [40, 45, 50, 55, 80, 90, 100, 110]
    spy = fed.executor
    for t, h in enumerate(hist, start=1):
        tau = h["staleness"][0]
        assert h["staleness_weights"][0] == staleness(tau)
        delta = spy.results[(h["clients"][0], t - tau)].update.astype(np.float64)
        np.testing.assert_allclose(vectors[t] - vectors[t - 1], staleness(tau) * delta, rtol=1e-5, atol=1e-7)
    assert spy.calls < 8  # jobs in flight are trained together, not one call per arrival


def test_max_staleness_refuses_old_results():
    fed = _federation()
    runner = AsyncFederation(fed, schedule=FedBuff(buffer_size=1, concurrency=4, max_staleness=2), clock=EXACT_CLOCK)
    runner.run(5)
    assert all(max(h["staleness"]) <= 2 for h in runner.history)
    assert runner.discarded > 0 and runner.received == runner.applied + runner.discarded


def test_local_state_changes_when_the_job_finishes_in_virtual_time():
    fed = _federation()
    runner = AsyncFederation(fed, schedule=FedBuff(buffer_size=1, concurrency=4), clock=EXACT_CLOCK)
    runner.step()  # client-0 arrived; the other three jobs were trained already, but are still in flight
    assert fed.clients["client-0"].local_state
    assert all(not fed.clients[c].local_state for c in ("client-1", "client-2", "client-3"))
    assert len(runner._snapshots) <= runner.schedule.concurrency + 1


def test_fedbuff_masked_per_buffer_equals_plaintext_within_the_encoding_error():
    def run(backend):
        pipeline = UpdatePipeline(backend=backend, clip=dp.L2Clip(1.0), weighting="uniform")
        fed = _federation(num_clients=5, pipeline=pipeline)
        runner = AsyncFederation(fed, schedule=FedBuff(buffer_size=3, concurrency=4), clock=VirtualClock())
        runner.run(4)
        return runner

    plain = run(None)
    masked = run(MaskedSum(value_bound=1.0, max_clients=5))
    assert [h["clients"] for h in plain.history] == [h["clients"] for h in masked.history]
    assert all(h["contributors"] == 3 for h in masked.history)
    assert masked.history[0]["bytes_up"] > plain.history[0]["bytes_up"]
    np.testing.assert_allclose(masked.global_vector, plain.global_vector, atol=1e-4)


def test_each_buffer_is_one_mechanism_use_in_the_ledger():
    noise = dp.CentralGaussian(noise_multiplier=1.0, clip_bound=1.0)
    pipeline = UpdatePipeline(clip=dp.L2Clip(1.0), weighting="uniform", central_noise=noise)
    ledger = dp.Ledger()
    fed = _federation(num_clients=5, pipeline=pipeline, ledger=ledger)
    runner = AsyncFederation(fed, schedule=FedBuff(buffer_size=2, concurrency=3), clock=VirtualClock())
    runner.run(3)
    events = ledger.events
    assert [e.round_index for e in events] == [1, 2, 3]
    assert all(isinstance(e, dp.GaussianEvent) for e in events)
    assert all((e.participants, e.survivors, e.sample_rate, e.sampling) == (2, 2, 1.0, "full") for e in events)
    assert pipeline.expected_clients == 2.0  # the fixed denominator is the buffer size


def test_budget_stops_before_the_update_that_would_exceed_it():
    noise = dp.CentralGaussian(noise_multiplier=1.0, clip_bound=1.0)
    pipeline = UpdatePipeline(clip=dp.L2Clip(1.0), weighting="uniform", central_noise=noise)
    ledger = dp.Ledger()
    budget = dp.PrivacyBudget(epsilon=5.0, delta=1e-5)  # one update costs 4.73, two would cost 7.08
    fed = _federation(num_clients=4, pipeline=pipeline, ledger=ledger, budget=budget)
    runner = AsyncFederation(fed, schedule=FedBuff(buffer_size=2, concurrency=2), clock=VirtualClock())
    runner.run(50)
    assert runner.stop_reason is not None and "would be exceeded" in runner.stop_reason
    assert runner.version == 1 and len(ledger) == 1
    assert dp.epsilon(ledger, delta=1e-5) <= 5.0


def test_clients_refusing_past_their_own_budget_end_an_asynchronous_run_cleanly():
    """Refused jobs fill no buffer: the run stops, naming why, instead of dispatching refused clients forever."""
    privacy = dp.SampleLevelDP(noise_multiplier=1.0, max_grad_norm=1.0)
    probe = _federation(sample_privacy=privacy, ledger=dp.Ledger())
    probe.run(2)
    limit = 1.0001 * max(dp.sample_level_epsilons(probe.ledger, delta=1e-5).values())  # two updates fit a client
    budget = dp.PrivacyBudget(epsilon=limit, delta=1e-5, level="sample")
    fed = _federation(sample_privacy=privacy, ledger=dp.Ledger(), budget=budget)
    fed.budget = None  # the server does not stop itself: the clients' own ledgers must
    runner = AsyncFederation(fed, schedule=FedBuff(buffer_size=2, concurrency=4), clock=VirtualClock())
    runner.run(100)
    assert runner.stop_reason is not None and "refused to go past their own privacy budget" in runner.stop_reason
    spent = {cid: dp.sample_level_epsilons(ledger, delta=1e-5).get(cid, 0.0) for cid, ledger in fed.client_side.spent.items()}
    assert 0 < max(spent.values()) <= limit and runner.version < 100


def test_an_update_that_fails_after_its_buffer_was_released_is_charged_and_uses_its_number():
    privacy = dp.SampleLevelDP(noise_multiplier=1.0, max_grad_norm=1.0)
    fed = _federation(sample_privacy=privacy, ledger=dp.Ledger())
    runner = AsyncFederation(fed, schedule=FedBuff(buffer_size=2, concurrency=2), clock=VirtualClock())
    runner.run(1)
    before, apply = fed.global_vector.copy(), fed.strategy.apply
    fed.strategy.apply = lambda vector, aggregate: (_ for _ in ()).throw(RuntimeError("the server's step broke"))
    with pytest.raises(RuntimeError, match="the server's step broke"):
        runner.step()  # the buffer's plaintext updates had reached the server
    fed.strategy.apply = apply
    assert runner.version == 2 and runner.history[-1]["interrupted"] and np.array_equal(fed.global_vector, before)
    assert sorted({e.round_index for e in fed.ledger.events}) == [1, 2]
    runner.run(3)
    assert sorted({e.round_index for e in fed.ledger.events}) == [1, 2, 3]


# ---------------------------------------------------------------- FedAsync
def test_fedasync_mixes_each_result_as_specified():
    fed = _federation(executor=SpyExecutor(ToyTask()))
    schedule = FedAsync(alpha=0.6, concurrency=4, staleness=HingeStaleness(a=1.0, b=1))
    runner = AsyncFederation(fed, schedule=schedule, clock=EXACT_CLOCK)
    vectors = [runner.global_vector.astype(np.float64)]
    for _ in range(8):
        runner.step()
        vectors.append(runner.global_vector.astype(np.float64))
    for t, h in enumerate(runner.history, start=1):
        tau = h["staleness"][0]
        a_t = 0.6 * schedule.staleness(tau)
        delta = fed.executor.results[(h["clients"][0], t - tau)].update.astype(np.float64)
        expected = (1 - a_t) * vectors[t - 1] + a_t * (vectors[t - 1 - tau] + delta)
        np.testing.assert_allclose(vectors[t], expected, rtol=1e-5, atol=1e-6)
    assert [h["staleness"][0] for h in runner.history] == [0, 1, 2, 3, 3, 3, 3, 3]


def test_async_learns_the_toy_task():
    fed = _federation(num_clients=6, evaluate_every=8)
    before = fed.evaluate()["accuracy"]
    runner = AsyncFederation(fed, schedule=FedAsync(alpha=0.6, concurrency=3), clock=VirtualClock())
    history = runner.run(8)
    assert history[-1]["test_accuracy"] > before and history[-1]["test_accuracy"] >= 0.8


@pytest.mark.parametrize(
    "kwargs, schedule, message",
    [
        ({}, FedBuff(buffer_size=2, concurrency=5), "concurrency must be <= the 4 clients, got 5"),
        (
            {"strategy": ModelSelection(metric="accuracy"), "allow_reveal": True},
            FedBuff(buffer_size=2, concurrency=2),
            "asynchronous rounds support aggregating strategies only",
        ),
        (
            {
                "pipeline": UpdatePipeline(
                    backend=MaskedSum(value_bound=1.0, max_clients=4), clip=dp.L2Clip(1.0), weighting="uniform"
                )
            },
            FedAsync(concurrency=2),
            "FedAsync applies one client's update at a time, which aggregation mode 'masked' cannot protect",
        ),
        ({"strategy": FedAdam()}, FedAsync(concurrency=2), "FedAsync replaces the server step by mixing"),
    ],
)
def test_incompatible_federations_are_refused(kwargs, schedule, message):
    with pytest.raises(ConfigError, match=message):
        AsyncFederation(_federation(**kwargs), schedule=schedule)


def test_staleness_weight_above_one_is_refused():
    class Boost:
        name = "boost"

        def __call__(self, staleness):
            return 2.0

    runner = AsyncFederation(_federation(), schedule=FedBuff(buffer_size=1, concurrency=2, staleness=Boost()))
    with pytest.raises(ConfigError, match=r"gave weight 2.0 at staleness 0; weights must lie in \(0, 1\]"):
        runner.step()
    assert math.isfinite(runner.now)
