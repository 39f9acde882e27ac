"""The party boundary: what the server party receives, holds and can recompute."""

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import dp
import secagg
from fedcore import FedAvg, Federation, InProcessExecutor, TrainConfig, UpdatePipeline
from fedcore.rounds.parties import Randomness
from fedcore.strategies.attacks import InjectedUpdates

from .toy import ToyTask, toy_clients

TRAIN = TrainConfig(lr=0.05, epochs=1, batch_size=8)
FEATURES = 40  # 41 shared parameters: a float32 update spans 164 bytes, so 64-byte windows are meaningful


def _backend(mode):
    if mode == "masked":
        return secagg.MaskedSum(value_bound=1.0, max_clients=8, signed_keys=True)
    if mode == "ckks":
        return secagg.CKKSSum(value_bound=1.0, max_clients=8)
    return secagg.BFVSum(value_bound=1.0, max_clients=8)


def _federation(pipeline, **kwargs):
    return Federation(
        task=ToyTask(FEATURES), clients=toy_clients(5, features=FEATURES), strategy=FedAvg(), train=TRAIN,
        pipeline=pipeline, seed=3, quiet=True, evaluate_every=0, **kwargs,
    )  # fmt: skip


def _windows(vector: np.ndarray, width: int = 64):
    data = np.ascontiguousarray(vector, dtype="<f4").tobytes()
    return [data[i : i + width] for i in range(0, len(data) - width + 1, 4)]


@pytest.mark.parametrize("mode", ["masked", "ckks", "bfv"])
def test_wiretap_on_the_server_finds_no_update_and_no_client_secret(mode):
    pipeline = UpdatePipeline(backend=_backend(mode), clip=dp.L2Clip(1.0), max_examples=100)
    fed = _federation(pipeline, reproducible=True, record_inbox=True)
    upcoming = fed.client_updates()  # what the clients will compute in round 1 (reproducible simulation)
    fed.run_round()
    assert fed.history[-1]["contributors"] == 5
    received = b"".join(r.data for r in fed.channel.inbox)
    assert received, "the wiretap recorded nothing"
    for result in upcoming:
        prepared = pipeline.prepare(result.update, num_examples=result.num_examples)
        for vector in (result.update, prepared, prepared[:-1]):
            leaked = [w for w in _windows(vector) if w in received]
            assert not leaked, f"{len(leaked)} windows of {result.client_id}'s update reached the server"
    # the server party's own state: public keys (32 raw bytes each) and a public HE context only
    server_state = {k: v for k, v in vars(fed).items() if k not in ("client_side", "channel")}
    assert not any(isinstance(v, Ed25519PrivateKey) for v in server_state.values())
    if mode == "masked":
        assert set(fed.public_keys) == set(fed.client_ids) and all(len(k) == 32 for k in fed.public_keys.values())
    else:
        assert fed.public_context is not None


def _noised_round(*, reproducible: bool):
    """One masked round with distributed Skellam noise over fixed, known client inputs."""
    clients = toy_clients(4, features=FEATURES)
    rng = np.random.default_rng(0)
    inputs = {cid: rng.uniform(-0.1, 0.1, FEATURES + 1).astype(np.float32) for cid in clients}
    length = FEATURES + 1
    noise = dp.SkellamNoise(noise_multiplier=1.0, clip_bound=1.0, dim=length, min_clients=3)
    backend = secagg.MaskedSum(value_bound=1.0, max_clients=4, integer_noise=noise)
    pipeline = UpdatePipeline(backend=backend, clip=dp.L2Clip(1.0), weighting="uniform")
    task = ToyTask(FEATURES)
    fed = Federation(
        task=task, clients=clients, strategy=FedAvg(), train=TRAIN, pipeline=pipeline,
        executor=InjectedUpdates(InProcessExecutor(task), updates=inputs), seed=3, reproducible=reproducible,
        quiet=True, evaluate_every=0,
    )  # fmt: skip
    fed.train_clients(1, fed.client_ids, version=0)
    released = fed.protected_sum(1, fed.client_ids).sum_result.total
    true_sum = np.sum([pipeline.prepare(v, num_examples=1) for v in inputs.values()], axis=0)
    return fed, backend, noise, released, true_sum


