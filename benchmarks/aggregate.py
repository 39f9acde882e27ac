"""Aggregation of K client vectors of length d: plaintext on the CPU, on a GPU, masked, and CKKS.

For d in {1e6, 1e7} and K in {10, 100} (float32 updates uniform in [-1, 1]) it measures, in one
run, wall-clock seconds and effective bandwidth = plaintext bytes read (K * d * 4) per second:

* ``plaintext-cpu``: ``secagg.PlaintextSum.aggregate`` (validation plus float64 sum), the
  library's reference path, and ``cpu-f32-add``: bare in-place float32 additions (the CPU floor);
* ``cuda-host`` (only with a GPU): ``fedcore.rounds.cuda.CudaSum.aggregate`` from host vectors
  (pinned staging, asynchronous copies, one GEMV per chunk): bounded by host memory and PCIe;
* ``cuda-device`` (only with a GPU): the fused weighted sum alone (one GEMV over a resident
  ``(K, d)`` block), beside ``cuda-d2d-copy``, a device-to-device copy of the same K * d * 4 bytes
  measured in the same run, the ceiling. Both are also given as memory traffic (bytes read plus
  written per second): the sum reads K * d * 4 and writes d * 4, the copy reads and writes
  K * d * 4. ``cuda_fraction_of_copy_bw`` is the ratio of traffic bandwidths (the stricter
  convention: a copy writes as much as it reads, so its read bandwidth is only half its traffic);
* ``masked``: a real SecAgg+ round (``secagg.protocol.secure_sum_integers`` with the plan of
  ``MaskedSum(graph="secagg+")``), every client and the server exchanging serialized messages.
  ``time_s`` is the aggregation the server waits for after the uploads: summing the masked
  inputs, the unmask stage (clients' responses, Shamir reconstruction, self-mask
  regeneration) and decoding. ``client_s`` is one client's cost (encoding, key setup, masking),
  measured for all K clients and divided by K;
* ``ckks``: CKKS preset ``compact`` (N=4096, seeded symmetric). ``time_s`` is the server adding K
  ciphertext messages plus the key holder decrypting and decoding the aggregate; ``client_s`` is
  one client's encryption (median of the distinct clients encrypted).

Memory is kept bounded (d=1e7, K=100 is 4 GB of float32): the K plaintext vectors are views of 8
distinct vectors (at d=1e6 those 32 MB may stay in a large last-level cache: the d=1e7 rows are
the memory-bound ones); the masked round reads every client's ring words from one encoded vector (the
protocol's work does not depend on the values); CKKS encrypts 4 distinct clients and the server
adds their messages ceil(K/4) times, into separate accumulators (a server refuses the same client
twice), so it performs K real additions. ``wire_MB`` is one client's upload.

The machine is shared: read the ratios of figures measured side by side, not absolute times.
The last line is the summary the issue asks for.

Usage: ``python benchmarks/aggregate.py`` (several minutes) or ``--quick`` (seconds).
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fedcore.rounds.cuda import CudaSum, CudaUnavailableError, cuda_device, fused_weighted_sum  # noqa: E402
from secagg import MaskedSum, PlaintextSum
from secagg.ckks import CKKSClient, CKKSKeyHolder, HEServer
from secagg.protocol import secure_sum_integers

now = time.perf_counter
POOL_PLAIN, POOL_CKKS = 8, 4


class PoolMapping(Mapping):
    """K client ids whose vectors are views of a few distinct arrays (bounded memory)."""

    def __init__(self, ids: list[str], arrays: list[np.ndarray]) -> None:
        self._index = {cid: i for i, cid in enumerate(ids)}
        self._ids, self._arrays = ids, arrays

    def __getitem__(self, cid: str) -> np.ndarray:
        return self._arrays[self._index[cid] % len(self._arrays)]

    def __iter__(self):
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)


def row(d: int, k: int, method: str, seconds: float | None, **extra) -> dict:
    out = {"d": d, "K": k, "method": method, "time_s": seconds}
    out["read_GBps"] = None if not seconds else 4.0 * k * d / seconds / 1e9
    out.update(extra)
    return out


def plaintext_cpu(d: int, k: int, pool: list[np.ndarray], repeats: int) -> dict:
    ids = [f"c{i:03d}" for i in range(k)]
    updates = PoolMapping(ids, pool)
    backend, rng = PlaintextSum(), np.random.default_rng(0)
    times = []
    for _ in range(repeats):
        t0 = now()
        backend.aggregate(updates, round_index=1, rng=rng)
        times.append(now() - t0)
    return row(d, k, "plaintext-cpu", statistics.median(times), wire_MB=4 * d / 1e6)


def float32_cpu(d: int, k: int, pool: list[np.ndarray], repeats: int) -> dict:
    """The bare CPU floor: in-place float32 accumulation, no validation (what the GPU path computes)."""
    acc = np.empty(d, dtype=np.float32)
    times = []
    for _ in range(repeats):
        t0 = now()
        np.copyto(acc, pool[0])
        for i in range(1, k):
            np.add(acc, pool[i % len(pool)], out=acc)
        times.append(now() - t0)
    return row(d, k, "cpu-f32-add", statistics.median(times), note="no validation, float32 accumulation")


def cuda_rows(d: int, k: int, pool: list[np.ndarray], device: torch.device, repeats: int) -> tuple[list[dict], float]:
    rows = []
    ids = [f"c{i:03d}" for i in range(k)]
    updates = PoolMapping(ids, pool)
    backend, rng = CudaSum(device=str(device)), np.random.default_rng(0)
    backend.aggregate(updates, round_index=1, rng=rng)  # warm-up: buffers, cuBLAS handle
    times = []
    for _ in range(repeats):
        t0 = now()
        backend.aggregate(updates, round_index=1, rng=rng)
        times.append(now() - t0)
    rows.append(row(d, k, "cuda-host", statistics.median(times), wire_MB=4 * d / 1e6))

    matrix = torch.empty((k, d), dtype=torch.float32, device=device).uniform_(-1.0, 1.0)
    weights = torch.rand(k, dtype=torch.float32, device=device)
    out = torch.empty(d, dtype=torch.float32, device=device)
    copy_dst = torch.empty_like(matrix)

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize(device)
        samples = []
        for _ in range(max(repeats, 5)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        return statistics.median(samples)

    t_sum = timed(functools.partial(fused_weighted_sum, matrix, weights, out=out))  # bound now: the tensors are deleted below
    t_copy = timed(functools.partial(copy_dst.copy_, matrix))
    head = min(d, 1_000_000)  # check the result on the first coordinates (a float64 copy of all would be 2x the block)
    exact = weights.double() @ matrix[:, :head].double()
    err = float((out[:head].double() - exact).abs().max())
    block = 4.0 * k * d
    sum_traffic = (block + 4.0 * d) / t_sum
    copy_traffic = 2.0 * block / t_copy
    rows.append(row(d, k, "cuda-device", t_sum, traffic_GBps=sum_traffic / 1e9, note=f"max|err| {err:.1e}"))
    rows.append(row(d, k, "cuda-d2d-copy", t_copy, traffic_GBps=copy_traffic / 1e9, note="ceiling"))
    del matrix, copy_dst, out
    torch.cuda.empty_cache()
    return rows, sum_traffic / copy_traffic


def masked(d: int, k: int, vector: np.ndarray) -> dict:
    backend = MaskedSum(value_bound=1.0, max_clients=k, graph="secagg+")
    plan = backend.plan(k)
    rng = np.random.default_rng(1)
    t0 = now()
    words = backend.encode_client(vector, rng=rng)
    encode_s = now() - t0
    ids = [f"c{i:03d}" for i in range(k)]
    t0 = now()
    result = secure_sum_integers(
        PoolMapping(ids, [words]), round_index=1, threshold=plan.threshold, degree=plan.degree, bits=32, clock=now
    )
    total_s = now() - t0
    t0 = now()
    backend.encoder.decode(result.total, num_clients=len(result.contributors))
    decode_s = now() - t0
    cpu = result.cpu_seconds
    server = cpu.get("server_masked_input", 0.0) + cpu.get("server_unmask", 0.0) + cpu.get("client_unmask", 0.0) + decode_s
    client = encode_s + sum(cpu.get(s, 0.0) for s in ("client_advertise", "client_share_keys", "client_masked_input")) / k
    wire = sum(result.bytes_up.values()) / k / 1e6
    return row(
        d,
        k,
        "masked",
        server,
        client_s=client,
        wire_MB=wire,
        note=f"SecAgg+ degree {plan.degree}, t={plan.threshold}, round {total_s:.1f}s",
    )


def ckks(d: int, k: int, vector: np.ndarray) -> dict:
    holder = CKKSKeyHolder("compact", value_bound=1.0, max_clients=k)
    context, public = holder.client_context(include_secret_key=True), holder.public_context()
    distinct = min(k, POOL_CKKS)
    messages, enc_times = [], []
    for i in range(distinct):
        client = CKKSClient(context, client_id=f"c{i:03d}")
        t0 = now()
        messages.append(client.encrypt(vector))
        enc_times.append(now() - t0)
    add_s, servers, last = 0.0, math.ceil(k / distinct), None
    for s in range(servers):
        server = HEServer(public)
        count = min(distinct, k - s * distinct)
        t0 = now()
        for i in range(count):
            server.add(f"c{i:03d}", messages[i])
        last = server.result()
        add_s += now() - t0
    t0 = now()
    holder.decrypt(last)
    decrypt_s = now() - t0
    return row(
        d,
        k,
        "ckks",
        add_s + decrypt_s,
        client_s=statistics.median(enc_times),
        wire_MB=len(messages[0]) / 1e6,
        note=f"adds {add_s:.1f}s + decrypt {decrypt_s:.2f}s",
    )


def fmt(value, spec: str) -> str:
    width = int(spec.split(".")[0]) if spec[0].isdigit() else 0
    return "-".rjust(width) if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds): a smoke test")
    parser.add_argument("--device", default="cuda:0", help="the GPU for the CUDA rows (default cuda:0)")
    args = parser.parse_args()
    dims = [10_000, 100_000] if args.quick else [1_000_000, 10_000_000]
    ks = [4, 10] if args.quick else [10, 100]
    torch.set_num_threads(1)
    try:
        device = cuda_device(args.device)
        gpu = f"{device} {torch.cuda.get_device_name(device)}"
    except CudaUnavailableError as exc:
        device, gpu = None, f"absent ({exc})"
    print(f"# aggregation benchmark: float32 updates in [-1, 1]; wall-clock seconds; GPU: {gpu}")
    rows: list[dict] = []
    fraction = None
    for d in dims:
        rng = np.random.default_rng(d)
        pool = [rng.uniform(-1.0, 1.0, size=d).astype(np.float32) for _ in range(POOL_PLAIN)]
        for k in ks:
            repeats = 3 if k * d <= 10**8 else 2
            rows.append(plaintext_cpu(d, k, pool, repeats))
            rows.append(float32_cpu(d, k, pool, repeats))
            if device is not None:
                gpu_rows, frac = cuda_rows(d, k, pool, device, repeats)
                rows.extend(gpu_rows)
                if d == dims[-1] and k == ks[-1]:
                    fraction = frac
            else:
                rows.append(row(d, k, "cuda", None, note="no GPU: not measured"))
            rows.append(masked(d, k, pool[0]))
            rows.append(ckks(d, k, pool[0]))
            for r in rows[-(6 if device is not None else 5) :]:
                print(f"  done d={d:.0e} K={k} {r['method']}: {fmt(r['time_s'], '.3f')} s", file=sys.stderr, flush=True)
    cpu_time = {(r["d"], r["K"]): r["time_s"] for r in rows if r["method"] == "plaintext-cpu"}
    print()
    print(
        f"{'d':>9} {'K':>4} {'method':>14} {'time_s':>9} {'read_GB/s':>10} {'traffic_GB/s':>12} {'x_cpu':>8} {'client_s':>9} {'wire_MB':>8}  note"
    )
    for r in rows:
        ratio = None if r["time_s"] is None else r["time_s"] / cpu_time[(r["d"], r["K"])]
        print(
            f"{r['d']:>9.0e} {r['K']:>4} {r['method']:>14} {fmt(r['time_s'], '9.4f')} {fmt(r['read_GBps'], '10.3f')} "
            f"{fmt(r.get('traffic_GBps'), '12.1f')} {fmt(ratio, '8.2f')} {fmt(r.get('client_s'), '9.3f')} "
            f"{fmt(r.get('wire_MB'), '8.1f')}  {r.get('note', '')}"
        )
    print()
    print("# read_GB/s: plaintext bytes K*d*4 over time_s; traffic_GB/s: bytes read + written (GPU rows);")
    print("# x_cpu: time over the plaintext CPU sum of the same (d, K); client_s: one client's protection cost;")
    print("# wire_MB: one client's upload (plaintext: the float32 vector).")
    last_d, last_k = dims[-1], ks[-1]
    print(f"# cuda_fraction_of_copy_bw at d={last_d:.0e}, K={last_k}: fused-sum traffic bandwidth / d2d-copy traffic bandwidth")
    print(f"aggregate cuda_fraction_of_copy_bw={'none' if fraction is None else f'{fraction:.3f}'}")


if __name__ == "__main__":
    main()
