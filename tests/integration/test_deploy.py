"""The federation as separate processes over gRPC with mutual TLS, on 127.0.0.1 (real processes, bounded waits).

Five MovieLens silos (MF, 150 users), masked aggregation (signed in the launch test) with client-level DP. Refusals of
certificates at the handshake are in ``tests/unit/fedcore/test_deploy_transport.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.numpy import load_file

import dp
from fedcore.deploy import provision
from fedcore.experiments.cli import main
from fedcore.rounds.checkpoint import load_checkpoint

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
IDS = ["zip-0+1", "zip-2+3", "zip-4+5", "zip-6+7", "zip-8+9+non-US"]  # the 5 regional silos of MovieLens
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
       "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONUNBUFFERED": "1"}  # fmt: skip
BOUND = 420  # seconds any one process may take


def _config(
    tmp_path: Path, *, rounds: int, noise: str, threshold: int | None = None, signed: bool = False, users: bool = False
) -> Path:
    """The deployed job: client-level DP, or (``users``) user-level DP across the silos (FedSGD, per-user clip)."""
    path = tmp_path / "job.toml"
    train = 'optimizer = "sgd"\nlr = 0.03\nbatch_size = 64' if users else "batch_size = 256"
    across = '[strategy]\nname = "fedsgd"\nlr = 0.2\n' if users else ""
    path.write_text(
        f"""
