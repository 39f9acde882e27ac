"""Every protected path against the plaintext reference, through fedcore's pipeline."""

import numpy as np
import pytest

import dp
import secagg
from fedcore import ConfigError, FedAvg, Federation, TrainConfig, UpdatePipeline
from fedcore.rounds.client import ClientResult
from secagg import Stage

from .toy import ToyTask, run_pipeline, toy_clients

CLIP = 1.0


def _results(n=6, d=300, seed=0):
    rng = np.random.default_rng(seed)
    return [ClientResult(f"c{i}", rng.normal(0, 0.2, d).astype(np.float32), int(rng.integers(10, 100))) for i in range(n)]


def _backends():
    return {
        "masked": secagg.MaskedSum(value_bound=CLIP, max_clients=8),
        "masked-secagg+": secagg.MaskedSum(value_bound=CLIP, max_clients=8, graph="secagg+"),
        "ckks": secagg.CKKSSum(value_bound=CLIP, max_clients=8),
    }


@pytest.mark.parametrize("mode", ["masked", "masked-secagg+", "ckks"])
@pytest.mark.parametrize("weighting", ["examples", "uniform"])
def test_protected_mean_equals_plaintext_within_stated_bound(mode, weighting):
    results = _results()
    ref = UpdatePipeline(clip=dp.L2Clip(CLIP), weighting=weighting, max_examples=100)
    ref.build(dimension=300, num_clients=6, expected_clients=6)
    pipe = UpdatePipeline(backend=_backends()[mode], clip=dp.L2Clip(CLIP), weighting=weighting, max_examples=100)
    pipe.build(dimension=300, num_clients=6, expected_clients=6)
    dropouts = {"c2": Stage.SHARE_KEYS}
    expect = run_pipeline(ref, results, round_index=1, rng=np.random.default_rng(1), dropouts=dropouts)
    got = run_pipeline(pipe, results, round_index=1, rng=np.random.default_rng(1), dropouts=dropouts)
    err = got.sum_result.max_abs_error
    assert 0 < err < 1e-3
    assert got.aggregate.contributors == expect.aggregate.contributors == 5
    if weighting == "uniform":
        bound = err / 5
    else:  # mean = s / w with |ds| <= err and |dw| <= err: first-order bound
        w = float(expect.sum_result.total[-1])
        s = np.abs(expect.sum_result.total[:-1]).max()
        bound = err / w + s * err / (w * (w - err))
    assert np.max(np.abs(got.aggregate.mean - expect.aggregate.mean)) <= bound


@pytest.mark.parametrize("mode", ["plaintext", "masked", "ckks"])
def test_a_later_round_leaves_earlier_aggregates_and_inputs_untouched(mode):
    """What a round returned, and the clients' inputs, must not change in a later round."""
    backend = secagg.PlaintextSum() if mode == "plaintext" else _backends()[mode]
    pipe = UpdatePipeline(backend=backend, clip=dp.L2Clip(CLIP), max_examples=100)
    pipe.build(dimension=300, num_clients=6, expected_clients=6)
    first_results = _results(seed=0)
    inputs = [r.update.copy() for r in first_results]
    first = run_pipeline(pipe, first_results, round_index=1, rng=np.random.default_rng(1))
    kept_mean, kept_total = first.aggregate.mean.copy(), first.sum_result.total.copy()
    second = run_pipeline(pipe, _results(n=4, seed=5), round_index=2, rng=np.random.default_rng(2))
    np.testing.assert_array_equal(first.aggregate.mean, kept_mean)
    np.testing.assert_array_equal(first.sum_result.total, kept_total)
    assert all(np.array_equal(r.update, x) for r, x in zip(first_results, inputs))
    assert not np.array_equal(second.aggregate.mean, kept_mean)


def test_update_of_another_length_refused_naming_the_client():
    pipe = UpdatePipeline(max_examples=100)
    pipe.build(dimension=300, num_clients=6, expected_clients=6)
    results = _results(n=3)
    results[2] = ClientResult("c2", np.zeros(299, np.float32), 10)
    with pytest.raises(ValueError, match=r"update of client 'c2' has length 300, expected 301 like the others"):
        run_pipeline(pipe, results, round_index=1, rng=np.random.default_rng(1))


def _federation(backend, **kw):
    return Federation(
        task=ToyTask(), clients=toy_clients(5), strategy=FedAvg(), train=TrainConfig(lr=0.05, batch_size=8),
        pipeline=UpdatePipeline(backend=backend, clip=dp.L2Clip(CLIP), max_examples=100), seed=3, reproducible=True, quiet=True, **kw,
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["masked", "ckks"])
def test_federated_round_matches_plaintext(mode):
    plain = _federation(secagg.PlaintextSum())
    protected = _federation(_backends()[mode])
    plain.run_round()
    protected.run_round()
    np.testing.assert_allclose(protected.global_vector, plain.global_vector, atol=1e-5)


