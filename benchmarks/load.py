"""Load: one synchronous round of 1,000 simulated clients with masked aggregation (SecAgg+ graph).

A :class:`fedcore.Federation` of 1,000 clients, each holding 40 examples of a small logistic
regression task (d = features + 1 shared parameters), trains one round locally and sums the
clipped updates with ``MaskedSum(graph="secagg+")`` (``--signed``: with ``signed_keys=True``,
every client message signed and the consistency check on): every client and the server run the
real protocol and exchange serialized messages, in this one process, pinned to 2 CPU cores. Reported: wall time of the round (and how much of it was local training), the SecAgg+
degree and threshold the planner chose, bytes sent per client, and memory: the process's peak
resident set size (``ru_maxrss``) before and after the round. The full run adds, side by side, a
plaintext round of the same federation and a masked round with 5% dropouts at random stages.

Usage: ``python benchmarks/load.py`` (full: d = 1,001, three rounds) or ``--quick`` (d = 17, the
masked round only). The last line is the summary the issue asks for.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dp  # noqa: E402
from fedcore import ClientData, DropoutSimulator, FedAvg, Federation, TrainConfig, UpdatePipeline  # noqa: E402
from secagg import MaskedSum, PlaintextSum  # noqa: E402


class LinearTask:
    """Logistic regression on ``features`` inputs: the smallest real workload for a load test."""

    name = "load-linear"
    local_only: tuple[str, ...] = ()
    primary_metric = "accuracy"
    higher_is_better = True

    def __init__(self, features: int) -> None:
        self.features = features

    def build_model(self) -> nn.Module:
        return nn.Linear(self.features, 1)

    def loss(self, model: nn.Module, batch):
        x, y = batch
        return nn.functional.binary_cross_entropy_with_logits(model(x).squeeze(-1), y, reduction="none")

    def evaluate(self, model: nn.Module, data):
        x, y = data.tensors
        return {"accuracy": float(((model(x).squeeze(-1) > 0).float() == y).float().mean())}

    def predict(self, model: nn.Module, batch):
        return torch.sigmoid(model(batch[0]).squeeze(-1))

    def collate(self, items):
        xs, ys = zip(*items)
        return torch.stack(xs), torch.stack(ys)


def make_clients(n: int, features: int, per_client: int, seed: int) -> dict[str, ClientData]:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=features)
    out = {}
    for i in range(n):
        x = rng.normal(size=(per_client, features)).astype(np.float32)
        y = ((x @ w + 0.3 * rng.normal(size=per_client)) > 0).astype(np.float32)
        out[f"client-{i:04d}"] = ClientData(train=TensorDataset(torch.from_numpy(x), torch.from_numpy(y)))
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def one_round(label: str, *, clients, features: int, backend, dropouts=None, seed: int) -> dict[str, float]:
    task = LinearTask(features)
    pipeline = UpdatePipeline(backend=backend, clip=dp.L2Clip(1.0), weighting="uniform")
    fed = Federation(
        task=task, clients=clients, strategy=FedAvg(), train=TrainConfig(optimizer="sgd", lr=0.1, batch_size=20),
        pipeline=pipeline, dropouts=dropouts, seed=seed, quiet=True, evaluate_every=0,
    )  # fmt: skip
    before = peak_rss_mb()
    started = time.perf_counter()
    record = fed.run_round()
    seconds = time.perf_counter() - started
    out = {
        "seconds": seconds,
        "train_seconds": float(record["client_train_seconds"]),
        "contributors": float(record["contributors"]),
        "dropped": float(record["dropped"]),
        "bytes_up_per_client": float(record["bytes_up"]) / max(len(clients), 1),
        "rss_before_mb": before,
        "peak_rss_mb": peak_rss_mb(),
    }
    described = backend.describe()
    extra = f"degree {described['degree']}, threshold {described['threshold']}" if "degree" in described else "no protection"
    print(
        f"| {label:<24} | {seconds:8.1f} | {out['train_seconds']:8.1f} | {int(out['contributors']):5d} | "
        f"{int(out['dropped']):4d} | {out['bytes_up_per_client']:10.0f} | {before:8.0f} | {out['peak_rss_mb']:8.0f} | {extra}",
        flush=True,
    )
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="d = 17 and the masked round only")
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--features", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--signed", action="store_true", help="signed masked rounds (active-server mode)")
    args = ap.parse_args(argv)
    cores = sorted(os.sched_getaffinity(0))[:2]
    os.sched_setaffinity(0, cores)
    torch.set_num_threads(1)
    features = args.features or (16 if args.quick else 1000)
    n = args.clients
    clients = make_clients(n, features, 40, args.seed)
    print(f"# load benchmark: {n} clients x 40 examples, logistic regression, d = {features + 1} shared parameters "
          f"(uniform weights); pinned to CPU cores {cores}; torch 1 thread")  # fmt: skip
    print(f"# process peak RSS after building the clients: {peak_rss_mb():.0f} MiB")
    print()
    print("| round                    | wall s   | train s  | sums  | drop | bytes up/c | RSS0 MiB | peak MiB | SecAgg+ plan")
    print("|---|---|---|---|---|---|---|---|---|")
    # untimed warm-up (first-call costs of torch and the crypto backends), so that rounds compare fairly
    warm = dict(list(clients.items())[:10])
    Federation(task=LinearTask(features), clients=warm, strategy=FedAvg(), train=TrainConfig(optimizer="sgd", lr=0.1, batch_size=20),
               pipeline=UpdatePipeline(backend=MaskedSum(value_bound=1.0, max_clients=10), clip=dp.L2Clip(1.0), weighting="uniform"),
               seed=args.seed, quiet=True, evaluate_every=0).run_round()  # fmt: skip
    masked = MaskedSum(value_bound=1.0, max_clients=n, graph="secagg+", signed_keys=args.signed)
    if not args.quick:
        plain = one_round("plaintext (reference)", clients=clients, features=features, backend=PlaintextSum(), seed=args.seed)
    result = one_round(
        "masked SecAgg+" + (", signed" if args.signed else ""), clients=clients, features=features, backend=masked, seed=args.seed
    )
    if not args.quick:
        dropped = one_round(
            "masked SecAgg+, 5% drop", clients=clients, features=features,
            backend=MaskedSum(value_bound=1.0, max_clients=n, graph="secagg+", signed_keys=args.signed),
            dropouts=DropoutSimulator(rate=0.05), seed=args.seed,
        )  # fmt: skip
        print()
        print(f"# masked / plaintext wall time: {result['seconds'] / plain['seconds']:.1f}x "
              f"(secure sum share of the masked round: {1 - result['train_seconds'] / result['seconds']:.0%}); "
              f"with 5% dropouts: {dropped['seconds'] / plain['seconds']:.1f}x")  # fmt: skip
    print(f"# guarantee of the plan: {masked.describe()['guarantee']}")
    print(f"load clients={n} seconds={result['seconds']:.1f} peak_rss_mb={result['peak_rss_mb']:.0f}"
          + (" signed=1" if args.signed else ""))  # fmt: skip


if __name__ == "__main__":
    main()