name = "deploy"
seed = 0
reproducible = true
rounds = {rounds}
output_dir = "{tmp_path / "out"}"
[workload]
case = "movielens"
model = "mf"
num_silos = 5
max_users = 150
[train]
{train}
{across}[aggregation]
mode = "masked"
{f"threshold = {threshold}" if threshold else ""}
{"value_bound = 20.0" if users else ""}
signed_keys = {str(signed).lower()}
[privacy]
level = "client"
{'unit = "user"' if users else ""}
noise = "{noise}"
noise_multiplier = 0.5
clip = {0.3 if users else 10.0}
[logging]
tensorboard = false
"""
    )
    return path


def _start(*args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _wait_for(condition, *, what: str, procs=(), bound: float = BOUND) -> None:
    end = time.monotonic() + bound
    while not condition():
        dead = [p.args for p in procs if p.poll() is not None]
        assert not dead, f"{dead} exited while waiting for {what}"
        assert time.monotonic() < end, f"no {what} within {bound} s"
        time.sleep(0.2)


def _checkpoint_round(folder: Path) -> int:
    try:
        return load_checkpoint(folder).round_index
    except Exception:  # absent, or being replaced this instant
        return -1


def test_launch_gives_the_in_process_run_bit_for_bit(tmp_path):
    # signed masking: each client signs with the identity key of its kit, checked against the directory; user-level
    # DP across the silos, so each client process clips its own users' gradients (the killed-clients test below
    # deploys client-level DP)
    config = _config(tmp_path, rounds=2, noise="skellam", signed=True, users=True)
    assert main(["run", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    launched = subprocess.run(
        [sys.executable, "-m", "fedcore", "launch", str(config), "--clients", "5", "--out", str(tmp_path / "deployed"),
         "--timeout", str(BOUND)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=BOUND + 60,
    )  # fmt: skip
    out = launched.stdout
    assert launched.returncode == 0, out[-4000:] + launched.stderr[-2000:]
    assert "[server] round 1/2" in out and "[server] round 2/2" in out and "[server] 5 of 5 clients attending" in out
    assert all(f"[server] {cid} attended" in out for cid in IDS)
    reference, deployed = (
        load_file(str(tmp_path / "run" / "model.safetensors")),
        load_file(str(tmp_path / "deployed" / "model.safetensors")),
    )
    assert reference.keys() == deployed.keys()
    assert all(reference[k].tobytes() == deployed[k].tobytes() for k in reference)  # bit for bit
    report = {n: json.loads((tmp_path / n / "privacy_report.json").read_text()) for n in ("run", "deployed")}
    assert report["run"]["mode"]["name"] == "masked" and report["run"]["seed_derivable"] is True
    assert report["run"]["secure_aggregation"]["parameters"]["backend"]["signed_keys"] is True
    assert report["run"]["summary"]["unit_of_privacy"].startswith("one user of one silo")
    assert {m["unit"] for m in report["run"]["mechanisms"]} == {"user"}
    assert {k for k in report["run"] if report["run"][k] != report["deployed"][k]} == {"generated_at"}
    history = [
        [json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("run", "deployed")
    ]
    strip = ("round_seconds", "client_train_seconds")
    assert [{k: v for k, v in h.items() if k not in strip} for h in history[0]] == [
        {k: v for k, v in h.items() if k not in strip} for h in history[1]
    ]


def test_killed_clients_are_dropouts_a_restarted_server_resumes_and_a_replayed_message_is_refused(tmp_path):
    """Round 1: one client is killed (-9) at the masked-input stage, another at unmask; rounds 1 and 2
    complete. The server is killed in round 3 and restarted: it resumes after round 2, charges the
    interrupted round 3 (its clients had begun releasing) and runs round 4, where a client replays its
    round-2 masked input: the round fails with the protocol error, leaves the model as it was and is
    charged (a refused message is not a too-few-survivors failure: the server may hold enough answers
    to rebuild the sum). A last start with ``--rounds 4`` ends the run and writes the report."""
    config = _config(tmp_path, rounds=3, noise="central", threshold=3)
    kits = provision(tmp_path / "kits", client_ids=IDS)
    out = tmp_path / "out"
    port_file = tmp_path / "port"
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []

    def server(name: str, *extra: str) -> subprocess.Popen:
        port = ["--address", f"127.0.0.1:{port_file.read_text()}"] if port_file.exists() else ["--address", "127.0.0.1:0"]
        proc = _start("fedcore", "server", str(config), "--kit", str(kits / "server"), *port, "--port-file", str(port_file),
                      "--reply-deadline", "120", *extra, log=logs / f"{name}.log")  # fmt: skip
        procs.append(proc)
        return proc

    faults = {"zip-0+1": ("die-masked-input", "1"), "zip-2+3": ("die-unmask", "1"), "zip-8+9+non-US": ("replay", "3")}
    try:
        first = server("server-1")
        _wait_for(port_file.exists, what="the server's port", procs=[first])
        address = f"127.0.0.1:{port_file.read_text()}"
        clients = {}
        for cid in IDS:
            kit = ["--kit", str(kits / "clients" / cid), "--server", address]
            args = (
                ("tests.integration.deploy_peer", *faults[cid], str(config), *kit)
                if cid in faults
                else ("fedcore", "client", str(config), *kit)
            )
            clients[cid] = _start(*args, log=logs / f"{cid}.log")
        procs += clients.values()
        begun = out / "checkpoint.begun.json"  # round 3's write-ahead record: its updates are leaving the clients
        _wait_for(lambda: _checkpoint_round(out / "checkpoint") == 2 and begun.exists(), what="round 3's start", procs=[first])
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        before = load_checkpoint(out / "checkpoint")
        assert clients["zip-0+1"].wait(timeout=30) == -signal.SIGKILL and clients["zip-2+3"].wait(timeout=30) == -signal.SIGKILL
        r1, r2 = before.history
        assert (r1["participants"], r1["contributors"], r1["dropped"]) == (5, 4, 2)  # one sent its masked input before dying
        assert (r2["participants"], r2["failed"], r2["contributors"], r2["dropped"]) == (5, 2, 3, 2)

        second = server("server-2", "--resume", "--rounds", "4", "--enrol-timeout", "30")  # two clients are gone for good
        (tmp_path / "replay-gate").touch()  # the replaying client answers round 4 now, to the restarted server
        assert second.wait(timeout=BOUND) == 2
        log2 = (logs / "server-2.log").read_text()
        assert "resuming after round 2" in log2
        assert "round 4 failed and changed nothing: masked input for round 2; the server is in round 4" in log2, log2[-3000:]
        after = load_checkpoint(out / "checkpoint")
        charged = dp.Ledger.from_json(after.ledger_json).events[len(dp.Ledger.from_json(before.ledger_json).events) :]
        assert after.round_index == 4 and charged and {e.round_index for e in charged} == {3, 4}  # charged, not run again
        assert after.history[:2] == before.history and after.history[2]["interrupted"] and after.history[3]["interrupted"]
        assert (after.global_vector.tobytes(), after.extra) == (before.global_vector.tobytes(), before.extra)
        assert "replaying its masked input of round 2" in (logs / "zip-8+9+non-US.log").read_text()

        third = server("server-3", "--resume", "--rounds", "4")
        assert third.wait(timeout=BOUND) == 0, (logs / "server-3.log").read_text()[-3000:]
        for cid in ("zip-4+5", "zip-6+7", "zip-8+9+non-US"):
            assert clients[cid].wait(timeout=60) == 0  # the end of the run ends the clients
        report = json.loads((out / "privacy_report.json").read_text())
        assert {d["round"]: d["dropped"] for d in report["secure_aggregation"]["dropouts"]} == {1: 2, 2: 2}
        assert load_checkpoint(out / "checkpoint").ledger_json == after.ledger_json
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


def test_a_deployed_client_reads_its_own_ledger_back_from_its_kit_when_it_starts(tmp_path):
    """A client process restarted on its kit keeps its account of the updates it released."""
    from fedcore.deploy.processes import client_party
    from fedcore.deploy.provision import ClientKit
    from fedcore.experiments.config import load_config
    from fedcore.rounds.checkpoint import save_client_ledger

    config = load_config(_config(tmp_path, rounds=1, noise="central", threshold=3))
    kits = provision(tmp_path / "kits", client_ids=IDS)
    kit = ClientKit.load(kits / "clients" / IDS[0])
    side = client_party(config, kit)
    assert side.state_folder == kits / "clients" / IDS[0] / "state" and not side.spent[IDS[0]].events
    released = dp.Ledger()
    released.record(
        dp.SampleLevelEvent(client_id=IDS[0], round_index=1, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, steps=3)
    )
    save_client_ledger(side.state_folder, IDS[0], released.to_json())
    assert client_party(config, kit).spent[IDS[0]].events == released.events  # the restarted process reads it
