"""Federated fine-tuning of MiniLM through LoRA adapters: utility, DP and upload, on the clothing reviews.

Rows (10 shops, FedAvg, every model scored on the pooled held-out split of the slice):

1. frozen MiniLM + logistic head, federated: the embedding is the fresh adapted model's (B = 0, so
   exactly the pretrained encoder) mean-pooled and L2-normalised output over the same cache, at
   the same length and on the same slice as the LoRA rows;
2. LoRA (peft) on the top layer(s) + head, federated in plaintext;
3. the same under sample-level DP-SGD (Opacus) at epsilon 8 per shop with masked aggregation;
4. (``--ffa``) FFA-LoRA (A frozen from the shared seed, B trained) under the same DP-SGD.

Upload table: bytes per client per round as measured by each protection mode (plaintext, masked,
CKKS) for LoRA and FFA-LoRA, from one round with one local step (the upload does not depend on
training), against the full model's float32 bytes (the whole MiniLM and head, what a full
fine-tune would send in plaintext; under masking with a 32-bit ring it is about the same).

The frozen layers below the lowest adapted one are run once per review and cached on disk
(``fedcore.workloads.recsys.cached_hidden_states``); the first run pays for that. Last line:
``lora clothing_fed_auc=X clothing_dp8_auc=Y ml100k_lora_hr10=Z upload_fraction=W`` (Z is
``skipped``: the MovieLens item tower is not adapted in this version: one LoRA layer over the 1,000 or so
unique items of a training step at 16 tokens costs 2.5 s a step on one thread, about 13 minutes a federated
round; W: plaintext LoRA upload over the full model's float32 bytes).

Once the cache is built, the DP rows run in a second process beside the others (one core each on
the 2-core machine; ``--serial`` keeps them in this process, after the others).

Usage: ``python benchmarks/lora.py [--max-reviews 6000] [--rounds 5] [--dp-rounds 2] [--ffa] [--serial]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedcore.experiments.config import parse_config  # noqa: E402
from fedcore.experiments.experiment import Workload, build_experiment, build_workload, communication  # noqa: E402
from fedcore.workloads.recsys import ClothingConfig, ClothingTask, EmbeddedReviews, minilm_identity  # noqa: E402
from fedcore.workloads.task import ClientData  # noqa: E402


def _load_utility():
    """``benchmarks/utility.py`` as a module, for its run / table helpers."""
    spec = importlib.util.spec_from_file_location("_utility_benchmark", Path(__file__).with_name("utility.py"))
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]  # its dataclasses look their module up
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


utility = _load_utility()

LORA_TRAIN = {"optimizer": "adam", "lr": 0.002, "batch_size": 32, "epochs": 2}
HEAD_TRAIN = {"optimizer": "adam", "lr": 0.01, "batch_size": 64, "epochs": 2}
DP_TRAIN = {"optimizer": "adam", "lr": 0.02, "batch_size": 128, "epochs": 1}
DP_GRAD_NORM = 1.0
# Client-level L2 clip = masking value bound of the protected rows. At 1 it shrank every DP client's update
# (28,033 noised coordinates) to almost nothing: AUC 0.638 / 0.641 at lr 0.002 / 0.02; at clip 20, lr 0.01 / 0.02 /
# (clip 50) 0.05 give 0.723 / 0.769 / 0.715 (`--dp-only`, 2 rounds, seed 0, one run each).
CLIP = 20.0


def frozen_workload(lora: Workload, config: Any) -> Workload:
    """The frozen-encoder baseline on the LoRA workload's own cache: pooled, normalised embeddings."""
    model = lora.task.build_model().eval()  # B = 0: the pretrained encoder exactly

    def embed(data: Any) -> EmbeddedReviews:
        loader = torch.utils.data.DataLoader(data, batch_size=256, collate_fn=lora.task.collate)
        out = []
        with torch.no_grad():
            for batch in loader:
                pooled = model.top.pooled(batch["hidden"], batch["attention_mask"])
                out.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
        return EmbeddedReviews(np.concatenate(out), data.labels)

    clients = {name: ClientData(train=embed(c.train), test=embed(c.test) if c.test is not None else None)
               for name, c in lora.clients.items()}  # fmt: skip
    central = ClientData(train=embed(lora.central.train), test=embed(lora.central.test))
    task = ClothingTask(ClothingConfig(trainable_layers=0, cached_features=True, max_length=lora.section.max_length))
    return Workload(task, clients, central, lora.description, lora.baseline, config.workload, units=("record",))


