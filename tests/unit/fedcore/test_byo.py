"""Bring your own model and data: the README's example is this test's code, run as written.

Also the calibration for the worst client, the built-in report, and the refusals of
``SimpleTask``, ``federate_data`` and ``SampleLevelDP(target_epsilon=...)``, each naming the setting.
"""

from __future__ import annotations

import re
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dp
from fedcore import ClientData, ConfigError, FedAvg, Federation, SimpleTask, TrainConfig, federate_data

README = Path(__file__).resolve().parents[3] / "README.md"
TARGET = 3.0


def _readme_blocks() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Your own model and data") :]
    section = section[: section.index("\n## ", 5)]
    return re.findall(r"```python\n(.*?)```", section, re.S)


@pytest.fixture(scope="module")
def readme_run() -> dict:
    blocks = _readme_blocks()
    assert len(blocks) == 2, "the section shows the tensor example and the datasets.Dataset one"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md:your-own-model", "exec"), namespace)
    return namespace


def _check_private_masked_run(ns: dict, ids: list[str]) -> None:
    fed, history, report = ns["fed"], ns["history"], ns["report"]
    assert sorted(fed.clients) == ids
    assert len(history) == 5 and all(h["contributors"] == 4 for h in history)
    assert history[-1]["test_accuracy"] > 0.8  # a learnable rule; the first round is far lower without DP noise averaging
    epsilons = dp.sample_level_epsilons(fed.ledger, delta=1e-5)
    assert sorted(epsilons) == ids
    assert max(epsilons.values()) <= TARGET and max(epsilons.values()) >= TARGET * 0.99
    data = report.data
    assert data["mode"]["name"] == "masked" and data["mode"]["trust_model"] == fed.pipeline.backend.trust_model
    assert data["sample_level"]["max_epsilon"] == pytest.approx(max(epsilons.values()))
    assert data["summary"]["unit_of_privacy"].startswith("one training example of a client")
    releases = " ".join(r["what"] if isinstance(r, dict) else r for r in data["non_private_releases"])
    assert "test metrics" in releases and "sampling rate" in releases
    assert data["seed_derivable"] is False


def test_readme_example_from_tensors_trains_privately_under_masking(readme_run):
    _check_private_masked_run(readme_run, [f"client-{i}" for i in range(4)])
    fed = readme_run["fed"]
    assert fed.calibration["worst_client"] in fed.clients and fed.calibration["rounds"] == 5
    assert all(e.noise_multiplier == fed.calibration["noise_multiplier"] for e in fed.ledger.events if e.level == "sample")


def test_readme_example_from_a_datasets_dataset(readme_run):
    namespace = dict(readme_run)
    exec(compile(_readme_blocks()[1], "README.md:datasets", "exec"), namespace)
    _check_private_masked_run(namespace, [f"hospital=h{i}" for i in range(4)])


def _task(features: int = 3) -> SimpleTask:
    return SimpleTask(
        model=lambda: nn.Linear(features, 2),
        loss=nn.CrossEntropyLoss(reduction="none"),
        metrics={"accuracy": lambda out, y: (out.argmax(1) == y).float().mean()},
    )


def _sized_clients(sizes, features: int = 3) -> dict[str, ClientData]:
    g = torch.Generator().manual_seed(1)
    out = {}
    for i, n in enumerate(sizes):
        x = torch.randn(n, features, generator=g)
        out[f"c{i}"] = ClientData(train=torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long()))
    return out


