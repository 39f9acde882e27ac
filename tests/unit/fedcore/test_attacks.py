"""Attack simulations: who attacks, what each attack sends, label flips, injected (canary) updates."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

import dp
from dp.audit import draw_canaries, run_canary_audit
from fedcore import ClientData, ClientResult, ConfigError, FedAvg, Federation, InProcessExecutor, TrainConfig, UpdatePipeline
from fedcore.strategies.attacks import (
    GaussianAttack,
    InjectedUpdates,
    LabelFlippedDataset,
    PoisonedExecutor,
    Scaling,
    SignFlip,
    choose_attackers,
    flip_binary_labels,
    flip_implicit_feedback,
    label_flip,
)
from fedcore.workloads.recsys import InteractionDataset, leave_one_out

from .toy import ToyTask, toy_clients

TRAIN = TrainConfig(lr=0.05, epochs=1, batch_size=8)


class _FixedExecutor:
    """Returns a known update per client (and counts who it was asked to train)."""

    name = "fixed"

    def __init__(self, updates):
        self.updates = updates
        self.trained: list[str] = []

    def fit(self, clients, *, global_vector, config, seeds, round_index, update_kind, privacy):
        self.trained += [c.client_id for c in clients]
        return [ClientResult(c.client_id, self.updates[c.client_id].copy(), 10) for c in clients]

    def evaluate(self, clients, *, global_vector, split):
        return [({}, 0) for _ in clients]


def _fit(executor, ids, round_index=1):
    clients = [type("C", (), {"client_id": cid})() for cid in ids]
    return executor.fit(
        clients,
        global_vector=None,
        config=TRAIN,
        seeds=[0] * len(ids),
        round_index=round_index,
        update_kind="delta",
        privacy=None,
    )


# ----------------------------------------------------------------------------- choosing attackers


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), fraction=st.floats(0.0, 1.0), seed=st.integers(0, 2**32 - 1))
def test_choose_attackers_takes_at_least_the_fraction(n, fraction, seed):
    ids = [f"c{i}" for i in range(n)]
    chosen = choose_attackers(ids, fraction=fraction, rng=np.random.default_rng(seed))
    assert len(chosen) == min(n, int(np.ceil(fraction * n - 1e-9)))
    assert len(set(chosen)) == len(chosen) and set(chosen) <= set(ids)
    assert len(chosen) >= fraction * n - 1e-6
    assert chosen == choose_attackers(list(reversed(ids)), fraction=fraction, rng=np.random.default_rng(seed))


def test_choose_attackers_examples_and_refusals():
    ids = [f"silo-{i}" for i in range(5)]
    assert len(choose_attackers(ids, fraction=0.1, rng=np.random.default_rng(0))) == 1  # ceil(0.5)
    assert choose_attackers(ids, fraction=0.0, rng=np.random.default_rng(0)) == ()
    with pytest.raises(ConfigError, match=re.escape("fraction must be a number in [0, 1], got 1.5")):
        choose_attackers(ids, fraction=1.5, rng=np.random.default_rng(0))
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator, got int"):
        choose_attackers(ids, fraction=0.1, rng=0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="client_ids must name at least one client"):
        choose_attackers([], fraction=0.1, rng=np.random.default_rng(0))


# ----------------------------------------------------------------------------- model poisoning


def test_attacks_send_what_they_say():
    update = np.array([1.0, -2.0, 0.5], dtype=np.float32)
    rng = np.random.default_rng(0)
    assert np.array_equal(SignFlip().poison(update, rng=rng), -update)
    assert np.array_equal(SignFlip(scale=2.0).poison(update, rng=rng), -2 * update)
    assert np.array_equal(Scaling(factor=10.0).poison(update, rng=rng), 10 * update)
    noise = GaussianAttack(std=3.0).poison(np.zeros(20000, dtype=np.float32), rng=rng)
    assert noise.dtype == np.float32 and abs(noise.std() - 3.0) < 0.05 and abs(noise.mean()) < 0.1
    for build, message in [
        (lambda: SignFlip(scale=0.0), "scale must be > 0, got 0.0"),
        (lambda: Scaling(factor=0.0), "factor must be non-zero"),
        (lambda: Scaling(factor=float("nan")), "factor must be a finite number, got nan"),
        (lambda: GaussianAttack(std=-1.0), "std must be > 0, got -1.0"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            build()


def test_poisoned_executor_changes_only_the_attackers_updates():
    ids = ["a", "b", "c", "d"]
    updates = {cid: np.full(3, i + 1.0, dtype=np.float32) for i, cid in enumerate(ids)}
    inner = _FixedExecutor(updates)
    ex = PoisonedExecutor(inner, attackers={"b", "d"}, attack=SignFlip(), rng=np.random.default_rng(0))
    out = {r.client_id: r.update for r in _fit(ex, ids)}
    assert [r.client_id for r in _fit(ex, ids)] == ids  # order kept
    for cid in ids:
        expected = -updates[cid] if cid in {"b", "d"} else updates[cid]
        assert np.array_equal(out[cid], expected)
    assert ex.poisoned[:2] == [(1, "b"), (1, "d")]
    assert ex.name == "PoisonedExecutor(fixed)" and ex.updates is updates  # other attributes delegate


def test_a_failed_attacker_stays_failed():
    """An attacker whose local work raised sends nothing: the wrapper must not turn it into an update."""

    class _Failing(_FixedExecutor):
        def fit(self, clients, **kwargs):
            out = super().fit(clients, **kwargs)
            return [ClientResult.failed(r.client_id, RuntimeError("boom")) if r.client_id == "b" else r for r in out]

    ex = PoisonedExecutor(_Failing({c: np.ones(2, dtype=np.float32) for c in "ab"}), attackers={"a", "b"}, attack=SignFlip(),
                          rng=np.random.default_rng(0))  # fmt: skip
    out = {r.client_id: r for r in _fit(ex, ["a", "b"])}
    assert out["b"].error == "RuntimeError: boom" and out["b"].update.size == 0
    assert np.array_equal(out["a"].update, -np.ones(2)) and ex.poisoned == [(1, "a")]


def test_gaussian_attack_noise_is_fixed_by_generator_round_and_client():
    ids = ["a", "b"]
    inner = _FixedExecutor({cid: np.zeros(8, dtype=np.float32) for cid in ids})

    def draw(seed, round_index):
        ex = PoisonedExecutor(inner, attackers={"a", "b"}, attack=GaussianAttack(), rng=np.random.default_rng(seed))
        return {r.client_id: r.update for r in _fit(ex, ids, round_index)}

    first, again, later, other = draw(1, 3), draw(1, 3), draw(1, 4), draw(2, 3)
    assert np.array_equal(first["a"], again["a"]) and np.array_equal(first["b"], again["b"])
    assert not np.array_equal(first["a"], first["b"])
    assert not np.array_equal(first["a"], later["a"]) and not np.array_equal(first["a"], other["a"])


def test_attacked_run_resumes_bit_for_bit(tmp_path):
    def federation(**kwargs):
        task = ToyTask()
        executor = PoisonedExecutor(
            InProcessExecutor(task), attackers={"client-2"}, attack=GaussianAttack(std=0.5), rng=np.random.default_rng(5)
        )
        return Federation(
            task=task,
            clients=toy_clients(4),
            strategy=FedAvg(),
            train=TRAIN,
            executor=executor,
            seed=3,
            reproducible=True,
            quiet=True,
            evaluate_every=0,
            **kwargs,
        )

    full = federation()
    full.run(4)
    first = federation(checkpoint_dir=tmp_path)
    first.run(2)
    resumed = federation(checkpoint_dir=tmp_path)
    resumed.restore(tmp_path)
    resumed.run(4)
    assert np.array_equal(full.global_vector, resumed.global_vector)


def test_sign_flip_moves_fedavg_as_computed():
    """Uniform FedAvg of known updates with one flipped: the step is the mean of what was sent."""
    ids = [f"client-{i}" for i in range(4)]
    updates = {cid: np.linspace(-0.1, 0.1, 7).astype(np.float32) * (i + 1) for i, cid in enumerate(ids)}
    executor = PoisonedExecutor(_FixedExecutor(updates), attackers={"client-1"}, attack=SignFlip(), rng=np.random.default_rng(0))
    fed = Federation(task=ToyTask(), clients=toy_clients(4), strategy=FedAvg(), train=TRAIN, executor=executor,
                     pipeline=UpdatePipeline(weighting="uniform"), seed=3, reproducible=True, quiet=True, evaluate_every=0)  # fmt: skip
    start = fed.global_vector.copy()
    fed.run_round()
    sent = [-updates[c] if c == "client-1" else updates[c] for c in ids]
    assert np.allclose(fed.global_vector - start, np.mean(sent, axis=0), atol=1e-6)


# ----------------------------------------------------------------------------- data poisoning


def test_binary_label_flip_poisons_training_only():
    clients = toy_clients(4)
    poisoned = label_flip(clients, attackers={"client-0"}, flip=flip_binary_labels)
    train = poisoned["client-0"].train
    x, y = train[3]
    x0, y0 = clients["client-0"].train[3]
    assert torch.equal(x, x0) and float(y) == 1.0 - float(y0)
    batch_x, batch_y = next(iter(DataLoader(train, batch_size=5, shuffle=False, collate_fn=ToyTask().collate)))
    assert torch.equal(batch_y, 1.0 - clients["client-0"].train.tensors[1][:5])
    assert poisoned["client-0"].test is clients["client-0"].test and poisoned["client-1"] is clients["client-1"]
    with pytest.raises(ConfigError, match=re.escape("attackers ['nobody'] are not among the clients")):
        label_flip(clients, attackers={"nobody"}, flip=flip_binary_labels)


def test_label_flipping_every_client_teaches_the_opposite():
    clients = toy_clients(4)
    clean = Federation(
        task=ToyTask(), clients=clients, strategy=FedAvg(), train=TRAIN, seed=3, reproducible=True, quiet=True, evaluate_every=0
    )
    flipped = Federation(task=ToyTask(), clients=label_flip(clients, attackers=set(clients), flip=flip_binary_labels),
                         strategy=FedAvg(), train=TRAIN, seed=3, reproducible=True, quiet=True, evaluate_every=0)  # fmt: skip
    clean.run(4)
    flipped.run(4)
    assert clean.evaluate()["accuracy"] > 0.8 and flipped.evaluate()["accuracy"] < 0.3


def _tiny_split():
    rng = np.random.default_rng(0)
    rows = []
    for user in range(1, 4):
        for t, item in enumerate(rng.choice(np.arange(1, 31), size=8, replace=False)):
            rows.append((user, int(item), 5, 1000 * user + t))
    ratings = pd.DataFrame(rows, columns=["user_id", "movie_id", "rating", "timestamp"])
    return leave_one_out(ratings, 5, 0, item_ids=np.arange(1, 31))


def test_implicit_feedback_flip_swaps_the_watched_item_with_a_negative():
    split = _tiny_split()
    data = InteractionDataset(split, np.arange(3), num_negatives=3, seed=1)
    flipped = LabelFlippedDataset(InteractionDataset(split, np.arange(3), num_negatives=3, seed=1), flip_implicit_feedback)
    torch.manual_seed(0)  # the dataset keys its negatives on torch's generator
    honest = data.__getitems__(list(range(len(data)))).batch
    torch.manual_seed(0)
    bad = flipped.__getitems__(list(range(len(data)))).batch
    assert torch.equal(bad["item"], honest["negatives"][:, 0])
    assert torch.equal(bad["negatives"][:, 0], honest["item"]) and torch.equal(
        bad["negatives"][:, 1:], honest["negatives"][:, 1:]
    )
    for row in range(len(data)):  # the new positive was never rated by the user, the new negative was
        user = int(bad["user"][row])
        rated = set(split.sequences[user][:-1].tolist())
        assert int(bad["item"][row]) not in rated and int(bad["negatives"][row, 0]) in rated
    one = flipped[0]
    assert one["item"].shape == () and one["negatives"].shape == (3,)
    with pytest.raises(ConfigError, match="expects a batch with 'item' and 'negatives'"):
        flip_implicit_feedback({"item": torch.zeros(2)})


# ----------------------------------------------------------------------------- injected updates


def test_injected_clients_skip_training_and_send_their_vector():
    ids = ["a", "b", "c"]
    inner = _FixedExecutor({cid: np.ones(2, dtype=np.float32) for cid in ids})
    canary = np.array([0.5, -0.5], dtype=np.float32)
    ex = InjectedUpdates(inner, updates={"b": canary})
    out = _fit(ex, ids)
    assert [r.client_id for r in out] == ids and inner.trained == ["a", "c"]
    assert np.array_equal(out[1].update, canary) and out[1].num_examples == 1
    with pytest.raises(ConfigError, match="injected update of 'x' must be a finite, non-empty 1-D float vector"):
        InjectedUpdates(inner, updates={"x": np.array([np.nan])})


class _NoiseOff:
    """Central noise that records the claimed noise in the ledger but adds none (a broken run)."""

    def __init__(self, real):
        self.real = real
        self.noise_multiplier = real.noise_multiplier
        self.clip_bound = real.clip_bound

    def add(self, total, *, rng):
        return np.asarray(total, dtype=np.float64)

    def event(self, **kwargs):
        return self.real.event(**kwargs)


@pytest.mark.parametrize("noise_on", [True, False], ids=["noised", "noise-disabled"])
def test_canary_audit_of_a_federation(noise_on):
    """dp.audit on a real fedcore run: canary clients via InjectedUpdates, central DP noise."""
    features, sigma, delta = 999, 4.0, 1e-5
    task = ToyTask(features=features)
    clients = toy_clients(3, per_client=20, features=features)
    canaries = draw_canaries(num_canaries=200, dimension=features + 1, clip_bound=1.0, rng=np.random.default_rng(11))
    ledger = dp.Ledger()

    def train(canary_updates):
        dummy = ClientData(train=TensorDataset(torch.zeros(1, features), torch.zeros(1)))
        noise = dp.CentralGaussian(noise_multiplier=sigma, clip_bound=1.0)
        pipeline = UpdatePipeline(clip=dp.L2Clip(1.0), weighting="uniform", central_noise=noise if noise_on else _NoiseOff(noise))
        fed = Federation(
            task=task, clients=dict(clients) | {cid: dummy for cid in canary_updates}, strategy=FedAvg(), train=TRAIN,
            pipeline=pipeline, ledger=ledger, executor=InjectedUpdates(InProcessExecutor(task), updates=canary_updates),
            seed=3, reproducible=True, quiet=True, evaluate_every=0,
        )  # fmt: skip
        start = fed.global_vector.astype(np.float64)
        fed.run(3)
        return fed.global_vector.astype(np.float64) - start

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_canary_audit(train, canaries=canaries, delta=delta, claimed_epsilon=lambda: dp.epsilon(ledger, delta=delta))
    assert len(ledger) == 3 and result.claimed_epsilon == pytest.approx(dp.epsilon(ledger, delta=delta))
    if noise_on:
        assert result.epsilon_lower_bound < result.claimed_epsilon and not result.exceeds_claim and not caught
    else:
        assert result.epsilon_lower_bound > result.claimed_epsilon and result.exceeds_claim
        assert [w.category.__name__ for w in caught] == ["PrivacyAuditWarning"]
        assert result.summary().startswith("PRIVACY AUDIT FAILED")
