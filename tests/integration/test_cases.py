"""Each case end to end on a small slice of its real data, through the public experiment API.

The MF-on-regional-silos runs (plaintext, masked against plaintext) and the CLI main job are in
``test_federated_movielens.py``; these cover the rest: the clothing reviews case, CKKS against
plaintext within the backend's stated error, the text-aware MovieLens models, and the
cross-device per-user partition under client-level DP with Poisson sampling.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import dp
from fedcore.experiments.config import parse_config
from fedcore.experiments.experiment import build_experiment, build_workload

pytestmark = pytest.mark.integration

CHANCE_HR10 = 10 / 100  # the held-out item ranked among 100 candidates at random


def _config(tmp_path, workload, **overrides):
    raw = {
        "name": "cases", "seed": 0, "reproducible": True, "rounds": 1, "output_dir": str(tmp_path / "out"), "evaluate_every": 1,
        "workload": workload,
        "train": {"optimizer": "adam", "lr": 0.01, "batch_size": 256},
        "logging": {"jsonl": False, "tensorboard": False, "quiet": True},
    }  # fmt: skip
    return parse_config(raw, overrides=overrides)


# ---------------------------------------------------------------- clothing reviews, 10 shops


def test_clothing_frozen_federated_beats_chance_on_the_held_out_split(tmp_path):
    # 600 reviews of the fixed stratified split (480 train, 120 test), 32 tokens: encoding them
    # once takes seconds on CPU and is cached on disk like every feature table.
    workload = {
        "case": "clothing",
        "model": "frozen",
        "partition": "silos",
        "num_silos": 10,
        "max_reviews": 600,
        "max_length": 32,
    }
    config = _config(tmp_path, workload, rounds=3, **{"train.batch_size": 32, "train.epochs": 2})
    built = build_workload(config)
    assert 8 <= len(built.clients) <= 10  # a slice may leave a small shop without training reviews
    assert sum(c.num_train for c in built.clients.values()) == built.central.num_train == 480
    experiment = build_experiment(config, workload=built)
    fed = experiment.federation
    before = built.task.evaluate(fed.model(), built.central.test)
    history = fed.run(3)

    assert [h["round"] for h in history] == [1, 2, 3]
    assert all(h["contributors"] == len(built.clients) for h in history)
    assert {"test_accuracy", "test_auc", "test_bce"} <= set(history[-1])
    # The model is shared whole (no local-only part), so it is scored on the pooled held-out
    # split, like the centralized baseline: ROC AUC is not a mean of the shops' AUCs.
    after = built.task.evaluate(fed.model(), built.central.test)
    labels = built.central.test.labels
    assert 0 < labels.sum() < labels.size
    assert built.baseline["auc"] == 0.5 and built.baseline["accuracy"] == max(labels.mean(), 1 - labels.mean())
    assert after["auc"] > built.baseline["auc"] + 0.15, after  # frozen MiniLM features separate the labels
    assert after["bce"] < before["bce"] - 0.1, (before, after)
    assert after["accuracy"] >= built.baseline["accuracy"] - 0.05, after


# ---------------------------------------------------------------- CKKS against plaintext


def test_ckks_run_gives_the_plaintext_model_within_the_stated_error(tmp_path, monkeypatch):
    workload = {"case": "movielens", "model": "mf", "partition": "regions", "num_silos": 5, "max_users": 300}
    over = {"privacy.clip": 10.0}
    built = build_workload(_config(tmp_path, workload))
    plain = build_experiment(_config(tmp_path / "p", workload, **over, **{"aggregation.mode": "plaintext"}), workload=built)
    ckks = build_experiment(_config(tmp_path / "c", workload, **over, **{"aggregation.mode": "ckks"}), workload=built)
    plain.federation.pipeline.clip = dp.L2Clip(10.0)  # the same clipped inputs on both sides

    sums = {}
    for name, exp in (("plain", plain), ("ckks", ckks)):
        pipeline = exp.federation.pipeline
        original = pipeline.finish

        def record(summed, *, _name=name, _original=original, **kw):  # the server's decoded sum
            sums[_name] = summed
            return _original(summed, **kw)

        monkeypatch.setattr(pipeline, "finish", record)
        exp.federation.run_round()

    backend = ckks.federation.pipeline.backend
    exact, approx = sums["plain"], sums["ckks"]
    assert approx.mode == "ckks" and approx.contributors == exact.contributors and len(exact.contributors) == 5
    err = approx.max_abs_error
    assert err == backend.max_abs_error(5)  # the backend's stated precision for 5 contributions
    assert 0 < err < 1e-4
    assert np.max(np.abs(approx.total - exact.total)) <= err

    # the model: mean = sum / weight with |d sum|, |d weight| <= err (first order, as in the
    # unit contract suite), plus one float32 rounding step of the stored global vector
    w = float(exact.total[-1])
    s = float(np.abs(exact.total[:-1]).max())
    bound = err / w + s * err / (w * (w - err))
    bound += float(np.spacing(np.float32(np.abs(plain.federation.global_vector).max())))
    diff = np.max(np.abs(ckks.federation.global_vector - plain.federation.global_vector))
    assert diff <= bound, (diff, bound)
    assert diff < 1e-4
    assert ckks.report().data["mode"]["name"] == "ckks"


# ---------------------------------------------------------------- text-aware MovieLens models


@pytest.mark.parametrize("model", ["transformer", "mf_text"])
def test_text_aware_model_learns_in_one_round(tmp_path, model):
    workload = {"case": "movielens", "model": model, "partition": "regions", "num_silos": 3, "max_users": 150}
    config = _config(tmp_path, workload, **{"train.lr": 0.003 if model == "transformer" else 0.01})
    experiment = build_experiment(config)
    fed = experiment.federation
    names = fed.layout.names
    if model == "transformer":  # no per-user parameter: every parameter is shared
        assert not experiment.workload.task.local_only
        assert any(n.startswith("adapter_in") for n in names) and any(n.startswith("block.") for n in names)
    else:  # MF + a projection of frozen MiniLM features; user vectors stay on their silo
        assert "item_projection.weight" in names
        assert not any(n.startswith("user_embedding") for n in names)
    before = fed.evaluate("test")
    record = fed.run_round()
    assert record["contributors"] == 3
    assert record["test_hr@10"] > max(2 * CHANCE_HR10, before["hr@10"] + 0.1), (before, record)
    assert 0 < record["test_ndcg@10"] <= record["test_hr@10"]


# ---------------------------------------------------------------- cross-device, client-level DP


def test_per_user_clients_under_client_level_dp_with_poisson_sampling(tmp_path):
    workload = {"case": "movielens", "model": "mf", "partition": "users", "max_users": 120}
    config = _config(
        tmp_path, workload, rounds=3, evaluate_every=0,
        **{"train.batch_size": 64, "sampling.kind": "poisson", "sampling.q": 0.25,
           "privacy.level": "client", "privacy.target_epsilon": 4.0, "privacy.clip": 1.0},
    )  # fmt: skip
    experiment = build_experiment(config)
    fed = experiment.federation
    assert len(fed.clients) == 120
    assert fed.pipeline.client_level_dp and fed.pipeline.weighting == "uniform"
    history = fed.run(3)

    assert len(history) == 3 and fed.stop_reason is None
    events = experiment.ledger.events
    assert [e.round_index for e in events] == [1, 2, 3]  # one client-level event per round
    for event, record in zip(events, history):
        assert isinstance(event, dp.GaussianEvent) and event.level == "client"
        assert event.sampling == "poisson" and event.sample_rate == 0.25
        assert event.noise_multiplier == experiment.noise_multiplier > 0
        assert event.clip_bound == 1.0
        assert event.participants == record["participants"] and event.survivors == record["contributors"]
        assert 0 < record["participants"] < 120  # Poisson: a random subset, not everyone
    # epsilon recorded each round, growing, and the calibrated total lands just under the target
    spent = [h["epsilon"] for h in history]
    assert spent == sorted(spent) and spent[0] > 0
    assert spent[-1] == experiment.budget.spent(experiment.ledger)
    assert spent[-1] == pytest.approx(dp.epsilon(experiment.ledger, delta=1e-5, accountant="pld"))
    assert 3.5 < spent[-1] <= 4.0
    # a fourth round would overspend the epsilon calibrated for three: it is refused, nothing runs
    with pytest.raises(dp.BudgetExceededError):
        fed.run_round()
    assert len(experiment.ledger.events) == 3
    report = experiment.report().data
    assert report["client_level"]["events"] == 3 and report["client_level"]["rounds"] == 3
    assert report["budget"]["spent"] == pytest.approx(spent[-1])
    assert math.isfinite(fed.evaluate("test")["hr@10"])
