"""Robust aggregation under attack on MovieLens-100K (MF, 5 regional silos by default): an HR@10 table.

Every aggregator trains the same model from the same seed: FedAvg (the reference), norm bounding
(FedAvg with client-side L2 clipping under *masked* aggregation, the defence that survives
masking), coordinate-wise median, trimmed mean (20%), Krum and Multi-Krum (f = 1). Each runs
clean, then with 10% attackers. With 5 silos, "10%" is ceil(0.1 * 5) = 1 attacker, i.e. 20%:
the smallest non-zero fraction, and a harder test than 10%; ``--silos 10`` gives exactly 10%
(1 of 10 regional silos). Attacks (fedcore.strategies.attacks):

* sign flip: the attacker sends the negation of its honest update (same norm);
* scaling: the attacker sends -10 x its honest update (a boosted sign flip, as in model
  replacement with explicit boosting; a large norm).

HR@10 / NDCG@10 follow the leave-one-out protocol with 99 sampled negatives, evaluated by each
silo on its own users (MF user embeddings never leave the silo), over all users. "drop" is the
clean FedAvg HR@10 minus the attacked one (positive = worse); part of any drop is the attacker
silo's honest data that the run no longer learns from, so the drop on the honest silos' users
only is shown beside it. The last line is the maximum all-users drop over the
Byzantine-robust aggregators (median, trimmed mean, Krum, Multi-Krum) and both attacks; norm
bounding is reported beside them but not in the maximum, since bounding norms cannot stop an
update of honest size pointing the wrong way.

Usage: ``python benchmarks/robust.py [--silos 10]`` (15 rounds, 10-20 minutes on 2 shared CPUs)
or ``--quick`` (6 rounds).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dp  # noqa: E402
from fedcore import FedAvg, Federation, InProcessExecutor, TrainConfig, UpdatePipeline  # noqa: E402
from fedcore.rounds.client import round_seed  # noqa: E402
from fedcore.strategies.attacks import PoisonedExecutor, Scaling, SignFlip, choose_attackers  # noqa: E402
from fedcore.strategies.robust import CoordinateMedian, Krum, MultiKrum, TrimmedMean  # noqa: E402
from fedcore.workloads.datasets import load_movielens100k  # noqa: E402
from fedcore.workloads.recsys import RecommenderConfig, movielens_federation  # noqa: E402
from secagg import MaskedSum  # noqa: E402

ROBUST = ("median", "trimmed mean 20%", "Krum f=1", "Multi-Krum f=1")


def honest_update_norm(ml, train: TrainConfig, seed: int) -> float:
    """Median L2 norm of the silos' first-round updates (the norm bound the defence uses)."""
    fed = Federation(task=ml.task, clients=ml.clients, strategy=FedAvg(), train=train, seed=seed, quiet=True, evaluate_every=0)
    clients = [fed.clients[c] for c in fed.client_ids]
    results = fed.executor.fit(
        clients, global_vector=torch.from_numpy(fed.global_vector), config=train,
        seeds=[round_seed(seed, 1, c.client_id) for c in clients], round_index=1, update_kind="delta", privacy=None,
    )  # fmt: skip
    return float(np.median([np.linalg.norm(r.update.astype(np.float64)) for r in results]))


def build(name: str, *, ml, bound: float):
    """(strategy, pipeline or None, allow_reveal) for one aggregator."""
    n = len(ml.clients)
    if name == "FedAvg":
        return FedAvg(), None, False
    if name == "norm bound (masked)":
        largest = max(c.num_train for c in ml.clients.values())
        backend = MaskedSum(value_bound=max(bound, 1.0), max_clients=n)
        return FedAvg(), UpdatePipeline(backend=backend, clip=dp.L2Clip(bound), max_examples=largest), False
    rules = {
        "median": lambda: CoordinateMedian(),
        "trimmed mean 20%": lambda: TrimmedMean(trim_fraction=0.2),
        "Krum f=1": lambda: Krum(num_byzantine=1),
        "Multi-Krum f=1": lambda: MultiKrum(num_byzantine=1),
    }
    return rules[name](), None, True


def evaluate_on(fed: Federation, ids) -> dict[str, float]:
    """HR@10 / NDCG@10 over the users of the given clients only (example-weighted, like ``Federation.evaluate``)."""
    scores = fed.executor.evaluate([fed.clients[c] for c in ids], global_vector=torch.from_numpy(fed.global_vector), split="test")
    total = sum(n for _, n in scores)
    return {k: sum(m[k] * n for m, n in scores) / total for k in ("hr@10", "ndcg@10")}


