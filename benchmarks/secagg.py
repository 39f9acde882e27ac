"""Benchmark of masked secure aggregation (SecAgg complete graph and SecAgg+).

For n in {10, 100} and d in {1e5, 1e6}, for the complete graph and the SecAgg+ plan of
``plan_secagg_plus(n=n, dropout_rate=0.1, corrupted_fraction=0.1, active_server=True)`` (the
complete graph with the signed planner's threshold), it drives real signed rounds (every
client message Ed25519-signed, the consistency check on) through the public client/server
state machines and measures, in process CPU seconds (``time.process_time``):

* client setup: ``advertise`` + ``share_keys`` (key generation, Shamir, sealing shares);
* client masked input: ``masked_input`` (opening shares, key agreement, mask expansion,
  adding, writing and signing the packed message), beside the keystream floor measured right
  after each client: the time to generate the same number of AES-256-CTR keystream bytes
  (self mask + one per neighbour that shared) into a preallocated buffer;
* the consistency round at the client: ``consistency_check`` (checking and signing the
  survivor set) plus ``unmask`` (verifying its holders' survivor signatures, answering), as a
  fraction of its masked-input time (``consistency_overhead``, an upper bound: it includes
  the unmask answer, which runs without the consistency check too);
* encoding of a float32 update (stochastic rounding), reported apart;
* server: summing the masked inputs (beside the plaintext float32 sum of the same vectors),
  and unmasking (requests, responses, Shamir reconstruction, mask regeneration) with 0%
  and 10% dropouts; the 10% drop after sharing keys and before sending their masked
  input, the case that makes the server regenerate pairwise masks; beside the server's
  keystream floor (the keystream bytes it must regenerate);
* upload bytes per client (all four message kinds) and per coordinate;
* round completion rate under 10% random dropouts (each client independently, at a
  uniformly random stage): Monte-Carlo of the exact completion rules, cross-checked by
  real rounds at small d;
* the split-survivor-set attacks of issue 17 (tests/unit/secagg/test_masked_attacks.py) run
  against every active-secure SecAgg+ plan at n = 30, 40, 100: how many plans they unmask;
* scale: one signed SecAgg+ round at n = 1000, d = 1e5, 10% dropped before their masked
  input: the server's consistency + unmask CPU (``--no-scale`` leaves it out). The
  10,000-client round is not run here (``n10000_ok=skipped``).

Timings are ratios taken side by side in one run on a shared machine: read the ratios
more than the absolute figures. The last line is the summary the issue asks for.

Usage: ``python benchmarks/secagg.py`` (full, a few minutes) or ``--quick`` (seconds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from secagg import DropoutError, MaskedSum, Stage, plan_complete, plan_secagg_plus
from secagg import _primitives as prim  # noqa: E402
from secagg.encoding import FixedPointEncoder
from secagg.graph import simulate_completion
from secagg.messages import ShareDelivery
from secagg.protocol import (
    RoundPolicy,  # noqa: E402
    SecAggClient,
    SecAggServer,
    secure_sum_integers,
)

cpu = time.process_time


def keystream_floor(streams: int, d: int, buf: np.ndarray) -> float:
    """CPU seconds to generate ``streams`` keystreams of d 32-bit words into ``buf``."""
    t0 = cpu()
    for _ in range(streams):
        prim.fill_keystream(os.urandom(32), buf)
    return cpu() - t0


def run_round(words, *, threshold, degree, drop, round_index, check, signed=True) -> dict:
    """One signed round through the state machines; ``drop`` go silent at MASKED_INPUT."""
    ids = sorted(words)
    d = next(iter(words.values())).size
    keys = {c: prim.new_identity_key() for c in ids} if signed else {}
    pki = {c: prim.identity_public_raw(k) for c, k in keys.items()} if signed else None
    server = SecAggServer(round_index=round_index, participants=ids, threshold=threshold, degree=degree, length=d, identities=pki)
    policy = RoundPolicy(tuple(ids), threshold, min(degree, len(ids) - 1), 32, signed)
    clients = {
        c: SecAggClient(c, round_index=round_index, policy=policy, identity_key=keys.get(c), identity_keys=pki) for c in ids
    }
    setup = {c: 0.0 for c in ids}
    setups = server.setup_messages()
    for c in ids:
        t0 = cpu()
        msg = clients[c].advertise(setups[c])
        setup[c] += cpu() - t0
        server.receive_advertisement(msg)
    lists = server.key_lists()
    for c in ids:
        t0 = cpu()
        bundle = clients[c].share_keys(lists[c])
        setup[c] += cpu() - t0
        server.receive_shares(bundle)
    deliveries = server.share_deliveries()
    buf = np.empty(d, np.uint32)
    mask_t, floor_t, server_sum = [], [], 0.0
    for c in ids:
        if c in drop:
            continue
        t0 = cpu()
        data = clients[c].masked_input(deliveries[c], vector=words[c])
        mask_t.append(cpu() - t0)
        streams = 1 + len(ShareDelivery.from_bytes(deliveries[c]).shares)
        floor_t.append(keystream_floor(streams, d, buf))
        t0 = cpu()
        server.receive_masked_input(data)
        server_sum += cpu() - t0
        del data
    unmask, consistency = 0.0, []
    if signed:
        t0 = cpu()
        sets = server.survivor_sets()
        unmask += cpu() - t0
        for c, msg in sets.items():
            t0 = cpu()
            sig = clients[c].consistency_check(msg)
            consistency.append(cpu() - t0)
            t0 = cpu()
            server.receive_survivor_signature(sig)
            unmask += cpu() - t0
    t0 = cpu()
    requests = server.unmask_requests()
    unmask += cpu() - t0
    answer = {}
    for c, msg in requests.items():
        t0 = cpu()
        resp = clients[c].unmask(msg)
        answer[c] = cpu() - t0
        t0 = cpu()
        server.receive_unmask(resp)
        unmask += cpu() - t0
    t0 = cpu()
    total = server.finish()
    unmask += cpu() - t0
    alive = set(ids) - set(drop)
    server_streams = len(alive) + sum(sum(1 for u in server.neighbours_of(v) if u in alive) for v in drop)
    server_floor = keystream_floor(server_streams, d, buf)
    expect = np.zeros(d, np.uint32)
    for c in sorted(alive):
        expect += words[c]
    if check and not np.array_equal(total, expect):
        raise AssertionError("masked sum differs from the plaintext ring sum")
    mask = sum(mask_t) / len(mask_t)
    cc = (sum(consistency) + sum(answer.values())) / max(1, len(answer))
    return {
        "setup": statistics.mean(setup.values()),
        "mask": mask,
        "floor": sum(floor_t) / len(floor_t),
        "consistency_overhead": cc / mask,
        "server_sum": server_sum,
        "unmask": unmask,
        "server_floor": server_floor,
        "server_streams": server_streams,
        "upload": sum(server.bytes_up.values()) / len(ids),
        "bytes_up": dict(server.bytes_up),
    }


def attacked_plans() -> tuple[int, int]:
    """How many active-secure SecAgg+ plans (n = 30, 40, 100) the issue-17 split attacks unmask."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.unit.secagg.test_masked_attacks import _Federation, _SplitServer, _strategies

    plans = attacked = 0
    for n in (30, 40, 100):
        backend = MaskedSum(value_bound=1.0, max_clients=n, graph="secagg+", signed_keys=True, dropout_rate=0.1)
        if not backend.plan(n).active_secure:
            continue
        plans += 1
        hit = False
        for name in ("drop-neighbours-per-holder", "two-sets", "one-neighbour-each"):
            fed = _Federation(backend, n)
            attack = _SplitServer(fed, target=fed.ids[n // 3])
            recovered = attack.try_unmask_target(attack.run(_strategies(attack)[name]))
            hit |= recovered is not None and bool(np.array_equal(recovered, fed.words[fed.ids[n // 3]]))
        attacked += hit
    return attacked, plans


def scale_round(n: int, d: int, rng) -> float:
    """Server consistency + unmask CPU of one signed SecAgg+ round, 10% silent before their masked input."""
    backend = MaskedSum(value_bound=1.0, max_clients=n, graph="secagg+", signed_keys=True, dropout_rate=0.1)
    plan = backend.plan(n)
    ids = [f"c{i:04d}" for i in range(n)]
    pool = [rng.integers(0, 2**32, d, dtype=np.uint32) for _ in range(4)]
    words = {c: pool[i % 4] for i, c in enumerate(ids)}
    drop = {c: Stage.MASKED_INPUT for c in rng.choice(ids, size=n // 10, replace=False).tolist()}
    keys = {c: prim.new_identity_key() for c in ids}
    res = secure_sum_integers(
        words, round_index=1, threshold=plan.threshold, degree=plan.degree, dropouts=drop, identity_keys=keys
    )
    expect = np.zeros(d, np.uint32)
    for c in res.contributors:
        expect += words[c]
    if not np.array_equal(res.total, expect):
        raise AssertionError("n=1000 round returned a wrong sum")
    cpu_s = res.cpu_seconds
    print(f"# scale n={n} d={d}: SecAgg+ k={plan.degree} t={plan.threshold}; cpu per party/stage: "
          + ", ".join(f"{k}={v:.2f}" for k, v in sorted(cpu_s.items())))  # fmt: skip
    return cpu_s.get("server_consistency", 0.0) + cpu_s.get("server_unmask", 0.0)


def real_completion(n, *, threshold, degree, rounds, rng) -> tuple[int, int]:
    """Real rounds at d=64 with each client dropping w.p. 0.1 at a random stage."""
    ok = 0
    ids = [f"c{i:03d}" for i in range(n)]
    for r in range(rounds):
        words = {c: rng.integers(0, 2**32, 64, dtype=np.uint32) for c in ids}
        dropouts = {c: Stage(int(rng.integers(0, len(Stage)))) for c in ids if rng.random() < 0.1}
        keys = {c: prim.new_identity_key() for c in ids}
        try:
            res = secure_sum_integers(
                words, round_index=r, threshold=threshold, degree=degree, dropouts=dropouts, identity_keys=keys
            )
        except DropoutError:
            continue
        expect = np.zeros(64, np.uint32)
        for c in res.contributors:
            expect += words[c]
        if not np.array_equal(res.total, expect):
            raise AssertionError("real round returned a wrong sum")
        ok += 1
    return ok, rounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny configuration (seconds): a smoke test")
    ap.add_argument("--ns", type=int, nargs="*", default=None, help="client counts (default 10 100)")
    ap.add_argument("--ds", type=int, nargs="*", default=None, help="vector lengths (default 1e5 1e6)")
    ap.add_argument("--trials", type=int, default=None, help="simulated rounds for the completion rate")
    ap.add_argument("--real-rounds", type=int, default=None, help="real d=64 rounds cross-checking it")
    ap.add_argument("--no-scale", action="store_true", help="leave out the n=1000 round")
    ap.add_argument("--no-attacks", action="store_true", help="leave out the split-attack count")
    args = ap.parse_args()
    if args.quick:
        ns, ds, trials, real_rounds = [10], [10_000], 2_000, 3
    else:
        ns, ds, trials, real_rounds = [10, 100], [100_000, 1_000_000], 200_000, 30
    ns, ds = args.ns or ns, args.ds or ds
    trials, real_rounds = args.trials or trials, args.real_rounds if args.real_rounds is not None else real_rounds
    rng = np.random.default_rng(2024)
    rows = []
    summary = {}
    print(f"# masked secure aggregation benchmark (CPU seconds via time.process_time; {os.cpu_count()} CPUs)")
    for n in ns:
        plus = plan_secagg_plus(n=n, dropout_rate=0.1, corrupted_fraction=0.1, active_server=True)
        full = plan_complete(n=n, dropout_rate=0.1, corrupted_fraction=0.1, active_server=True)
        settings = [("complete", n - 1, full.threshold), ("secagg+", plus.degree, plus.threshold)]
        print(f"# n={n} secagg+ plan: {plus.guarantee}")
        completion = {}
        for name, k, t in settings:
            plan = plus if name == "secagg+" else full
            sim = simulate_completion(plan, dropout_rate=0.1, trials=trials, rng=rng, signed=True)
            real = real_completion(n, threshold=t, degree=k, rounds=real_rounds, rng=rng)
            completion[name] = (sim, real)
        for d in ds:
            floats = {f"c{i:03d}": rng.uniform(-1, 1, d).astype(np.float32) for i in range(n)}
            enc = FixedPointEncoder(value_bound=1.0, max_clients=n)
            t0 = cpu()
            words = {c: enc.encode(v, rng=rng) for c, v in floats.items()}
            encode_s = (cpu() - t0) / n
            acc = np.zeros(d, np.float32)
            t0 = cpu()
            for v in floats.values():
                np.add(acc, v, out=acc)
            plain_sum = cpu() - t0
            del floats
            ids = sorted(words)
            drop = set(rng.choice(ids, size=max(1, n // 10), replace=False).tolist())
            for name, k, t in settings:
                r0 = run_round(words, threshold=t, degree=k, drop=set(), round_index=1, check=True)
                r10 = run_round(words, threshold=t, degree=k, drop=drop, round_index=2, check=True)
                sim, (ok, total) = completion[name]
                row = {
                    "n": n,
                    "d": d,
                    "graph": name,
                    "k": min(k, n - 1),
                    "t": t,
                    "setup_ms": 1e3 * r0["setup"],
                    "mask_ms": 1e3 * r0["mask"],
                    "floor_ms": 1e3 * r0["floor"],
                    "vs_floor": r0["mask"] / r0["floor"],
                    "cc_over": r0["consistency_overhead"],
                    "enc_ms": 1e3 * encode_s,
                    "vs_floor_enc": (r0["mask"] + encode_s) / r0["floor"],
                    "srv_sum_ms": 1e3 * r0["server_sum"],
                    "plain_ms": 1e3 * plain_sum,
                    "unmask0_s": r0["unmask"],
                    "floor0_s": r0["server_floor"],
                    "unmask10_s": r10["unmask"],
                    "floor10_s": r10["server_floor"],
                    "up_B": r0["upload"],
                    "B_coord": r0["upload"] / d,
                    "sim": sim,
                    "real": f"{ok}/{total}",
                }
                rows.append(row)
                summary[(n, d, name)] = (row, r10)
                print(
                    f"# n={n} d={d} {name}: k={row['k']} t={t} bytes_up per kind (0% round): {r0['bytes_up']}; "
                    f"server regenerates {r10['server_streams']} keystreams at 10% dropouts"
                )
            del words
    cols = [
        ("n", "{:>4}"),
        ("d", "{:>8}"),
        ("graph", "{:>9}"),
        ("k", "{:>3}"),
        ("t", "{:>3}"),
        ("setup_ms", "{:>8.1f}"),
        ("mask_ms", "{:>8.1f}"),
        ("floor_ms", "{:>8.1f}"),
        ("vs_floor", "{:>8.2f}"),
        ("cc_over", "{:>7.3f}"),
        ("enc_ms", "{:>6.1f}"),
        ("vs_floor_enc", "{:>12.2f}"),
        ("srv_sum_ms", "{:>10.1f}"),
        ("plain_ms", "{:>8.1f}"),
        ("unmask0_s", "{:>9.3f}"),
        ("floor0_s", "{:>8.3f}"),
        ("unmask10_s", "{:>10.3f}"),
        ("floor10_s", "{:>9.3f}"),
        ("up_B", "{:>10.0f}"),
        ("B_coord", "{:>7.3f}"),
        ("sim", "{:>8.6f}"),
        ("real", "{:>6}"),
    ]
    print()
    print(" ".join(f"{name:>{len(fmt.format(rows[0][name]))}}" for name, fmt in cols))
    for row in rows:
        print(" ".join(fmt.format(row[name]) for name, fmt in cols))
    print()
    print(
        "# setup_ms/mask_ms/floor_ms: per client; vs_floor = mask/floor (vs_floor_enc adds encoding); cc_over: "
        "client consistency check + unmask answer over its masked-input time; "
        "srv_sum_ms: server summing the masked inputs, plain_ms: plaintext float32 sum of the same n vectors; "
        "unmask*_s: server unmask CPU with 0%/10% dropouts beside its keystream floor; up_B: bytes uploaded per "
        "client; sim: simulated completion at 10% random dropouts; real: completed/real rounds at d=64"
    )
    n, d = ns[-1], ds[-1]
    full, full10 = summary[(n, d, "complete")]
    plus_row, plus10 = summary[(n, d, "secagg+")]
    client_vs_floor = max(full["vs_floor"], plus_row["vs_floor"])
    upload = max(full["B_coord"], plus_row["B_coord"])
    print(
        f"secagg n={n} d={d} client_vs_floor={client_vs_floor:.2f} full_unmask_cpu_s={full['unmask10_s']:.3f} "
        f"plus_unmask_cpu_s={plus_row['unmask10_s']:.3f} upload_bytes_per_coord={upload:.3f} "
        f"plus_completion_10pct={plus_row['sim']:.6f}"
    )
    attacked, plans = (None, 0) if args.no_attacks else attacked_plans()
    n1000 = None if args.no_scale else scale_round(1000, 100_000, rng)
    overhead = max(full["cc_over"], plus_row["cc_over"])
    print(f"# split attacks unmasked {attacked} of {plans} active-secure SecAgg+ plans (n = 30, 40, 100)")
    print(
        f"secagg active_secure_plans_attacked={'skipped' if attacked is None else attacked} "
        f"consistency_overhead={overhead:.3f} "
        f"n1000_unmask_cpu_s={'skipped' if n1000 is None else f'{n1000:.3f}'} n10000_ok=skipped"
    )


if __name__ == "__main__":
    main()