def test_distributed_skellam_noise_under_masking_records_ledger_events():
    dim = ToyTask().build_model().linear.weight.numel() + 1
    noise = dp.SkellamNoise(noise_multiplier=0.5, clip_bound=CLIP, dim=dim, min_clients=3)
    backend = secagg.MaskedSum(value_bound=CLIP, max_clients=5, integer_noise=noise)
    fed = Federation(
        task=ToyTask(), clients=toy_clients(5), strategy=FedAvg(), train=TrainConfig(lr=0.05, batch_size=8),
        pipeline=UpdatePipeline(backend=backend, clip=dp.L2Clip(CLIP), weighting="uniform"),
        ledger=dp.Ledger(), seed=3, quiet=True,
    )  # fmt: skip
    fed.run(2)
    events = fed.ledger.events
    assert [type(e).__name__ for e in events] == ["SkellamEvent", "SkellamEvent"]
    assert events[0].survivors == 5 and events[0].scale == backend.encoder.scale
    assert dp.epsilon(fed.ledger, delta=1e-5) > 0


def test_central_noise_needs_uniform_weighting_and_clip():
    central = dp.CentralGaussian(noise_multiplier=1.0, clip_bound=CLIP)
    with pytest.raises(ConfigError, match="client-level DP needs weighting='uniform'"):
        UpdatePipeline(clip=dp.L2Clip(CLIP), central_noise=central, max_examples=5).build(
            dimension=3, num_clients=2, expected_clients=2
        )
    with pytest.raises(ConfigError, match="client-level DP noise needs clip"):
        UpdatePipeline(central_noise=central, weighting="uniform").build(dimension=3, num_clients=2, expected_clients=2)


def test_clip_above_value_bound_refused():
    pipe = UpdatePipeline(backend=secagg.MaskedSum(value_bound=0.5, max_clients=4), clip=dp.L2Clip(1.0), max_examples=5)
    with pytest.raises(ConfigError, match=r"clip bound 1.0 exceeds the masked backend's value_bound=0.5"):
        pipe.build(dimension=3, num_clients=2, expected_clients=2)


def test_revealing_strategy_refused_under_masking():
    from fedcore import ModelSelection

    with pytest.raises(ConfigError, match="needs individual local models, which 'masked' aggregation exists to hide"):
        Federation(
            task=ToyTask(), clients=toy_clients(3), strategy=ModelSelection(metric="accuracy"), train=TrainConfig(),
            pipeline=UpdatePipeline(backend=_backends()["masked"], clip=dp.L2Clip(CLIP), max_examples=100),
            allow_reveal=True, quiet=True,
        )  # fmt: skip


def test_noise_takes_its_sensitivity_from_the_clip_stage_and_its_size_from_the_vector():
    """The audit's case: clip 2.0 with noise sized for 1.0 would record twice the true noise multiplier."""
    central = dp.CentralGaussian(noise_multiplier=1.0, clip_bound=1.0)
    pipe = UpdatePipeline(clip=dp.L2Clip(2.0), central_noise=central, weighting="uniform")
    with pytest.raises(ConfigError, match=r"central_noise.clip_bound=1.0 differs from the clip stage's bound 2.0"):
        pipe.build(dimension=4, num_clients=4, expected_clients=4)
    noise = dp.SkellamNoise(noise_multiplier=1.0, clip_bound=CLIP, dim=10, min_clients=3)
    masked = secagg.MaskedSum(value_bound=CLIP, max_clients=4, integer_noise=noise)
    pipe = UpdatePipeline(backend=masked, clip=dp.L2Clip(CLIP), weighting="uniform")
    with pytest.raises(ConfigError, match=r"integer_noise.dim=10 but clients send 4 coordinates"):
        pipe.build(dimension=4, num_clients=4, expected_clients=4)


def test_masking_a_single_client_is_refused():
    pipe = UpdatePipeline(backend=secagg.MaskedSum(value_bound=CLIP, max_clients=4), clip=dp.L2Clip(CLIP), weighting="uniform")
    with pytest.raises(ConfigError, match=r"'masked' with 1 client\(s\) per round protects nothing"):
        pipe.build(dimension=4, num_clients=1, expected_clients=1)


def _adaptive_federation(backend=None, *, rounds):
    clip = dp.AdaptiveClip(initial_bound=5.0, target_quantile=0.5, learning_rate=0.5, count_noise_multiplier=2.0)
    pipeline = UpdatePipeline(
        backend=backend, clip=clip, weighting="uniform",
        central_noise=dp.CentralGaussian(noise_multiplier=0.05, clip_bound=5.0),
    )  # fmt: skip
    fed = Federation(
        task=ToyTask(), clients=toy_clients(8), strategy=FedAvg(), train=TrainConfig(lr=0.05, batch_size=8),
        pipeline=pipeline, ledger=dp.Ledger(), seed=3, reproducible=True, quiet=True, evaluate_every=0,
    )  # fmt: skip
    bounds = [clip.bound]
    for _ in range(rounds):
        fed.run_round()
        bounds.append(clip.bound)
    return fed, clip, bounds


