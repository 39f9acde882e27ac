"""Throughput, bytes and error of homomorphic aggregation presets against the common set-up.

For each vector length d (1e5 and 1e6 by default) and n = 10 clients with updates drawn
uniformly from [-1, 1], measures in one run, on one thread:

* every preset of ``secagg`` (CKKS ``compact``, ``compact-pk``, ``compat``; BFV ``bfv``) through its
  key holder / client / server objects, bytes in and out as they would travel;
* the common set-up (NVIDIA FLARE's defaults): CKKS N=8192, coeff_mod_bit_sizes [60, 40, 40],
  scale 2^40, one ``ts.ckks_vector`` per layer of a model layout, serialized by TenSEAL,
  server adding ``ts.ckks_vector_from`` vectors under a public context; measured twice, with
  public-key encryption (``common``) and with symmetric-key encryption (``common-sym``, FLARE's
  own flow), since ``compact`` encrypts with the secret key too and the fair ratio is that one.

The CKKS presets release the exact sum of the inputs rounded to their public grid (no raw
decryption leaves the key holder, so no flooding noise is needed: the released sum is a
function of the inputs alone); their error is that rounding.

Columns: encrypt / add / decrypt throughput in parameters per second (encrypt: all clients'
parameters over all clients' encrypt-and-serialize time; add: all clients' parameters over the
server's parse-check-add time plus serializing the aggregate; decrypt: d over the key holder's
parse-decrypt-decode time), upload bytes per parameter (one client's message / d), download
bytes per parameter (the aggregate the server sends to the key holder / d), and the maximum
absolute error of the decrypted sum against the float64 sum. Ratios are against the common
set-up measured in the same run (the machine is shared, so only ratios are comparable).

Usage: python benchmarks/he.py [--quick] [--sizes 100000,1000000] [--clients 10]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tenseal as ts  # noqa: E402

from secagg.bfv import BFVClient, BFVKeyHolder
from secagg.ckks import CKKSClient, CKKSKeyHolder, HEServer

RESNET50_PARAMS = 25_557_032


@dataclass
class Row:
    name: str
    d: int
    n: int
    encrypt_pps: float
    encrypt_cpu_pps: float
    add_pps: float
    decrypt_pps: float
    up_bpp: float
    down_bpp: float
    max_err: float
    stated: float | None
    keygen_s: float


@contextlib.contextmanager
def _quiet_stdout():
    """TenSEAL prints a warning from C++ for vectors longer than one ciphertext; hide it."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(devnull)
        os.close(saved)


def layer_layout(d: int) -> list[int]:
    """A model-like layout: three weight matrices and three bias vectors summing to d."""
    biases = [512, 512, 64]
    rest = d - sum(biases)
    w2, w3 = int(rest * 0.3), int(rest * 0.1)
    return [rest - w2 - w3, biases[0], w2, biases[1], w3, biases[2]]


def run_preset(name: str, updates: dict[str, np.ndarray], exact: np.ndarray, n: int) -> Row:
    d = exact.size
    t0 = time.perf_counter()
    if name == "bfv":
        holder = BFVKeyHolder("bfv", value_bound=1.0, max_clients=n, quant_bits=20)
    else:
        holder = CKKSKeyHolder(name, value_bound=1.0, max_clients=n)
    symmetric = holder.info.encryption == "symmetric"
    client_ctx = holder.client_context(include_secret_key=symmetric)
    server = HEServer(holder.public_context())
    keygen = time.perf_counter() - t0
    enc_time = enc_cpu = add_time = 0.0
    up_bytes = 0
    rng = np.random.default_rng(0)
    for cid, vec in updates.items():
        if name == "bfv":
            client = BFVClient(client_ctx, client_id=cid)
            t0, c0 = time.perf_counter(), time.process_time()
            message = client.encrypt(vec, rng=rng)
        else:
            client = CKKSClient(client_ctx, client_id=cid)
            t0, c0 = time.perf_counter(), time.process_time()
            message = client.encrypt(vec)
        enc_time += time.perf_counter() - t0
        enc_cpu += time.process_time() - c0
        up_bytes += len(message)
        t0 = time.perf_counter()
        server.add(cid, message)
        add_time += time.perf_counter() - t0
        del message
    t0 = time.perf_counter()
    aggregate = server.result()
    add_time += time.perf_counter() - t0
    t0 = time.perf_counter()
    out = holder.decrypt(aggregate)
    dec_time = time.perf_counter() - t0
    return Row(
        name=name,
        d=d,
        n=n,
        encrypt_pps=n * d / enc_time,
        encrypt_cpu_pps=n * d / enc_cpu,
        add_pps=n * d / add_time,
        decrypt_pps=d / dec_time,
        up_bpp=up_bytes / n / d,
        down_bpp=len(aggregate) / d,
        max_err=float(np.max(np.abs(out.total - exact))),
        stated=out.max_abs_error,
        keygen_s=keygen,
    )