def _replay_noise(fed, backend):
    """The attack: replay every client's generator from the run's seed and re-draw its noise.

    Encoding zeros with a client's generator draws the same rounding and noise values as its
    real input did, so the encoded result is exactly that client's noise.
    """
    guess = Randomness(fed.seed)
    words = [
        backend.encode_client(
            np.zeros(fed.layout.size, np.float32), rng=guess.generator(round_index=1, party=cid, purpose="protect")
        )
        for cid in fed.client_ids
    ]
    total = np.sum([backend.encoder.to_signed(w) for w in words], axis=0)
    return total / backend.encoder.scale


def test_a_server_knowing_the_seed_cannot_remove_the_distributed_noise():
    fed, backend, noise, released, true_sum = _noised_round(reproducible=False)
    residual = released - _replay_noise(fed, backend) - true_sum
    noise_std = np.sqrt(4 * noise.per_client_variance(scale=backend.encoder.scale)) / backend.encoder.scale
    assert np.std(residual) > 0.5 * noise_std  # the attempt leaves an error of the noise's size


def test_in_a_reproducible_simulation_the_same_replay_removes_the_noise_as_the_report_says():
    """The positive control: the replay above is a working attack whenever the seed decides the noise."""
    fed, backend, noise, released, true_sum = _noised_round(reproducible=True)
    residual = released - _replay_noise(fed, backend) - true_sum
    noise_std = np.sqrt(4 * noise.per_client_variance(scale=backend.encoder.scale)) / backend.encoder.scale
    assert np.max(np.abs(residual)) <= 4 * backend.encoder.step < 0.01 * noise_std


def test_randomness_is_fresh_by_default_and_derived_only_in_simulation():
    fresh = Randomness()
    assert fresh.seed(round_index=1, party="a", purpose="train") != fresh.seed(round_index=1, party="a", purpose="train")
    sim = Randomness(5)
    assert sim.seed(round_index=1, party="a", purpose="train") == Randomness(5).seed(round_index=1, party="a", purpose="train")
    assert sim.seed(round_index=1, party="a", purpose="train") != sim.seed(round_index=1, party="b", purpose="train")
    with pytest.raises(Exception, match="simulation_seed must be an int or None"):
        Randomness("5")  # type: ignore[arg-type]


def test_a_server_asking_for_scores_on_the_clients_training_data_or_an_unnoised_score_is_refused():
    """The attacks: exact metrics of the training data (a neighbouring record moves them), and a 'noised' score at
    multiplier 0; the server's own API refuses the first, each client refuses both whatever the server sends."""
    from fedcore import ConfigError
    from fedcore.rounds import messages as msg
    from secagg import ProtocolError

    fed = _federation(UpdatePipeline(backend=_backend("plaintext"), clip=dp.L2Clip(1.0), max_examples=100))
    with pytest.raises(ConfigError, match="split must be one of the clients' held-out splits"):
        fed.evaluate("train")
    train = msg.encode(msg.Kind.EVALUATE, {"split": "train"}, fed.global_vector)
    with pytest.raises(ProtocolError, match="scores the global model on its held-out splits"):
        fed.channel.send("client-0", train)
    noise = {"metric": "accuracy", "multiplier": 0.0, "per": "mean", "round": 0}
    exact = msg.encode(msg.Kind.EVALUATE, {"split": "validation", "noise": noise}, fed.global_vector)
    with pytest.raises(ProtocolError, match="positive noise multiplier only, got 0.0"):
        fed.channel.send("client-0", exact)
    assert fed.evaluate("test")  # the held-out splits are still scored
