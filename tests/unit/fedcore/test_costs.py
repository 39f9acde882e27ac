"""The cost estimate said before round 1 matches what the round then costs.

Upload: the estimate against the bytes the server's channel received in the round, per mode and
for two model sizes. Memory: the peak a masked round adds, measured in a fresh process per model
size (the peak resident set during the round, ``VmHWM`` reset just before it, minus the resident set
before it: in one process an earlier round's allocator pools would distort it). Time is estimated too but never asserted.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import dp
import secagg
from fedcore import ConfigError, CostWarning, FedAvg, Federation, SimpleTask, TrainConfig, UpdatePipeline, federate_data

BACKENDS = {
    "plaintext": lambda: secagg.PlaintextSum(),
    "masked": lambda: secagg.MaskedSum(value_bound=1.0, max_clients=4),
    "masked-signed": lambda: secagg.MaskedSum(value_bound=1.0, max_clients=4, signed_keys=True),
    "ckks-compact": lambda: secagg.CKKSSum(value_bound=1.0, max_clients=4, preset="compact"),
    "ckks-compat": lambda: secagg.CKKSSum(value_bound=1.0, max_clients=4, preset="compat"),
    "bfv": lambda: secagg.BFVSum(value_bound=1.0, max_clients=4),
}


def _federation(backend, width: int, **kwargs) -> Federation:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(160, 16, generator=g)
    clients = federate_data(x, (x[:, 0] > 0).long(), clients=4, test=0.25, seed=0)
    task = SimpleTask(
        model=lambda: nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, 2)),
        loss=nn.CrossEntropyLoss(reduction="none"),
        metrics={"accuracy": lambda out, y: (out.argmax(1) == y).float().mean()},
    )
    pipeline = UpdatePipeline(backend=backend, clip=dp.L2Clip(1.0), weighting="uniform")
    train = TrainConfig(batch_size=16, max_steps=2)
    return Federation(task=task, clients=clients, strategy=FedAvg(), train=train, pipeline=pipeline, quiet=True, **kwargs)


@pytest.mark.parametrize("mode", sorted(BACKENDS))
@pytest.mark.parametrize("width", [4, 600])  # 78 and 11,402 coordinates: one ciphertext, and three to six
def test_upload_estimate_is_within_20_percent_of_the_bytes_received(mode, width):
    fed = _federation(BACKENDS[mode](), width, record_inbox=True)
    estimate = fed.estimate_costs()
    assert estimate.upload_bytes_per_round == fed.costs.upload_bytes_per_round and estimate.coordinates == fed.layout.size
    before = fed.channel.bytes_received
    fed.run(1)
    received = fed.channel.bytes_received - before
    assert received == pytest.approx(estimate.upload_bytes_per_round, rel=0.2)
    per_client = [sum(len(m.data) for m in fed.channel.inbox if m.sender == cid) for cid in fed.client_ids]
    assert all(b == pytest.approx(estimate.upload_bytes_per_client, rel=0.2) for b in per_client)
    holder = sum(len(m.data) for m in fed.channel.inbox if m.sender not in fed.client_ids)
    assert holder == pytest.approx(estimate.key_holder_bytes, rel=0.2, abs=0)


def test_a_run_above_max_upload_bytes_is_refused_before_anything_runs():
    with pytest.raises(ConfigError, match=r"max_upload_bytes=10000, but each client would upload about [\d,]+ bytes per round"):
        _federation(BACKENDS["ckks-compact"](), 4, max_upload_bytes=10_000)
    with pytest.raises(ConfigError, match=r"max_upload_bytes must be a number of bytes > 0 or None, got 0"):
        _federation(BACKENDS["plaintext"](), 4, max_upload_bytes=0)
    assert _federation(BACKENDS["plaintext"](), 4, max_upload_bytes=10_000).costs.upload_bytes_per_client < 10_000


def test_the_estimate_is_logged_before_round_1_and_warned_about_when_large(caplog, monkeypatch):
    fed = _federation(BACKENDS["masked"](), 4, rounds=2)
    with caplog.at_level(logging.INFO, logger="fedcore"):
        fed.run()
    lines = [r.getMessage() for r in caplog.records if r.name == "fedcore"]
    assert lines[0] == fed.costs.summary() and "estimated cost per round (masked" in lines[0]
    assert sum("estimated cost" in line for line in lines) == 1  # before round 1 only
    import fedcore.rounds.server

    monkeypatch.setattr(fedcore.rounds.server, "WARN_UPLOAD_BYTES", 100)
    with pytest.warns(CostWarning, match=r"an expensive run: estimated cost per round \(plaintext"):
        _federation(BACKENDS["plaintext"](), 4).run(1)


def test_masked_upload_grows_with_the_neighbours_of_a_client():
    """Shares and unmask answers scale with the graph degree: 16 clients probe, 40 are extrapolated."""
    small = _federation(secagg.MaskedSum(value_bound=1.0, max_clients=40), 4).estimate_costs()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=g)
    clients = federate_data(x, (x[:, 0] > 0).long(), clients=40, seed=0)
    fed = Federation(
        task=small_task(), clients=clients, strategy=FedAvg(), train=TrainConfig(batch_size=16, max_steps=1), quiet=True,
        pipeline=UpdatePipeline(backend=secagg.MaskedSum(value_bound=1.0, max_clients=40), clip=dp.L2Clip(1.0), weighting="uniform"),
        evaluate_every=0,
    )  # fmt: skip
    before = fed.channel.bytes_received
    fed.run(1)
    assert fed.costs.participants == 40 and fed.costs.upload_bytes_per_client > 3 * small.upload_bytes_per_client
    assert fed.channel.bytes_received - before == pytest.approx(fed.costs.upload_bytes_per_round, rel=0.2)


def small_task() -> SimpleTask:
    return SimpleTask(model=lambda: nn.Linear(16, 2), loss=nn.CrossEntropyLoss(reduction="none"))


# Run in a fresh process: build a masked federation of a model of WIDTH hidden units (19 * WIDTH + 2
# parameters), estimate, then measure what one round adds to the resident set at its peak.
MEMORY_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[2])
from tests.unit.fedcore.test_costs import BACKENDS, _federation
def status(field):
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(field))) * 1024
fed = _federation(BACKENDS["masked"](), int(sys.argv[1]), evaluate_every=0)
estimate = fed.estimate_costs()
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from the resident set now
fed.run(1)
print(json.dumps({"estimate": estimate.peak_memory_bytes, "added": status("VmHWM:") - before, "parameters": fed.layout.size}))
"""


@pytest.mark.parametrize("width", [56_000, 226_000])  # 1.06M and 4.3M parameters
def test_memory_estimate_is_within_20_percent_of_what_a_round_adds(width):
    root = Path(__file__).resolve().parents[3]
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(width), str(root)], capture_output=True, text=True, check=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    assert measured["parameters"] == 19 * width + 2
    assert measured["added"] == pytest.approx(measured["estimate"], rel=0.2), measured