def upload_rows(shops: dict[str, Any], seed: int) -> list[tuple[str, str, int, float, float]]:
    """(adapter, mode, coordinates, bytes per client per round, fraction of the full model's float32 bytes)."""
    out = []
    for adapter in ("lora", "ffa-lora"):
        workload_cfg = {**shops, "adapter": adapter}
        base = utility.experiment_config(workload=workload_cfg, train={**LORA_TRAIN, "max_steps": 1}, rounds=1, seed=seed)
        workload = build_workload(base)
        for mode in ("plaintext", "masked", "ckks"):
            config = parse_config(base.to_dict(), overrides={"aggregation.mode": mode, "privacy.clip": CLIP})
            with tempfile.TemporaryDirectory(prefix="lora-") as folder:
                config = parse_config(config.to_dict(), overrides={"output_dir": folder})
                experiment = build_experiment(config, workload=workload, quiet=True)
                experiment.federation.run(1)
                comm = communication(experiment)
            out.append((adapter, mode, comm["shared_coordinates"], comm["bytes_up_per_client_per_round"],
                        comm["upload_fraction"]))  # fmt: skip
            full = comm["full_model_coordinates"]
    out.append(("full model", "plaintext float32 (computed)", full, 4.0 * full, 1.0))
    return out


def utility_rows(args: argparse.Namespace, shops: dict[str, Any], workload: Workload, keys: tuple[str, str]) -> list[Any]:
    """The frozen-head baseline and federated LoRA in plaintext, on the same slice and cache."""
    frozen_cfg = utility.experiment_config(
        workload={k: v for k, v in shops.items() if not k.startswith("lora_")} | {"model": "frozen"},
        train=HEAD_TRAIN, rounds=args.rounds * 5, seed=args.seed,
    )  # fmt: skip
    frozen = utility.run(frozen_cfg, frozen_workload(workload, frozen_cfg), utility.pooled_eval)
    base = utility.experiment_config(workload={**shops, "adapter": "lora"}, train=LORA_TRAIN, rounds=args.rounds, seed=args.seed)
    plain = utility.run(base, workload, utility.pooled_eval)
    args.plain_auc = plain.metrics["auc"]
    return [
        utility.fed_row("frozen MiniLM + head", frozen, keys,
                        f"FedAvg, {args.rounds * 5} rounds, {utility._train_text(HEAD_TRAIN)}"),
        utility.fed_row("LoRA + head, plaintext", plain, keys,
                        f"FedAvg, {args.rounds} rounds, {utility._train_text(LORA_TRAIN)}"),
    ]  # fmt: skip


def dp_rows(args: argparse.Namespace, cfg: Any, workload: Workload, keys: tuple[str, str]) -> tuple[list[Any], dict[str, float]]:
    """The DP-SGD rows (LoRA, and FFA-LoRA with ``--ffa``) and their AUC by adapter."""
    dp_train = {**DP_TRAIN, "lr": args.dp_lr, "batch_size": args.dp_batch, "epochs": args.dp_epochs}
    privacy = {"level": "sample", "target_epsilon": 8.0, "delta": utility.DELTA, "max_grad_norm": DP_GRAD_NORM, "clip": args.clip}
    adapters = args.dp_adapters.split(",") if args.dp_adapters else ["lora"] + (["ffa-lora"] if args.ffa else [])
    rows, dp8 = [], {}
    for adapter in adapters:
        label = f"{'FFA-LoRA' if adapter == 'ffa-lora' else 'LoRA'} + head, DP-SGD eps=8 + masked"
        config = cfg(adapter, train=dp_train, rounds=args.dp_rounds, aggregation={"mode": "masked"}, privacy=privacy)
        work = workload if adapter == "lora" else build_workload(config)
        out = utility.run(config, work, utility.pooled_eval)
        dp8[adapter] = out.metrics["auc"]
        rows.append(utility.fed_row(label, out, keys, f"FedAvg, {args.dp_rounds} rounds, {utility._train_text(dp_train)}, "
                                    f"max_grad_norm {DP_GRAD_NORM:g}, clip {args.clip:g}"))  # fmt: skip
    return rows, dp8


def start_dp_process(argv: list[str], folder: str) -> tuple[subprocess.Popen, Path]:
    """This script with ``--dp-only`` in a second process (one core each), its rows to a JSON file."""
    path = Path(folder) / "dp_rows.json"
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--dp-only", "--rows-json", str(path)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL), path