def run_common(updates: dict[str, np.ndarray], exact: np.ndarray, n: int, *, symmetric: bool = False) -> Row:
    """FLARE-style: one ts.ckks_vector per layer, N=8192, [60, 40, 40], scale 2^40, one thread;
    public-key encryption, or symmetric-key (``symmetric=True``, the server context then holds
    only the parameters)."""
    d = exact.size
    bounds = np.cumsum([0] + layer_layout(d))
    t0 = time.perf_counter()
    kind = ts.ENCRYPTION_TYPE.SYMMETRIC if symmetric else ts.ENCRYPTION_TYPE.ASYMMETRIC
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=8192,
        coeff_mod_bit_sizes=[60, 40, 40],
        encryption_type=kind,
        n_threads=1,
    )
    ctx.global_scale = 2**40
    server_ctx = ts.context_from(
        ctx.serialize(save_public_key=not symmetric, save_secret_key=False, save_galois_keys=False, save_relin_keys=False),
        n_threads=1,
    )
    keygen = time.perf_counter() - t0
    enc_time = enc_cpu = add_time = 0.0
    up_bytes = 0
    acc = None
    with _quiet_stdout():
        for vec in updates.values():
            t0, c0 = time.perf_counter(), time.process_time()
            message = [ts.ckks_vector(ctx, vec[a:b].tolist()).serialize() for a, b in zip(bounds[:-1], bounds[1:])]
            enc_time += time.perf_counter() - t0
            enc_cpu += time.process_time() - c0
            up_bytes += sum(map(len, message))
            t0 = time.perf_counter()
            layers = [ts.ckks_vector_from(server_ctx, blob) for blob in message]
            if acc is None:
                acc = layers
            else:
                for total, layer in zip(acc, layers):
                    total.add_(layer)
            add_time += time.perf_counter() - t0
            del message, layers
        t0 = time.perf_counter()
        aggregate = [layer.serialize() for layer in acc]
        add_time += time.perf_counter() - t0
        t0 = time.perf_counter()
        total = np.concatenate([np.asarray(ts.ckks_vector_from(ctx, blob).decrypt()) for blob in aggregate])
        dec_time = time.perf_counter() - t0
    return Row(
        name="common-sym" if symmetric else "common",
        d=d,
        n=n,
        encrypt_pps=n * d / enc_time,
        encrypt_cpu_pps=n * d / enc_cpu,
        add_pps=n * d / add_time,
        decrypt_pps=d / dec_time,
        up_bpp=up_bytes / n / d,
        down_bpp=sum(map(len, aggregate)) / d,
        max_err=float(np.max(np.abs(total - exact))),
        stated=None,
        keygen_s=keygen,
    )


def _fmt_rate(x: float) -> str:
    return f"{x / 1e6:8.2f}M"