def test_target_epsilon_is_calibrated_for_the_client_that_needs_the_most_noise():
    clients = _sized_clients([24, 120])  # sampling rates 1/3 and 1/15 at batch size 8
    fed = Federation(
        task=_task(), clients=clients, strategy=FedAvg(), train=TrainConfig(batch_size=8, max_steps=4),
        sample_privacy=dp.SampleLevelDP(target_epsilon=TARGET, delta=1e-5, max_grad_norm=1.0), ledger=dp.Ledger(),
        rounds=2, quiet=True, evaluate_every=0,
    )  # fmt: skip
    assert fed.calibration["worst_client"] == "c0" and fed.calibration["worst_client_examples"] == 24
    fed.run()
    eps = dp.sample_level_epsilons(fed.ledger, delta=1e-5)
    assert all(e <= TARGET for e in eps.values())
    assert eps["c0"] == max(eps.values()) and eps["c0"] >= TARGET * 0.99  # the worst meets the target
    assert eps["c1"] < eps["c0"]  # one noise for all: the client with more examples (lower rate) spends less
    assert {e.noise_multiplier for e in fed.ledger.events} == {fed.calibration["noise_multiplier"]}
    with pytest.raises(ConfigError, match=r"rounds=3 exceeds the 2 rounds that sample_privacy's target_epsilon=3.0"):
        fed.run(3)


def test_target_epsilon_needs_rounds_and_an_explicit_noise_is_not_calibrated():
    privacy = dp.SampleLevelDP(target_epsilon=TARGET, delta=1e-5, max_grad_norm=1.0)
    with pytest.raises(ConfigError, match=r"target_epsilon=3.0 is calibrated over the rounds the run plans: pass rounds="):
        Federation(task=_task(), clients=_sized_clients([20, 20]), strategy=FedAvg(), train=TrainConfig(), sample_privacy=privacy)
    fixed = Federation(
        task=_task(), clients=_sized_clients([20, 20]), strategy=FedAvg(), train=TrainConfig(),
        sample_privacy=dp.SampleLevelDP(noise_multiplier=1.3, max_grad_norm=1.0), quiet=True,
    )  # fmt: skip
    assert fixed.calibration is None and fixed.sample_privacy.noise_multiplier == 1.3
    with pytest.raises(ConfigError, match=r"report\(\) reads what was spent from the ledger: build the federation with ledger="):
        fixed.report()
    with pytest.raises(ConfigError, match=r"run\(\) needs rounds"):
        fixed.run()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            dict(max_grad_norm=1.0),
            dp.DPValueError,
            "give exactly one of noise_multiplier .* got noise_multiplier=None, target_epsilon=None",
        ),
        (dict(noise_multiplier=1.0, target_epsilon=2.0, delta=1e-5, max_grad_norm=1.0), dp.DPValueError, "give exactly one of"),
        (dict(target_epsilon=2.0, max_grad_norm=1.0), dp.DPValueError, r"target_epsilon needs delta .* got delta=None"),
        (dict(target_epsilon=-1.0, delta=1e-5, max_grad_norm=1.0), dp.DPValueError, "target_epsilon"),
        (dict(target_epsilon=2.0, delta=1.5, max_grad_norm=1.0), dp.DPValueError, "delta"),
        (dict(target_epsilon=2.0, delta=1e-5, accountant="magic", max_grad_norm=1.0), dp.DPValueError, "accountant"),
    ],
)
def test_sample_level_dp_target_settings_are_checked(kwargs, error, message):
    with pytest.raises(error, match=message):
        dp.SampleLevelDP(**kwargs)


def test_an_uncalibrated_target_cannot_train():
    privacy = dp.SampleLevelDP(target_epsilon=2.0, delta=1e-5, max_grad_norm=1.0)
    model = nn.Linear(3, 2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3), torch.zeros(8).long()), batch_size=4)
    with pytest.raises(dp.DPValueError, match=r"target_epsilon=2.0 is not calibrated yet: call calibrated\(runs\)"):
        privacy.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), loader)
    with pytest.raises(dp.DPValueError, match=r"calibrated\(\) needs target_epsilon"):
        dp.SampleLevelDP(noise_multiplier=1.0, max_grad_norm=1.0).calibrated({"a": (10, 0.1)})


# --------------------------------------------------------------------------- SimpleTask


def test_a_reduced_loss_is_refused_at_build_in_plaintext_too():
    task = SimpleTask(model=lambda: nn.Linear(3, 2), loss=nn.CrossEntropyLoss())  # reduction='mean'
    with pytest.raises(ConfigError, match=r"loss must return one loss per example, shape \(\d+,\) for this batch, got \(\)"):
        Federation(task=task, clients=_sized_clients([20, 20]), strategy=FedAvg(), train=TrainConfig(), quiet=True)


