"""Client parties on Ray actors (local Ray, 2 CPUs) against in-process parties."""

import gc
import subprocess
import sys
import types

import numpy as np
import pytest
import ray
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import dp
import secagg
from fedcore import ConfigError, DropoutSimulator, FedAdam, FedAvg, Federation, PoissonSampler, TrainConfig, UpdatePipeline
from fedcore.rounds.asynchronous import AsyncFederation, FedBuff, VirtualClock
from fedcore.rounds.parties import ClientSide
from fedcore.rounds.ray_parties import RayParties

from .test_parties import FEATURES, _windows
from .toy import ToyTask, toy_clients

TRAIN = TrainConfig(lr=0.05, epochs=1, batch_size=16)


class RandomLocalToyTask(ToyTask):
    """The toy task with a randomly initialised local-only parameter (like MF's user embeddings)."""

    def build_model(self):
        model = super().build_model()
        torch.nn.init.normal_(model.private_offset)
        return model


@pytest.fixture(scope="module")
def parties():
    """One local Ray instance (2 CPUs); each federation built with it gets 2 fresh actors."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    host = RayParties(RandomLocalToyTask(FEATURES), num_actors=2)
    yield host
    host.shutdown()
    ray.shutdown()


def _federation(host=None, **kwargs):
    defaults = dict(
        task=RandomLocalToyTask(FEATURES),
        clients=toy_clients(5, features=FEATURES),
        strategy=FedAdam(lr=0.05),
        train=TRAIN,
        seed=11,
        reproducible=True,
        quiet=True,
        evaluate_every=0,
        sampler=PoissonSampler(q=0.7),
        executor=host,
    )
    defaults.update(kwargs)
    if host is not None:
        host._workspace = None  # a new template, built where the in-process federation builds its workspace
    return Federation(**defaults)


def _masked(**kwargs):
    backend = secagg.MaskedSum(value_bound=1.0, max_clients=5, signed_keys=True)
    return UpdatePipeline(backend=backend, clip=dp.L2Clip(1.0), weighting="uniform", **kwargs)


def test_plaintext_run_on_ray_parties_equals_in_process(parties):
    local, remote = _federation(), _federation(parties)
    local.run(3)
    remote.run(3)
    assert np.array_equal(local.global_vector, remote.global_vector)
    assert [h["participants"] for h in local.history] == [h["participants"] for h in remote.history]
    assert remote.clients == {} and remote.client_side is None  # the parties are in the actors
    assert local.evaluate() == remote.evaluate()  # local-only parameters trained in the actors, the same


def test_signed_masked_run_with_dropouts_on_ray_parties_equals_in_process(parties):
    def run(host):
        fed = _federation(host, pipeline=_masked(), strategy=FedAvg(), sampler=None, dropouts=DropoutSimulator(rate=0.2))
        fed.run(3)
        return fed

    local, remote = run(None), run(parties)
    assert np.array_equal(local.global_vector, remote.global_vector)
    assert [h["contributors"] for h in local.history] == [h["contributors"] for h in remote.history]
    assert set(remote.public_keys) == set(remote.client_ids) and remote.public_keys != local.public_keys  # made in the actors


def test_default_mode_draws_fresh_randomness_in_the_actors(parties):
    first, second = _federation(parties, reproducible=False), None
    first.run(1)
    second = _federation(parties, reproducible=False)
    second.run(1)
    assert not np.array_equal(first.global_vector, second.global_vector)


def test_a_wiretap_on_the_driver_finds_no_update_and_the_driver_holds_no_client_secret(parties):
    local = _federation(pipeline=_masked(), strategy=FedAvg(), sampler=None)
    upcoming = local.client_updates()  # what the clients compute in round 1 (reproducible simulation)
    remote = _federation(parties, pipeline=_masked(), strategy=FedAvg(), sampler=None, record_inbox=True)
    remote.run_round()
    assert remote.history[-1]["contributors"] == 5
    received = b"".join(r.data for r in remote.channel.inbox)
    assert received, "the wiretap recorded nothing"
    for result in upcoming:
        leaked = [w for w in _windows(result.update) if w in received]
        assert not leaked, f"{len(leaked)} windows of {result.client_id}'s update reached the server"
    # everything reachable from the server party in the driver: no identity private key, no client party
    assert _secrets_reachable(remote) == set() and len(remote.public_keys) == 5
    assert _secrets_reachable(local) == {"Ed25519PrivateKey", "ClientSide"}  # the search finds them where they are


def _secrets_reachable(root) -> set[str]:
    """Types of client secrets among the objects reachable from ``root`` (modules, classes and functions aside)."""
    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, torch.Tensor, np.ndarray, str, bytes)
    seen, stack, found = set(), [root], set()
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        if isinstance(obj, (Ed25519PrivateKey, ClientSide)):
            found.add(type(obj).__name__)
        stack.extend(gc.get_referents(obj))
    return found


def test_a_checkpoint_written_by_ray_parties_resumes_in_process(parties, tmp_path):
    full = _federation()
    full.run(4)
    first = _federation(parties, checkpoint_dir=tmp_path / "ckpt")
    first.run(2)
    resumed = _federation()
    resumed.restore(tmp_path / "ckpt")
    resumed.run(4)
    assert np.array_equal(full.global_vector, resumed.global_vector)
    for cid in full.clients:
        left, right = full.clients[cid].local_state, resumed.clients[cid].local_state
        assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def test_fedbuff_on_ray_parties_equals_in_process(parties):
    def run(host):
        runner = AsyncFederation(
            _federation(host, strategy=FedAvg()), schedule=FedBuff(buffer_size=2, concurrency=4), clock=VirtualClock()
        )
        runner.run(4)
        return runner

    local, remote = run(None), run(parties)
    assert np.array_equal(local.global_vector, remote.global_vector)
    assert [h["clients"] for h in local.history] == [h["clients"] for h in remote.history]


def test_he_modes_client_updates_and_bad_settings_are_refused(parties):
    ckks = UpdatePipeline(backend=secagg.CKKSSum(value_bound=1.0, max_clients=5), clip=dp.L2Clip(1.0), weighting="uniform")
    with pytest.raises(ConfigError, match=r"aggregation mode 'ckks' needs an HE key holder .* Ray parties cannot do yet"):
        _federation(parties, pipeline=ckks, strategy=FedAvg())
    with pytest.raises(ConfigError, match="client_updates needs in-process client parties"):
        _federation(parties).client_updates()
    with pytest.raises(ConfigError, match="num_actors must be an int >= 1 or None, got 0"):
        RayParties(ToyTask(), num_actors=0)
    with pytest.raises(ConfigError, match="device must name a torch device such as 'cpu' or 'cuda:0', got 'gpu0'"):
        RayParties(ToyTask(), device="gpu0")
    info = parties.describe()
    assert info["executor"] == "ray" and info["actors"] == 2 and info["cluster_resources"]["CPU"] == 2.0


def test_missing_ray_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(ImportError, match=r"RayParties needs Ray, .*pip install 'privfl\[ray\]'"):
        RayParties(ToyTask())


def test_importing_fedcore_does_not_import_ray():
    code = "import sys, fedcore, fedcore.rounds.ray_parties, fedcore.rounds.asynchronous, fedcore.rounds.cuda; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