def print_table(rows: list[Row]) -> None:
    head = (
        f"{'set-up':<12} {'d':>8} {'n':>3} {'enc p/s':>9} {'enc p/cpu':>9} {'add p/s':>9} {'dec p/s':>9} {'up B/p':>7} "
        f"{'x f32':>6} {'down B/p':>8} {'max |err|':>10} {'stated':>10} {'keys s':>7} "
        f"{'enc x':>6} {'encx cpu':>8} {'add x':>6} {'dec x':>6} {'up /':>6} {'R50 up MB':>10}"
    )
    print(head)
    print("-" * len(head))
    common = {r.d: r for r in rows if r.name == "common"}
    for r in rows:
        c = common[r.d]
        stated = f"{r.stated:10.2e}" if r.stated is not None else f"{'-':>10}"
        print(
            f"{r.name:<12} {r.d:>8} {r.n:>3} {_fmt_rate(r.encrypt_pps):>9} {_fmt_rate(r.encrypt_cpu_pps):>9} "
            f"{_fmt_rate(r.add_pps):>9} "
            f"{_fmt_rate(r.decrypt_pps):>9} {r.up_bpp:7.2f} {r.up_bpp / 4:6.2f} {r.down_bpp:8.2f} "
            f"{r.max_err:10.2e} {stated} {r.keygen_s:7.3f} {r.encrypt_pps / c.encrypt_pps:6.2f} "
            f"{r.encrypt_cpu_pps / c.encrypt_cpu_pps:8.2f} "
            f"{r.add_pps / c.add_pps:6.2f} {r.decrypt_pps / c.decrypt_pps:6.2f} {c.up_bpp / r.up_bpp:6.2f} "
            f"{r.up_bpp * RESNET50_PARAMS / 1e6:10.1f}"
        )
    print(
        "columns: enc/add/dec p/s = parameters per wall-clock second (one thread); enc p/cpu = encrypted "
        "parameters per CPU second of this process (robust to other load on a shared machine); "
        "up B/p = bytes per parameter one client "
        "uploads; x f32 = that over 4 bytes; down B/p = aggregate bytes per parameter sent to the key holder; "
        "max |err| = measured against the float64 sum, stated = the preset's bound (BFV: quantization); "
        "enc x / add x / dec x = wall-clock throughput relative to the common set-up at the same d, encx cpu the same "
        "for CPU time; up / = common upload "
        "over this upload; R50 up MB = one client's upload for ResNet-50's 25.6M parameters. The common "
        "set-up encrypts one ts.ckks_vector per layer of " + "a 6-layer layout (3 weights, biases 512, 512, 64)."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test of a few seconds)")
    parser.add_argument("--sizes", help="comma-separated vector lengths (default 100000,1000000)")
    parser.add_argument("--clients", type=int, help="clients per round (default 10)")
    args = parser.parse_args(argv)
    sizes, n = ([3000, 9000], 3) if args.quick else ([100_000, 1_000_000], 10)
    if args.sizes:
        sizes = [int(x) for x in args.sizes.split(",")]
    if args.clients:
        n = args.clients
    presets = ["compact", "compact-pk", "compat", "bfv"]
    rows: list[Row] = []
    for d in sizes:
        rng = np.random.default_rng(d)
        updates = {f"c{i:02d}": rng.uniform(-1.0, 1.0, d) for i in range(n)}
        exact = np.sum(list(updates.values()), axis=0)
        rows.append(run_common(updates, exact, n))
        rows.append(run_common(updates, exact, n, symmetric=True))
        for name in presets:
            rows.append(run_preset(name, updates, exact, n))
            print(f"# done {name} d={d}", file=sys.stderr, flush=True)
    print_table(rows)
    largest = max(sizes)
    compact = next(r for r in rows if r.name == "compact" and r.d == largest)
    common = next(r for r in rows if r.name == "common" and r.d == largest)
    common_sym = next(r for r in rows if r.name == "common-sym" and r.d == largest)
    worst = max(r.max_err for r in rows if r.name == "compact")
    print(
        f"he compact_upload_bytes_per_param={compact.up_bpp:.2f} "
        f"encrypt_speedup_vs_common={compact.encrypt_cpu_pps / common.encrypt_cpu_pps:.2f} "
        f"encrypt_speedup_vs_common_symmetric={compact.encrypt_cpu_pps / common_sym.encrypt_cpu_pps:.2f} "
        f"compact_max_abs_err={worst:.2e}"
    )
    # no flood: the release is exact on the grid (statistical distance 0, so the parameter is unbounded)
    print(f"he flooding_bits=inf max_abs_err={worst:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