def test_simple_task_trains_and_reports_loss_and_metrics():
    task = _task()
    clients = _sized_clients([40, 40])
    fed = Federation(task=task, clients=clients, strategy=FedAvg(), train=TrainConfig(lr=0.1, epochs=3), quiet=True, rounds=3)
    history = fed.run()
    assert history[-1]["contributors"] == 2 and task.primary_metric == "accuracy"
    scores = task.evaluate(fed.model(), clients["c0"].train)
    assert set(scores) == {"loss", "accuracy"} and scores["accuracy"] > 0.8
    assert SimpleTask(model=lambda: nn.Linear(3, 2), loss=nn.CrossEntropyLoss(reduction="none")).primary_metric == "loss"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(model=nn.Linear(3, 2)), r"model must be a factory that builds a fresh nn.Module .* got Linear"),
        (dict(loss="mse"), r"loss must be a callable \(outputs, labels\) -> per-example losses, got str"),
        (dict(metrics={"loss": lambda o, y: 0.0}), r"metric names must be non-empty strings other than 'loss'"),
        (dict(metrics={"acc": 0.5}), r"metrics\['acc'\] must be a callable"),
        (dict(local_only="bias"), r"local_only must be a tuple of name patterns, got the string 'bias'"),
    ],
)
def test_simple_task_refuses_bad_arguments(kwargs, message):
    args = dict(model=lambda: nn.Linear(3, 2), loss=nn.CrossEntropyLoss(reduction="none")) | kwargs
    with pytest.raises(ConfigError, match=message):
        SimpleTask(**args)


# --------------------------------------------------------------------------- federate_data


def _data(n: int = 120, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    return x, (x[:, 0] > 0).astype(np.int64)


def _all_rows(clients: dict[str, ClientData]) -> np.ndarray:
    rows = []
    for c in clients.values():
        for split in (c.train, c.validation, c.test):
            if split is not None:
                rows.append(split.tensors[0].numpy())
    return np.concatenate(rows)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(8, 200), k=st.integers(1, 8), seed=st.integers(0, 2**31), val=st.sampled_from([0.0, 0.1]))