def run(
    name: str, attack, *, ml, train: TrainConfig, rounds: int, seed: int, attackers, bound: float
) -> tuple[dict, dict, float]:
    strategy, pipeline, reveal = build(name, ml=ml, bound=bound)
    executor = InProcessExecutor(ml.task)
    if attack is not None:
        executor = PoisonedExecutor(executor, attackers=attackers, attack=attack, rng=np.random.default_rng(seed + 1))
    fed = Federation(
        task=ml.task, clients=ml.clients, strategy=strategy, train=train, pipeline=pipeline, executor=executor,
        allow_reveal=reveal, seed=seed, quiet=True, evaluate_every=0,
    )  # fmt: skip
    start = time.perf_counter()
    fed.run(rounds)
    honest = [c for c in fed.client_ids if c not in set(attackers)]
    return fed.evaluate("test"), evaluate_on(fed, honest), time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="6 rounds instead of 15")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--silos", type=int, default=5, help="regional silos (5 by default; 10 makes one attacker exactly 10%%)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core box)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (6 if args.quick else 15)
    train = TrainConfig(lr=1e-2, epochs=1, batch_size=256)

    ml = movielens_federation(
        load_movielens100k(args.cache_dir),
        config=RecommenderConfig(model="mf", dim=32),
        partition="regions",
        num_silos=args.silos,
    )
    attackers = choose_attackers(sorted(ml.clients), fraction=0.1, rng=np.random.default_rng(args.seed))
    bound = honest_update_norm(ml, train, args.seed)
    print(f"# robust aggregation benchmark: MovieLens-100K, MF dim 32, {ml.partition_rule}")
    print(f"# {rounds} rounds, Adam lr 1e-2, 1 local epoch, batch 256, seed {args.seed}; {os.cpu_count()} CPUs, "
          f"{args.threads} torch thread(s)")  # fmt: skip
    n = len(ml.clients)
    print(f"# attackers (fraction 0.1 -> ceil({0.1 * n:g}) = {len(attackers)} of {n} silos = {len(attackers) / n:.0%}): {list(attackers)}; "
          f"norm bound = median first-round honest update norm = {bound:.4f}")  # fmt: skip
    attacks = {"clean": None, "sign flip": SignFlip(), "scaling x(-10)": Scaling(factor=-10.0)}
    names = ["FedAvg", "norm bound (masked)", *ROBUST]
    results: dict[tuple[str, str], tuple[dict, dict]] = {}
    for name in names:
        for label, attack in attacks.items():
            metrics, honest, seconds = run(
                name, attack, ml=ml, train=train, rounds=rounds, seed=args.seed, attackers=attackers, bound=bound
            )
            results[(name, label)] = (metrics, honest)
            print(f"#   {name:<20} {label:<15} HR@10 {metrics['hr@10']:.4f}  NDCG@10 {metrics['ndcg@10']:.4f}  "
                  f"honest users HR@10 {honest['hr@10']:.4f}  ({seconds:.0f} s)", flush=True)  # fmt: skip

    reference, reference_honest = (m["hr@10"] for m in results[("FedAvg", "clean")])
    print()
    print(
        "| aggregator | clean HR@10 | sign flip HR@10 (drop) | scaling x(-10) HR@10 (drop) | worst drop, honest silos' users | NDCG@10 clean / flip / scaling |"
    )
    print("|---|---|---|---|---|---|")
    drops = []
    for name in names:
        row = [results[(name, label)] for label in attacks]
        cells = [f"{row[0][0]['hr@10']:.3f}"]
        for metrics, _ in row[1:]:
            drop = reference - metrics["hr@10"]
            cells.append(f"{metrics['hr@10']:.3f} ({drop:+.3f})")
            if name in ROBUST:
                drops.append(drop)
        honest_drop = max(reference_honest - honest["hr@10"] for _, honest in row[1:])
        ndcg = " / ".join(f"{m['ndcg@10']:.3f}" for m, _ in row)
        print(f"| {name} | " + " | ".join(cells) + f" | {honest_drop:+.3f} | {ndcg} |")
    print()
    print(f"# drop = clean FedAvg HR@10 ({reference:.4f}; honest silos' users {reference_honest:.4f}) minus the attacked "
          f"run's; the maximum is over {', '.join(ROBUST)} and both attacks, all users")  # fmt: skip
    print(f"robust max_hr10_drop={max(drops):.4f}")


if __name__ == "__main__":
    main()