@pytest.mark.parametrize("mode", ["plaintext", "masked"])
def test_adaptive_clip_moves_the_bound_toward_its_target_quantile_with_its_events_in_the_ledger(mode):
    backend = None if mode == "plaintext" else secagg.MaskedSum(value_bound=5.0, max_clients=8)
    fed, clip, bounds = _adaptive_federation(backend, rounds=12)
    norms = sorted(float(np.linalg.norm(r.update)) for r in fed.client_updates())
    median = norms[len(norms) // 2]
    assert bounds[0] / median > 10  # it started far above every update
    assert abs(np.log(bounds[-1] / median)) < np.log(2.5)  # and came to the median, within noise
    kinds = [type(e).__name__ for e in fed.ledger.events]
    assert kinds.count("QuantileEvent") == 12 and kinds.count("GaussianEvent") == 12
    quantile = [e for e in fed.ledger.events if type(e).__name__ == "QuantileEvent"]
    assert [e.bound_after for e in quantile] == pytest.approx(bounds[1:])


def test_adaptive_clip_refuses_fixed_size_integer_noise_and_needs_quantile_noise():
    clip = dp.AdaptiveClip(initial_bound=1.0, count_noise_multiplier=1.0)
    noise = dp.SkellamNoise(noise_multiplier=1.0, clip_bound=1.0, dim=5, min_clients=3)
    masked = secagg.MaskedSum(value_bound=1.0, max_clients=4, integer_noise=noise)
    pipe = UpdatePipeline(backend=masked, clip=clip, weighting="uniform")
    with pytest.raises(ConfigError, match="adaptive clipping moves the clip bound each round"):
        pipe.build(dimension=4, num_clients=4, expected_clients=4)
    with pytest.raises(dp.DPValueError, match="count_noise_multiplier"):
        dp.AdaptiveClip(initial_bound=1.0, count_noise_multiplier=0.0)


def test_budget_is_checked_against_the_fewest_survivors_the_protocol_allows():
    """Distributed noise shrinks with the survivors: a round is planned as if only `threshold` survive."""
    dim = ToyTask().build_model().linear.weight.numel() + 1
    noise = dp.SkellamNoise(noise_multiplier=0.5, clip_bound=CLIP, dim=dim, min_clients=3)
    backend = secagg.MaskedSum(value_bound=CLIP, max_clients=5, integer_noise=noise, dropout_rate=0.4)
    fed = Federation(
        task=ToyTask(), clients=toy_clients(5), strategy=FedAvg(), train=TrainConfig(lr=0.05, batch_size=8),
        pipeline=UpdatePipeline(backend=backend, clip=dp.L2Clip(CLIP), weighting="uniform"),
        ledger=dp.Ledger(), seed=3, reproducible=True, quiet=True, evaluate_every=0,
    )  # fmt: skip
    threshold = backend.plan(5).threshold
    assert threshold < 5
    (planned,) = fed._planned_events(1, fed.client_ids, 1.0)
    assert planned.survivors == threshold
    all_survive = noise.event(round_index=1, scale=backend.encoder.scale, participants=5, survivors=5)
    worst = dp.epsilon(dp.Ledger([planned]), delta=1e-5)
    assert worst > dp.epsilon(dp.Ledger([all_survive]), delta=1e-5)  # planning for everyone would under-state it


def test_a_fixed_clip_never_grows_at_the_servers_word():
    """A lying server announcing a larger bound must not widen what a client sends (its noise is sized for CLIP)."""
    pipe = UpdatePipeline(clip=dp.L2Clip(CLIP), weighting="uniform")
    pipe.build(dimension=3, num_clients=2, expected_clients=2)
    sent = pipe.prepare(np.array([30.0, 40.0, 0.0], dtype=np.float32), num_examples=1, clip_bound=100.0)
    assert np.linalg.norm(sent.astype(np.float64)) <= CLIP
    smaller = pipe.prepare(np.array([30.0, 40.0, 0.0], dtype=np.float32), num_examples=1, clip_bound=0.5)
    assert np.linalg.norm(smaller.astype(np.float64)) == pytest.approx(0.5, rel=1e-6)


def test_a_server_that_asks_a_masked_run_s_client_to_reveal_its_update_is_refused():
    """The attack: under masking, the server sends TRAIN, then REVEAL for the raw update the mask exists to hide."""
    from fedcore.rounds import messages as msg
    from secagg import ProtocolError

    fed = _federation(_backends()["masked"])
    report = msg.decode(
        fed.channel.send("client-0", msg.encode(msg.Kind.TRAIN, {"round": 1, "version": 0}, fed.global_vector)),
        expect=msg.Kind.TRAIN_REPORT,
    )
    assert report.header["ok"]
    with pytest.raises(ProtocolError, match="client 'client-0' refuses to reveal its update"):
        fed.channel.send("client-0", msg.encode(msg.Kind.REVEAL, {"round": 1}))
