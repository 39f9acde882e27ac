"""The Ray executor (local Ray, 2 CPUs) against the in-process executor."""

import subprocess
import sys

import numpy as np
import pytest
import ray
import torch

from fedcore import ConfigError, FedAdam, FedAvg, Federation, PoissonSampler, TrainConfig
from fedcore.asynchronous import AsyncFederation, FedBuff, VirtualClock
from fedcore.ray_executor import RayExecutor

from .toy import ToyTask, toy_clients

TRAIN = TrainConfig(lr=0.05, epochs=1, batch_size=16)


class RandomLocalToyTask(ToyTask):
    """The toy task with a randomly initialised local-only parameter (like MF's user embeddings)."""

    def build_model(self):
        model = super().build_model()
        torch.nn.init.normal_(model.private_offset)
        return model


@pytest.fixture(scope="module")
def ray_executor():
    """One local Ray instance (2 CPUs) and one pool of 2 actors for the whole module."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    executor = RayExecutor(RandomLocalToyTask(), num_workers=2, torch_threads=1)
    yield executor
    executor.shutdown()
    ray.shutdown()


def _federation(executor=None, **kwargs):
    if executor is not None:
        executor.reset()  # a new federation reuses the actors: rebuild the template
    defaults = dict(
        task=RandomLocalToyTask(),
        clients=toy_clients(5),
        strategy=FedAdam(lr=0.05),
        train=TRAIN,
        seed=11,
        reproducible=True,
        quiet=True,
        evaluate_every=0,
        sampler=PoissonSampler(q=0.7),
        executor=executor,
    )
    defaults.update(kwargs)
    fed = Federation(**defaults)
    if executor is not None:
        _ = executor.workspace  # the template, built where the in-process federation builds its workspace
    return fed


def _same_clients(a, b):
    for cid in a.clients:
        left, right = a.clients[cid].local_state, b.clients[cid].local_state
        assert left.keys() == right.keys()
        for name in left:
            assert torch.equal(left[name], right[name]), (cid, name)


def test_synchronous_run_on_ray_equals_in_process(ray_executor):
    local, remote = _federation(), _federation(ray_executor)
    local.run(3)
    remote.run(3)
    assert ray_executor.num_workers == 2
    assert np.array_equal(local.global_vector, remote.global_vector)
    assert [h["participants"] for h in local.history] == [h["participants"] for h in remote.history]
    _same_clients(local, remote)
    assert any(c.local_state for c in remote.clients.values())  # written back to the driver
    assert local.evaluate() == remote.evaluate()  # clients that never trained use the template's initial values


def test_clients_per_call_does_not_change_the_model(ray_executor):
    local = _federation()
    local.run(2)
    ray_executor.clients_per_call = 1
    try:
        remote = _federation(ray_executor)
        remote.run(2)
    finally:
        ray_executor.clients_per_call = None
    assert np.array_equal(local.global_vector, remote.global_vector)


def test_checkpoint_written_on_ray_resumes_in_process(ray_executor, tmp_path):
    full = _federation()
    full.run(4)
    first = _federation(ray_executor, checkpoint_dir=tmp_path / "ckpt")
    first.run(2)
    resumed = _federation()
    resumed.restore(tmp_path / "ckpt")
    resumed.run(4)
    assert np.array_equal(full.global_vector, resumed.global_vector)
    _same_clients(full, resumed)


def test_fedbuff_on_ray_equals_in_process(ray_executor):
    def run(executor):
        fed = _federation(executor, strategy=FedAvg())
        runner = AsyncFederation(fed, schedule=FedBuff(buffer_size=2, concurrency=4), clock=VirtualClock())
        runner.run(4)
        return runner

    local, remote = run(None), run(ray_executor)
    assert np.array_equal(local.global_vector, remote.global_vector)
    assert [h["clients"] for h in local.history] == [h["clients"] for h in remote.history]
    _same_clients(local.federation, remote.federation)


def test_describe_reports_resources(ray_executor):
    info = ray_executor.describe()
    assert info["executor"] == "ray" and info["workers"] == 2 and info["device"] == "cpu"
    assert info["num_cpus_per_client"] == 1.0 and info["num_gpus_per_client"] == 0.0 and info["clients_per_call"] == "auto"
    assert info["cluster_resources"]["CPU"] == 2.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_workers": 0}, "num_workers must be an int >= 1 or None, got 0"),
        ({"clients_per_call": 0}, "clients_per_call must be an int >= 1 or None, got 0"),
        ({"num_cpus_per_client": -1}, "num_cpus_per_client must be a number >= 0, got -1"),
        ({"num_gpus_per_client": -0.5}, "num_gpus_per_client must be a number >= 0, got -0.5"),
        ({"device": "gpu0"}, "device must name a torch device such as 'cpu' or 'cuda:0', got 'gpu0'"),
        ({"num_cpus_per_client": 0}, "with num_cpus_per_client=0 and num_gpus_per_client=0, give num_workers"),
    ],
)
def test_bad_settings_are_refused(ray_executor, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        RayExecutor(ToyTask(), **kwargs)


def test_missing_ray_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(ImportError, match=r"RayExecutor needs Ray, .*pip install 'privfl\[ray\]'"):
        RayExecutor(ToyTask())


def test_importing_fedcore_does_not_import_ray():
    code = "import sys, fedcore, fedcore.ray_executor, fedcore.asynchronous, fedcore.cuda; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
