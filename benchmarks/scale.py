"""Scaling out: Ray's overhead on a synchronous round, and FedBuff against synchronous FedAvg.

1. Ray overhead. MovieLens-100K, matrix factorisation, one client per user (943 clients), a
   synchronous FedAvg round of 100 clients (``FixedCountSampler(100)``, one local epoch), run
   in process and on a local Ray instance (2 CPUs) with 1 actor (the same compute as in
   process: the pure overhead of serialization, scheduling and shipping data and local state)
   and with 2 actors (both cores). Each comparison runs the same rounds (same seed) of two
   federations interleaved round by round, after one warm-up round each (actor start-up is not
   counted); ``ratio`` is the median Ray round time over the median in-process round time.
   ``same_model`` checks that Ray reached the in-process model bit for bit.
2. FedBuff against synchronous rounds. MovieLens-100K, MF, 5 regional silos: synchronous
   FedAvg for R rounds (5 R client updates), then FedBuff (buffer K=2, all 5 silos busy,
   polynomial staleness (1+tau)^-0.5, log-normal silo speeds, exponential latencies) for 5R/K
   server updates, i.e. the same number of client updates. HR@10 (leave-one-out, 99 sampled
   negatives) of both final models; ``fedbuff_hr10_gap`` = synchronous minus FedBuff HR@10.

Torch runs one intra-op thread in the driver and in each actor (the models are small, and the
machine is shared). Times are wall-clock on a shared 2-core machine: read the ratios.

Usage: ``python benchmarks/scale.py`` (a few minutes) or ``--quick`` (smaller: a smoke test
that still starts Ray, so it takes tens of seconds).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
import torch  # noqa: E402

from fedcore import FedAvg, Federation, FixedCountSampler, TrainConfig  # noqa: E402
from fedcore.rounds.asynchronous import AsyncFederation, Exponential, FedBuff, LogNormal, PolynomialStaleness, VirtualClock  # noqa: E402
from fedcore.rounds.ray_parties import RayParties  # noqa: E402
from fedcore.workloads.datasets import load_movielens100k  # noqa: E402
from fedcore.workloads.recsys import RecommenderConfig, movielens_federation  # noqa: E402

now = time.perf_counter


def ray_overhead(data, *, clients_per_round: int, timed_rounds: int, max_users: int | None) -> list[dict]:
    ml = movielens_federation(data, config=RecommenderConfig(model="mf", dim=32), partition="users", max_users=max_users)
    train = TrainConfig(optimizer="adam", lr=0.01, epochs=1, batch_size=64)

    def federation(executor=None) -> Federation:
        return Federation(
            task=ml.task, clients=ml.clients, strategy=FedAvg(), train=train, sampler=FixedCountSampler(clients_per_round),
            executor=executor, seed=0, reproducible=True, quiet=True, evaluate_every=0,
        )  # fmt: skip

    rows = []
    for workers in (1, 2):
        executor = RayParties(ml.task, num_actors=workers)
        local, remote = federation(), federation(executor)
        local.run_round()
        remote.run_round()  # warm-up: actor start-up, first data shipped
        times: dict[str, list[float]] = {"in-process": [], "ray": []}
        for _ in range(timed_rounds):
            for name, fed in (("in-process", local), ("ray", remote)):
                t0 = now()
                fed.run_round()
                times[name].append(now() - t0)
        same = bool(np.array_equal(local.global_vector, remote.global_vector))
        executor.shutdown_actors()  # Ray itself was started by this script
        base, on_ray = statistics.median(times["in-process"]), statistics.median(times["ray"])
        rows.append({"workers": workers, "in_process_s": base, "ray_s": on_ray, "ratio": on_ray / base, "same_model": same})
        print(f"  ray {workers} actor(s): in-process {base:.2f}s, ray {on_ray:.2f}s per round", file=sys.stderr, flush=True)
    return rows


def fedbuff_vs_sync(data, *, rounds: int, buffer_size: int, max_users: int | None) -> dict:
    ml = movielens_federation(data, config=RecommenderConfig(model="mf", dim=32), partition="regions", max_users=max_users)
    train = TrainConfig(optimizer="adam", lr=0.01, epochs=1, batch_size=1024)
    silos = len(ml.clients)

    def federation() -> Federation:
        return Federation(task=ml.task, clients=ml.clients, strategy=FedAvg(), train=train, seed=0, quiet=True, evaluate_every=0)

    t0 = now()
    sync = federation()
    sync.run(rounds)
    hr_sync = sync.evaluate()["hr@10"]
    sync_s = now() - t0
    t0 = now()
    fed = federation()
    clock = VirtualClock(speed=LogNormal(1.0, 0.5), latency=Exponential(1.0), seconds_per_example=1e-3)
    schedule = FedBuff(buffer_size=buffer_size, concurrency=silos, staleness=PolynomialStaleness(0.5))
    runner = AsyncFederation(fed, schedule=schedule, clock=clock)
    updates = rounds * silos // buffer_size
    runner.run(updates)
    hr_buff = fed.evaluate()["hr@10"]
    buff_s = now() - t0
    staleness = [tau for h in runner.history for tau in h["staleness"]]
    per_silo = {cid: sum(cid in h["clients"] for h in runner.history) for cid in fed.client_ids}
    return {
        "silos": silos, "rounds": rounds, "client_updates_sync": rounds * silos, "server_updates": updates,
        "client_updates_fedbuff": runner.applied, "hr_sync": hr_sync, "hr_fedbuff": hr_buff,
        "staleness_mean": float(np.mean(staleness)), "staleness_max": int(max(staleness)),
        "virtual_time": runner.now, "sync_s": sync_s, "fedbuff_s": buff_s, "updates_per_silo": per_silo,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_movielens100k()
    if args.quick:
        ray_cfg = dict(clients_per_round=10, timed_rounds=1, max_users=60)
        buff_cfg = dict(rounds=2, buffer_size=2, max_users=120)
    else:
        ray_cfg = dict(clients_per_round=100, timed_rounds=5, max_users=None)
        buff_cfg = dict(rounds=10, buffer_size=2, max_users=None)
    print("# scale benchmark (wall-clock seconds, shared 2-core machine; torch: 1 thread per process)")
    t0 = now()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    print(f"# local Ray started in {now() - t0:.1f}s ({ray.__version__}, 2 CPUs)")
    ray_rows = ray_overhead(data, **ray_cfg)
    ray.shutdown()
    buff = fedbuff_vs_sync(data, **buff_cfg)

    print()
    print(f"## Ray vs in-process: synchronous round of {ray_cfg['clients_per_round']} MovieLens clients (one per user)")
    print(f"{'actors':>6} {'in-process_s':>13} {'ray_s':>8} {'ratio':>7} {'same_model':>11}")
    for r in ray_rows:
        print(f"{r['workers']:>6} {r['in_process_s']:>13.3f} {r['ray_s']:>8.3f} {r['ratio']:>7.3f} {str(r['same_model']):>11}")
    print()
    print(f"## FedBuff vs synchronous FedAvg: MovieLens MF, {buff['silos']} regional silos, same number of client updates")
    print(f"{'run':>10} {'client_upd':>10} {'server_upd':>10} {'HR@10':>7} {'wall_s':>7}")
    print(f"{'sync':>10} {buff['client_updates_sync']:>10} {buff['rounds']:>10} {buff['hr_sync']:>7.4f} {buff['sync_s']:>7.1f}")
    print(
        f"{'fedbuff':>10} {buff['client_updates_fedbuff']:>10} {buff['server_updates']:>10} {buff['hr_fedbuff']:>7.4f} {buff['fedbuff_s']:>7.1f}"
    )
    print(f"# FedBuff: K=2, concurrency {buff['silos']}, staleness mean {buff['staleness_mean']:.2f} max {buff['staleness_max']}, "
          f"virtual time {buff['virtual_time']:.1f}s, results per silo {buff['updates_per_silo']}")  # fmt: skip
    overhead = ray_rows[0]["ratio"]
    print("# ray_overhead_ratio: the 1-actor Ray round time over the in-process round time (same compute);")
    print(f"# with 2 actors the ratio is {ray_rows[1]['ratio']:.3f}. fedbuff_hr10_gap = HR@10 sync - HR@10 FedBuff.")
    print(f"scale ray_overhead_ratio={overhead:.3f} fedbuff_hr10_gap={buff['hr_sync'] - buff['hr_fedbuff']:.4f}")


if __name__ == "__main__":
    main()