def test_iid_partition_covers_every_example_once(n, k, seed, val):
    x, y = _data(n, seed % 100)
    clients = federate_data(x, y, clients=min(k, n // 2), validation=val, test=0.2, seed=seed)
    rows = _all_rows(clients)
    assert rows.shape == x.shape and np.array_equal(np.sort(rows, axis=0), np.sort(x, axis=0))
    sizes = [sum(len(s) for s in (c.train, c.validation, c.test) if s is not None) for c in clients.values()]
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_partition_skews_labels_and_is_fixed_by_the_seed():
    x, y = _data(600)
    skewed = federate_data(x, y, clients=4, partition="dirichlet", alpha=0.1, seed=3)
    mild = federate_data(x, y, clients=4, partition="dirichlet", alpha=100.0, seed=3)

    def spread(clients):
        return np.std([float(c.train.tensors[1].float().mean()) for c in clients.values()])

    assert spread(skewed) > 3 * spread(mild)
    again = federate_data(x, y, clients=4, partition="dirichlet", alpha=0.1, seed=3)
    assert all(torch.equal(skewed[c].train.tensors[0], again[c].train.tensors[0]) for c in skewed)


def test_column_partition_from_numpy_pandas_and_a_dataset_agree():
    x, y = _data(90)
    site = np.array(["a", "b", "c"])[np.arange(90) % 3]
    from_numpy = federate_data(x, y, clients=None, partition="column", column=site, seed=0)
    frame = pd.DataFrame({"f0": x[:, 0], "f1": x[:, 1], "f2": x[:, 2], "f3": x[:, 3], "label": y, "site": site})
    from_pandas = federate_data(frame, label="label", clients=None, partition="column", column="site", seed=0)
    table = datasets.Dataset.from_pandas(frame)
    from_dataset = federate_data(table, label="label", clients=None, partition="column", column="site", seed=0)
    assert list(from_numpy) == ["group=a", "group=b", "group=c"]
    assert list(from_pandas) == list(from_dataset) == ["site=a", "site=b", "site=c"]
    for a, b, c in zip(from_numpy.values(), from_pandas.values(), from_dataset.values()):
        assert torch.equal(a.train.tensors[0], b.train.tensors[0]) and torch.equal(b.train.tensors[0], c.train.tensors[0])
        assert a.train.tensors[1].dtype == torch.int64
    merged = federate_data(frame, label="label", clients=2, partition="column", column="site")
    assert sorted(len(c.train) for c in merged.values()) == [30, 60]  # groups are merged, never split


def test_float_labels_become_float_targets_and_list_features_are_flattened():
    table = datasets.Dataset.from_dict({"x": [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]], "t": [0.5, 1.5, 2.5, 3.5]})
    clients = federate_data(table, label="t", clients=2, seed=0)
    x, t = clients["client-0"].train.tensors
    assert x.shape[1] == 2 and t.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(partition="random"), r"partition must be one of \('iid', 'dirichlet', 'column'\), got 'random'"),
        (dict(partition="dirichlet"), r"partition='dirichlet' needs alpha"),
        (dict(alpha=0.5), r"alpha applies to partition='dirichlet' only, got alpha=0.5 with partition='iid'"),
        (dict(partition="dirichlet", alpha=-1.0), r"cannot partition 120 examples with partition='dirichlet': alpha must be"),
        (dict(column="site"), r"column applies to partition='column' only"),
        (dict(partition="column"), r"partition='column' needs column="),
        (dict(clients=0), r"clients must be an int >= 1, got 0"),
        (dict(clients=None), r"clients=None \(one client per value\) needs partition='column'"),
        (dict(clients=500), r"cannot partition 120 examples with partition='iid': num_clients must be <= n_items"),
        (dict(test=1.2), r"test must be a fraction in \[0, 1\), got 1.2"),
        (dict(validation=0.5, test=0.5), r"validation \+ test must be < 1"),
        (dict(label="y"), r"label and feature_columns name table columns"),
    ],
)
def test_federate_data_refuses_bad_arguments(kwargs, message):
    x, y = _data()
    args = dict(clients=3) | kwargs
    with pytest.raises(ConfigError, match=message):
        federate_data(x, y, **args)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda x, y, f: federate_data(x, y[:-1], clients=2),
            r"labels must hold one label per example, shape \(120,\), got \(119,\)",
        ),
        (
            lambda x, y, f: federate_data("x", y, clients=2),
            r"features must be a torch tensor, NumPy array, DataFrame or datasets.Dataset",
        ),
        (lambda x, y, f: federate_data(x, None, clients=2), r"labels must be given with tensor or array features"),
        (lambda x, y, f: federate_data(f, clients=2, label="nope"), r"label must name a column of the table, got 'nope'"),
        (lambda x, y, f: federate_data(f, y, clients=2, label="label"), r"for a DataFrame or Dataset name the label column"),
        (
            lambda x, y, f: federate_data(f, clients=2, label="label", feature_columns=["zz"]),
            r"feature_columns must name columns",
        ),
        (lambda x, y, f: federate_data(f.assign(s="t"), clients=2, label="label"), r"feature column 's' must be numeric"),
        (lambda x, y, f: federate_data(x, y.astype(str), clients=2), r"labels must be integers \(classes\) or floats"),
        (
            lambda x, y, f: federate_data(x, y.astype(np.float32), clients=2, partition="dirichlet", alpha=1.0),
            r"labels are floats",
        ),
        (lambda x, y, f: federate_data(x * np.nan, y, clients=2), r"features must be finite numbers"),
    ],
)
def test_federate_data_refuses_data_that_does_not_fit(call, message):
    x, y = _data()
    frame = pd.DataFrame({"a": x[:, 0], "label": y})
    with pytest.raises(ConfigError, match=message):
        call(x, y, frame)
