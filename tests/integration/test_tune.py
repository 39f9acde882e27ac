"""Private hyperparameter search on real MovieLens silos: charged, refused when unaffordable, reproducible."""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants.analysis import rdp as opacus_rdp

import dp
from fedcore.experiments.cli import main
from fedcore.experiments.config import parse_config
from fedcore.experiments.experiment import build_experiment, build_workload
from fedcore.experiments.tuning import parse_search_space, tune
from fedcore.rounds import messages as msg
from fedcore.rounds.server import Federation

pytestmark = pytest.mark.integration

DELTA = 1e-5
SPACE = {
    "trials": {"distribution": "geometric", "mean": 2.5},
    "score": {"metric": "hr@10", "noise_multiplier": 5.0},
    "space": {"train.lr": {"loguniform": [100.0, 600.0]}, "privacy.max_grad_norm": {"loguniform": [0.1, 1.0]}},
}


def _raw(tmp_path, **privacy):
    return {
        "name": "tune", "seed": 1, "reproducible": True, "rounds": 1, "output_dir": str(tmp_path / "out"), "evaluate_every": 0,
        "workload": {"case": "movielens", "model": "mf", "partition": "regions", "num_silos": 5, "dim": 8, "max_users": 120},
        "train": {"optimizer": "sgd", "lr": 30.0, "batch_size": 100_000, "epochs": 2},  # full batches: q = 1
        "privacy": {"level": "sample", "unit": "record", "target_epsilon": 8.0, "delta": DELTA, "max_grad_norm": 0.3,
                    "clip": 100.0, **privacy},
        "logging": {"jsonl": False, "tensorboard": False, "quiet": True},
    }  # fmt: skip


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    return build_workload(parse_config(_raw(tmp_path_factory.mktemp("w"))), validation=True)


@pytest.fixture(scope="module")
def outcome(tmp_path_factory, workload):
    return tune(parse_config(_raw(tmp_path_factory.mktemp("t"))), parse_search_space(SPACE), workload=workload)


def _independent_bound(event: dp.TuningEvent) -> float:
    """Theorem 2 (Papernot & Steinke 2022) from scratch: per-trial RDP from Opacus, the formula, Balle et al. conversion."""
    orders = np.array([1 + x / 20 for x in range(1, 400)] + list(range(21, 300)), dtype=np.float64)
    assert all(e.sample_rate == 1.0 for e in event.trial)  # so Opacus's curve is the closed form
    trial = sum(
        opacus_rdp.compute_rdp(q=e.sample_rate, noise_multiplier=e.noise_multiplier, steps=e.steps, orders=list(orders))
        for e in event.trial
    )
    trial = trial + orders / (2 * event.score_noise_multiplier**2)  # the noised score: Gaussian, sensitivity 1
    d = event.distribution
    eta, gamma = d.eta, d.gamma
    pmf, mean = (1 - gamma) * eta / (gamma**-eta - 1), 0.0  # P[K = k] = (1-gamma)^k / (gamma^-eta - 1) prod_{j<k} (j+eta)/(j+1)
    for k in range(1, 5000):
        mean, pmf = mean + k * pmf, pmf * (1 - gamma) * (k + eta) / (k + 1)
    middle = (1 + eta) * min(np.min((1 - 1 / orders) * trial + math.log(1 / gamma) / orders), math.log(1 / gamma))
    bound = trial + middle + math.log(mean) / (orders - 1)
    eps = bound + np.log1p(-1 / orders) - (math.log(DELTA) + np.log(orders)) / (orders - 1)
    return float(np.min(eps))


def test_search_is_charged_at_least_the_independent_bound_and_fits_the_target(outcome):
    assert outcome.tuning["trials_run"] == len(outcome.trials) == 2  # K drawn from the seed (reproducible simulation)
    events = [e for e in outcome.ledger.events if isinstance(e, dp.TuningEvent)]
    assert len(events) == 5  # one per silo (sample-level guarantees are per client)
    for event in events:
        charged = dp.sample_level_epsilons([event], delta=DELTA, accountant="rdp")[event.client_id]
        assert charged >= _independent_bound(event) - 1e-9
    assert outcome.epsilon == pytest.approx(max(dp.sample_level_epsilons(outcome.ledger, delta=DELTA).values()))
    assert 7.5 < outcome.epsilon <= 8.0  # calibrated to the whole search's target
    report = outcome.report.data
    assert report["sample_level"]["accountant_used"] == "rdp" and report["tuning"]["trials_run"] == 2
    assert report["summary"]["guarantees"][0]["epsilon"] == pytest.approx(outcome.epsilon)
    assert any("number of trials" in x for x in report["summary"]["not_covered"])
    assert report["tuning"]["winner"]["noised_score"] == max(t.score for t in outcome.trials)


def test_winner_config_reruns_to_the_same_metrics(outcome, workload):
    experiment = build_experiment(outcome.config, workload=workload, quiet=True)
    fed = experiment.federation
    fed.run(outcome.config.rounds)
    assert fed.evaluate("test") == outcome.winner.test_metrics
    # the selection score: each client sends its noised hit count and its count, never its metrics
    sent = []
    exchange = fed.channel.exchange

    def spy(batch):
        replies = exchange(batch)
        sent.extend(msg.decode(r).header for r in replies.values())
        return replies

    fed.channel.exchange = spy
    score = fed.noised_score(metric="hr@10", noise_multiplier=5.0, per="sum")
    assert score == outcome.winner.score  # the same seed-derived noise: a reproducible simulation
    assert len(sent) == 5 and all(set(h) == {"client", "noised", "count"} for h in sent)
    exact = fed.evaluate("validation")["hr@10"]
    assert score != exact and abs(score - exact) < 0.2


def test_unaffordable_search_is_refused_before_the_first_trial(tmp_path, workload, monkeypatch):
    def no_run(*args, **kwargs):
        raise AssertionError("a trial ran")

    monkeypatch.setattr(Federation, "run", no_run)
    ledger = dp.Ledger()
    config = parse_config(_raw(tmp_path, budget_epsilon=6.0))
    with pytest.raises(dp.BudgetExceededError, match=r"budget \(epsilon=6.*private search \(K ~ geometric") as info:
        tune(config, parse_search_space(SPACE), workload=workload, ledger=ledger)
    assert info.value.would_be > 6.0 and len(ledger) == 0


def test_cli_tune_refuses_an_unaffordable_search(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(
        '[workload]\ncase = "movielens"\nmax_users = 60\ndim = 8\n[train]\nbatch_size = 100000\n[privacy]\nlevel = "sample"\nunit = "record"\n'
        "target_epsilon = 8.0\nbudget_epsilon = 2.0\n[logging]\nquiet = true\ntensorboard = false\njsonl = false\n"
    )
    space = tmp_path / "s.toml"
    space.write_text('[trials]\ndistribution = "poisson"\nmean = 3\n[space]\n"train.lr" = {loguniform = [0.01, 1.0]}\n')
    assert main(["tune", str(config), "--search", str(space), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "privacy budget (epsilon=2" in err and "Poisson with mean mu=3" in err
    assert not (tmp_path / "o").exists()
