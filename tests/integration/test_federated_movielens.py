"""Federated training on the real MovieLens-100K silos, through the public experiment API."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedcore.errors import ConfigError
from fedcore.experiments.cli import main
from fedcore.experiments.config import parse_config
from fedcore.experiments.experiment import build_experiment, build_workload

pytestmark = pytest.mark.integration

POPULARITY_HR10 = 0.409  # same protocol, measured in test_real_data.py


def _config(tmp_path, **overrides):
    raw = {
        "name": "it", "seed": 0, "reproducible": True, "rounds": 4, "output_dir": str(tmp_path / "out"),
        "workload": {"case": "movielens", "model": "mf", "partition": "regions", "num_silos": 5},
        "train": {"optimizer": "adam", "lr": 0.01, "batch_size": 256},
        "logging": {"tensorboard": False, "quiet": True},
    }  # fmt: skip
    return parse_config(raw, overrides=overrides)


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    return build_workload(_config(tmp_path_factory.mktemp("w")))


def test_federated_mf_on_real_silos_beats_popularity(tmp_path, workload):
    experiment = build_experiment(_config(tmp_path), workload=workload)
    history = experiment.federation.run(4)
    assert len(experiment.federation.clients) == 5
    assert workload.baseline["hr@10"] == pytest.approx(POPULARITY_HR10, abs=0.002)  # the anchor, on all 943 users
    assert workload.baseline["ndcg@10"] == pytest.approx(0.228, abs=0.002)
    assert history[-1]["test_hr@10"] > workload.baseline["hr@10"] + 0.05
    # user embeddings are local-only: the shared vector holds item parameters only
    assert not any(name.startswith("user_embedding") for name in experiment.federation.layout.names)


def test_masked_run_gives_the_plaintext_model_within_the_encoder_bound(tmp_path, workload):
    over = {"rounds": 1, "privacy.clip": 10.0}
    plain = build_experiment(_config(tmp_path / "p", **over, **{"aggregation.mode": "plaintext"}), workload=workload)
    masked = build_experiment(_config(tmp_path / "m", **over, **{"aggregation.mode": "masked"}), workload=workload)
    # both clip at 10 (masked needs a bound); the plaintext reference clips too
    import dp

    plain.federation.pipeline.clip = dp.L2Clip(10.0)
    plain.federation.run_round()
    record = masked.federation.run_round()
    assert record["contributors"] == 5
    diff = np.max(np.abs(plain.federation.global_vector - masked.federation.global_vector))
    assert diff < 1e-5


def test_cli_main_job_writes_report(tmp_path, capsys):
    config = tmp_path / "job.toml"
    config.write_text(
        """
name = "cli"
rounds = 2
[workload]
case = "movielens"
max_users = 200
[train]
batch_size = 256
[aggregation]
mode = "masked"
[privacy]
level = "sample"
target_epsilon = 8.0
clip = 10.0
[logging]
tensorboard = false
"""
    )
    out = tmp_path / "out"
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert str(out / "privacy_report.html") in printed
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["mode"]["name"] == "masked"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_run"] == 2 and 0 < summary["epsilon"] <= 8.0
    # the run's DP-SGD was audited after it (the busiest silo's history, replayed with canaries)
    audit = report["audit"]
    assert audit["ran"] and audit["canaries"] == summary["audit"]["canaries"] == 100_000
    assert not audit["exceeds_claim"] and audit["tested_epsilon"] == summary["audit"]["claimed_epsilon"]
    assert "privacy audit: audited epsilon lower bound" in printed
    assert (out / "metrics.jsonl").read_text().count("\n") == 2
    # a second run into the same folder is refused; --resume continues it
    assert main(["run", str(config), "--out", str(out), "--quiet"]) == 2
    assert "pass --resume" in capsys.readouterr().err
    # resuming for a third round would overspend the epsilon calibrated for two: training stops
    assert main(["run", str(config), "--out", str(out), "--quiet", "--resume", "--rounds", "3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_run"] == 2 and "would be exceeded" in summary["stop_reason"]
    assert "stopped early: sample-level privacy budget (epsilon=8" in capsys.readouterr().out


def test_lazy_noise_from_the_config_spends_what_eager_noise_spends(tmp_path, workload):
    """[privacy] lazy_noise: the same calibration and ledger as eager DP-SGD, another noise schedule."""
    over = {"rounds": 1, "train.optimizer": "sgd", "train.lr": 50.0, "train.batch_size": 1024,
            "privacy.level": "sample", "privacy.target_epsilon": 8.0, "privacy.max_grad_norm": 0.3}  # fmt: skip
    eager = build_experiment(_config(tmp_path / "e", **over), workload=workload)
    lazy = build_experiment(_config(tmp_path / "l", **over, **{"privacy.lazy_noise": True}), workload=workload)
    assert lazy.federation.sample_privacy.lazy_noise and not eager.federation.sample_privacy.lazy_noise
    for experiment in (eager, lazy):
        assert experiment.federation.run_round()["contributors"] == 5
    assert lazy.noise_multiplier == eager.noise_multiplier
    spent = eager.budget.spent(eager.ledger)
    assert 0 < spent <= 8.0 and lazy.budget.spent(lazy.ledger) == pytest.approx(spent, rel=1e-12)
    assert np.all(np.isfinite(lazy.federation.global_vector))
    assert not np.array_equal(lazy.federation.global_vector, eager.federation.global_vector)


def test_lazy_noise_with_momentum_is_refused_when_the_experiment_is_built(tmp_path, workload):
    over = {"train.optimizer": "sgd", "train.momentum": 0.9, "privacy.level": "sample",
            "privacy.noise_multiplier": 1.0, "privacy.lazy_noise": True}  # fmt: skip
    with pytest.raises(ConfigError, match="lazy_noise=True needs plain SGD for embedding tables: momentum must be 0, got 0.9"):
        build_experiment(_config(tmp_path, **over), workload=workload)


def test_a_workload_built_from_other_settings_is_refused(tmp_path, workload):
    with pytest.raises(ConfigError, match=r"built with workload.dim=32 \(the config says 8\); build it from this config"):
        build_experiment(_config(tmp_path, **{"workload.dim": 8}), workload=workload)
