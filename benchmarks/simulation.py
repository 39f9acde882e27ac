"""Framework overhead of one synchronous round: 100 MovieLens clients training MF, as parties.

Every round runs through the party boundary: the server party sends the model as bytes, each
client party trains, prepares its input and answers the protection session's messages with bytes.
Prints the round's wall time beside the sum of the clients' pure local-training time (measured
inside the same round, same process): R = round time / local-training time, target <= 1.10.
Then the same rounds with the client parties on Ray actors (one per CPU, each hosting a group) beside
in-process, side by side:
ray_ratio = Ray round time / in-process round time, target <= 1.20. Then one masked round with
the server's inbox recorded: how many plaintext updates the server received (must be 0).

Last line: ``parties overhead_ratio=R ray_ratio=Y server_plaintext_updates=0``.

Usage: python benchmarks/simulation.py [--quick] [--clients N] [--rounds N] [--no-ray]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the packages, not benchmarks/secagg.py

import dp
import secagg
from fedcore import FedAvg, Federation, FixedCountSampler, TrainConfig, UpdatePipeline
from fedcore.workloads.datasets import load_movielens100k
from fedcore.workloads.recsys import RecommenderConfig, movielens_federation


def _federation(fed_data, clients: int, **kwargs) -> Federation:
    return Federation(
        task=fed_data.task,
        clients=fed_data.clients,
        strategy=FedAvg(),
        train=TrainConfig(optimizer="adam", lr=0.01, epochs=1, batch_size=64),
        sampler=FixedCountSampler(count=clients),
        evaluate_every=0,
        seed=0,
        reproducible=True,
        quiet=True,
        **kwargs,
    )


def _rounds(federation: Federation, rounds: int, label: str) -> tuple[float, float]:
    """Round wall time and clients' training time over ``rounds`` rounds after a warm-up round."""
    federation.run_round()  # warm-up: allocator, first-touch of every client's data, actors
    total_round = total_train = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        record = federation.run_round()
        elapsed = time.perf_counter() - started
        train = record["client_train_seconds"]
        total_round += elapsed
        total_train += train
        print(f"{label:>10} {record['round']:>5} {elapsed:>9.3f} {train:>9.3f} {elapsed - train:>10.3f} {elapsed / train:>7.3f}")
    return total_round, total_train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 clients, 1 round")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="rounds measured (after one warm-up round)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray comparison")
    args = parser.parse_args()
    clients, rounds = (10, 1) if args.quick else (args.clients, args.rounds)
    torch.set_num_threads(1)

    fed_data = movielens_federation(load_movielens100k(), config=RecommenderConfig(model="mf"), partition="users")
    print(f"MovieLens-100K, one client per user, {clients} clients sampled per round, MF dim 32, parties over bytes")
    print(f"{'executor':>10} {'round':>5} {'round_s':>9} {'train_s':>9} {'overhead_s':>10} {'ratio':>7}")
    in_process, train = _rounds(_federation(fed_data, clients), rounds, "in-process")
    ray_ratio = float("nan")
    if not args.no_ray:
        from fedcore.rounds.ray_parties import RayParties

        with RayParties(fed_data.task) as host:  # one actor per CPU, each hosting its group of client parties
            on_ray, _ = _rounds(_federation(fed_data, clients, executor=host), rounds, "ray")
        ray_ratio = on_ray / in_process
    masked = UpdatePipeline(
        backend=secagg.MaskedSum(value_bound=1.0, max_clients=clients), clip=dp.L2Clip(1.0), weighting="uniform"
    )
    wiretapped = _federation(fed_data, min(clients, 20), pipeline=masked, record_inbox=True)
    wiretapped.run_round()
    plaintext_updates = sum(1 for r in wiretapped.channel.inbox if r.data[:4] == b"PFPT")
    print(
        f"masked round of {min(clients, 20)} clients: the server received {len(wiretapped.channel.inbox)} messages, "
        f"{wiretapped.channel.bytes_received:,} bytes, {plaintext_updates} plaintext updates"
    )
    print(
        f"parties overhead_ratio={in_process / train:.3f} ray_ratio={ray_ratio:.3f} server_plaintext_updates={plaintext_updates}"
    )


if __name__ == "__main__":
    main()