def read_dp_rows(process: subprocess.Popen, path: Path) -> tuple[list[Any], dict[str, float]]:
    if process.wait() != 0:
        raise SystemExit(f"the DP rows' process failed with exit status {process.returncode} (its error is above)")
    data = json.loads(path.read_text())
    rows = [utility.Row(**{**r, "metrics": tuple(r["metrics"])}) for r in data["rows"]]  # JSON made the tuple a list
    return rows, data["auc"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-reviews", type=int, default=6000, help="slice of the fixed split (80%% train, 20%% test)")
    parser.add_argument("--max-length", type=int, default=96, help="tokens per review (64 truncates more: AUC 0.932)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dp-rounds", type=int, default=2, help="rounds of the DP rows (DP-SGD steps cost about twice)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--layers", default="5", help="adapted MiniLM layers, comma-separated")
    parser.add_argument("--targets", default="query,value,intermediate.dense")
    parser.add_argument("--ffa", action="store_true", help="also the FFA-LoRA DP row")
    parser.add_argument("--dp-only", action="store_true", help="the DP rows alone (a DP sweep)")
    parser.add_argument("--dp-adapters", default=None, help="adapters of the DP rows, comma-separated (lora,ffa-lora)")
    parser.add_argument("--dp-lr", type=float, default=DP_TRAIN["lr"])
    parser.add_argument("--dp-batch", type=int, default=DP_TRAIN["batch_size"])
    parser.add_argument("--dp-epochs", type=int, default=DP_TRAIN["epochs"])
    parser.add_argument("--clip", type=float, default=CLIP, help="client-level L2 clip = masking value bound (DP rows)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each process")
    parser.add_argument("--serial", action="store_true", help="the DP rows in this process too, after the others")
    parser.add_argument("--rows-json", default=None, help=argparse.SUPPRESS)  # the DP process's output
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    torch.set_num_threads(args.threads)
    shops = {"case": "clothing", "model": "finetune", "partition": "silos", "num_silos": 10, "max_length": args.max_length,
             "max_reviews": args.max_reviews, "lora_rank": args.rank, "lora_layers": [int(x) for x in args.layers.split(",")],
             "lora_targets": args.targets.split(",")}  # fmt: skip
    cfg = lambda adapter="lora", **kw: utility.experiment_config(workload={**shops, "adapter": adapter}, seed=args.seed, **kw)  # noqa: E731
    start = time.perf_counter()
    workload = build_workload(cfg(train=LORA_TRAIN, rounds=args.rounds))
    prepare_s = time.perf_counter() - start
    keys = ("accuracy", "auc")
    rows = []

    if args.rows_json is not None:  # the DP process started below: its rows go back as JSON
        found, auc = dp_rows(args, cfg, workload, keys)
        Path(args.rows_json).write_text(json.dumps({"rows": [dataclasses.asdict(r) for r in found], "auc": auc}))
        return
    with tempfile.TemporaryDirectory(prefix="lora-dp-") as folder:
        # the cache is built: the DP rows run beside the others, each process on its own core
        dp_process = None if args.serial or args.dp_only else start_dp_process(argv, folder)
        try:
            if not args.dp_only:
                rows += utility_rows(args, shops, workload, keys)
            found, dp8 = dp_rows(args, cfg, workload, keys) if dp_process is None else read_dp_rows(*dp_process)
        finally:  # a failure here leaves no DP process running on
            if dp_process is not None and dp_process[0].poll() is None:
                dp_process[0].kill()
    rows += found
    test = workload.central.test
    base_model = minilm_identity()
    spec = workload.task.config.adapter  # type: ignore[attr-defined]
    utility.print_table(
        "Clothing reviews, 10 shops, MiniLM fine-tuned through LoRA adapters: accuracy / ROC AUC",
        [
            f"Data: the first {args.max_reviews} reviews of the shuffled fixed split (stratified 80/20, seed 42): "
            f"{workload.central.num_train} train / {len(test)} test; label Recommended IND; input 'title. text', "
            f"{args.max_length} tokens.",
            f"Base: {base_model['package']}=={base_model['version']} {base_model['file']} sha256 {base_model['sha256'][:16]}...",
            f"Adapters: rank {spec.rank}, alpha {spec.alpha:g}, layers {list(spec.layers)}, targets {list(spec.targets)}; "
            f"the frozen layers below layer {spec.first_layer} were run once and cached ({prepare_s:.0f} s with the data).",
            f"Partition: {workload.description}.",
            "DP rows: sample-level (one review) DP-SGD on every shop, calibrated so that every shop spends at most "
            "epsilon 8 (delta 1e-5) over all rounds; epsilon shown = the largest shop's, from the ledger.",
        ],
        ("accuracy", "ROC AUC"),
        rows,
    )
    if args.dp_only:
        return
    uploads = upload_rows(shops, args.seed)
    print("\nUpload per client per round (measured over one round with one local step; full model: computed)\n")
    print("| adapter | mode | coordinates | bytes per client per round | fraction of full model float32 |")
    print("|---|---|---|---|---|")
    for adapter, mode, coords, nbytes, fraction in uploads:
        print(f"| {adapter} | {mode} | {coords:,} | {nbytes:,.0f} | {fraction:.4%} |")
    fraction = next(f for a, m, _, _, f in uploads if a == "lora" and m == "plaintext")
    dp_auc = f"{dp8['lora']:.4f}" if "lora" in dp8 else "skipped"
    print(
        f"\nlora clothing_fed_auc={args.plain_auc:.4f} clothing_dp8_auc={dp_auc} "
        f"ml100k_lora_hr10=skipped upload_fraction={fraction:.4f}"
    )


if __name__ == "__main__":
    main()
