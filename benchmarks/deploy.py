"""Deployment overhead: masked rounds of 5 MovieLens MF silos as separate processes (gRPC + mutual TLS) vs in-process parties.

Runs the same experiment twice, side by side: ``fedcore run`` (client parties in the server's
process, bytes through the in-memory channel) and ``fedcore launch`` (a server process and one
process per client on 127.0.0.1). Prints each round's wall time from both runs' metrics (round 1,
which includes start-up and enrolment, is a warm-up and left out of the ratio) and the bytes on
the wire per client per round: frame bytes up (client -> server) and down, beside the masked
protocol's own upload count (``bytes_up``, the protocol messages alone).

With ``--scale N`` (default 20) it then launches N client processes (one MovieLens user each) for
one SecAgg+ round and reports whether every one of them contributed (``--scale 0`` skips it).

Last line: ``deploy round_ratio=X wire_over_protocol=Y bytes_per_client=Z clients_N_ok=0|1`` (Z: frame
bytes up per client per round).

Usage: python benchmarks/deploy.py [--quick] [--rounds N] [--max-users N] [--scale N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 5

CONFIG = """
name = "deploy-bench"
seed = 0
reproducible = true
rounds = {rounds}
evaluate_every = 0
[workload]
case = "movielens"
model = "mf"
num_silos = {clients}
max_users = {max_users}
[train]
batch_size = 256
[aggregation]
mode = "masked"
[privacy]
clip = 10.0
[logging]
tensorboard = false
quiet = true
"""


def _run(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(
        [sys.executable, "-m", "fedcore", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800
    )
    if done.returncode != 0:
        sys.exit(f"fedcore {args[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def _rounds(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds per run (the first is a warm-up)")
    parser.add_argument("--max-users", type=int, default=300)
    parser.add_argument("--scale", type=int, default=20, help="client processes of the SecAgg+ round (0: skip)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, 100 users, 3 processes in the SecAgg+ round")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.max_users, args.scale = 2, 100, min(args.scale, 3)
    with tempfile.TemporaryDirectory(prefix="deploy-bench-") as tmp:
        config = Path(tmp) / "job.toml"
        config.write_text(CONFIG.format(rounds=args.rounds, clients=CLIENTS, max_users=args.max_users))
        _run("run", str(config), "--out", f"{tmp}/inprocess", "--quiet")
        _run("launch", str(config), "--clients", str(CLIENTS), "--out", f"{tmp}/deployed", "--quiet")
        local, deployed = _rounds(Path(tmp) / "inprocess"), _rounds(Path(tmp) / "deployed")
        wire = json.loads((Path(tmp) / "deployed" / "deployment.json").read_text())
        scale_ok = None
        if args.scale:
            scaled = CONFIG.format(rounds=1, clients=args.scale, max_users=args.scale)
            scaled = scaled.replace('mode = "masked"', 'mode = "masked"\ngraph = "secagg+"')
            config.write_text(scaled.replace('model = "mf"', 'model = "mf"\npartition = "users"'))
            _run("launch", str(config), "--clients", str(args.scale), "--out", f"{tmp}/scale", "--quiet")
            (record,) = _rounds(Path(tmp) / "scale")
            scale_ok = int(record["contributors"] == args.scale)
            print(f"SecAgg+ round of {args.scale} client processes: {int(record['contributors'])} contributors, "
                  f"{record['round_seconds']:.1f} s")  # fmt: skip

    print(f"{'round':>5} {'in-process s':>13} {'processes s':>12} {'ratio':>7}")
    ratios = []
    for a, b in zip(local, deployed):
        ratio = b["round_seconds"] / a["round_seconds"]
        if a["round"] > 1:
            ratios.append(ratio)
        print(
            f"{int(a['round']):>5} {a['round_seconds']:>13.3f} {b['round_seconds']:>12.3f} {ratio:>7.3f}{'  (warm-up)' if a['round'] == 1 else ''}"
        )
    rounds = len(deployed)
    up = sum(wire["wire_received"].values()) / CLIENTS / rounds
    down = sum(wire["wire_sent"].values()) / CLIENTS / rounds
    protocol = sum(r["bytes_up"] for r in deployed) / CLIENTS / rounds
    print(f"\nbytes per client per round: up {up:,.0f} (frames), down {down:,.0f} (frames), masked protocol up {protocol:,.0f}")
    print(
        "up = the protocol's messages + the training report, acknowledgements and 9-byte frame headers; down includes the model"
    )
    scale = f" clients_{args.scale}_ok={scale_ok}" if scale_ok is not None else ""
    print(
        f"deploy round_ratio={statistics.median(ratios):.3f} wire_over_protocol={up / protocol:.4f} bytes_per_client={up:.0f}{scale}"
    )


if __name__ == "__main__":
    main()
