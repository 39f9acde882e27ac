"""Centralized baselines of the two workloads, beside the anchors measured on the same protocol.

Every figure is computed by the code the federation uses: the builders of ``fedcore.workloads.recsys``
(same splits, same candidates) and ``fedcore.rounds.training.train_local`` on one client holding all
the training data. Run ``python benchmarks/centralized.py`` (full, long on CPU) or ``--quick``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fedcore.rounds.training import TrainConfig, train_local  # noqa: E402
from fedcore.workloads.datasets import load_clothing_reviews, load_movielens100k  # noqa: E402
from fedcore.workloads.recsys import (  # noqa: E402
    ClothingConfig,
    RecommenderConfig,
    clothing_federation,
    hit_rate_ndcg,
    movielens_federation,
    movielens_item_features,
    popularity_scores,
)
from fedcore.workloads.task import ClientData  # noqa: E402

ANCHORS = {
    "popularity": (0.409, 0.228),
    "mf": (0.667, 0.388),
    "mf_text": (0.682, 0.401),
    "transformer": (None, None),
    "majority": (0.819, None),
    "frozen": (None, 0.892),
    "top1": (None, 0.935),
}


#: One printed row: model name, the two metrics, seconds, setting.
Row = tuple[str, float, float, float, str]


def _row(rows: list[Row], name: str, values: tuple[float, float], anchor: str, seconds: float, note: str = "") -> None:
    """Print one table row and keep its figures in ``rows`` (for benchmarks/utility.py)."""
    shown = f"{values[0]:.3f} / {values[1]:.3f}"
    print(f"| {name:<48} | {shown:<22} | {anchor:<15} | {seconds:>7.0f} | {note}", flush=True)
    rows.append((name, float(values[0]), float(values[1]), seconds, note))


def movielens(args: argparse.Namespace, rows: list[Row] | None = None) -> dict[str, float]:
    data = load_movielens100k(args.cache_dir)
    features = movielens_item_features(data, cache_dir=args.cache_dir)
    out: dict[str, float] = {}
    rows = [] if rows is None else rows
    fed = movielens_federation(data)
    print(f"\nMovieLens-100K, centralized. Protocol: {fed.protocol}.")
    print(f"Training: all interactions but each user's last, {fed.central.num_train} examples; "
          f"{len(fed.central.test)} users evaluated; train_local on one client, no validation split.\n")  # fmt: skip
    print(f"| {'model':<48} | HR@10 / NDCG@10        | anchor          | seconds | setting")
    print("|---|---|---|---|---|")
    start = time.perf_counter()
    hr, ndcg = hit_rate_ndcg(popularity_scores(fed.split)[fed.split.candidates()], k=10)
    _row(rows, "popularity (training counts)", (hr, ndcg), "0.409 / 0.228", time.perf_counter() - start)
    out["ml100k_pop_hr10"] = hr

    runs = [
        ("mf", "MF dim 32 (BCE, 8 negatives)", RecommenderConfig(model="mf", dim=32, num_train_negatives=8), args.mf_epochs, 2e-3, args.seeds),
        ("mf_text", "MF dim 32 + frozen MiniLM title+genres",
         RecommenderConfig(model="mf_text", dim=32, num_train_negatives=8), args.mf_epochs, 2e-3, args.seeds),
        ("transformer", "transformer (MiniLM item tower, attention user tower)",
         RecommenderConfig(model="transformer", dim=64, history_length=20, loss="softmax", num_train_negatives=16),
         args.tr_epochs, 1e-3, 1),
    ]  # fmt: skip
    for key, label, cfg, epochs, lr, seeds in runs:
        scores = []
        start = time.perf_counter()
        for seed in range(seeds):
            fed = movielens_federation(data, config=cfg, item_features=features, sampling_seed=seed)
            torch.manual_seed(seed)
            model = fed.task.build_model()
            train_local(model, task=fed.task, data=fed.central, config=TrainConfig(lr=lr, epochs=epochs, batch_size=256),
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
            metrics = fed.task.evaluate(model, fed.central.test)
            scores.append((metrics["hr@10"], metrics["ndcg@10"]))
        arr = np.array(scores)
        spread = f" +-{arr[:, 0].std():.3f} over {seeds} seeds" if seeds > 1 else ""
        anchor = ANCHORS[key]
        shown = f"{anchor[0]:.3f} / {anchor[1]:.3f}" if anchor[0] is not None else "-"
        _row(rows, label, (arr[:, 0].mean(), arr[:, 1].mean()), shown, time.perf_counter() - start,
             f"Adam lr {lr}, batch 256, {epochs} epochs{spread}")  # fmt: skip
        out[f"ml100k_{key}_hr10"] = float(arr[:, 0].mean())
    return out


def clothing(args: argparse.Namespace, rows: list[Row] | None = None) -> dict[str, float]:
    data = load_clothing_reviews(args.cache_dir)
    out: dict[str, float] = {}
    rows = [] if rows is None else rows
    start = time.perf_counter()
    frozen = clothing_federation(data, config=ClothingConfig(trainable_layers=0, cached_features=True, max_length=args.frozen_length),
                                 max_reviews=args.max_reviews, cache_dir=args.cache_dir)  # fmt: skip
    encode_s = time.perf_counter() - start
    test = frozen.central.test
    sliced = f" Slice: the first {args.max_reviews} reviews of the shuffled split." if args.max_reviews else ""
    print(f"\nClothing reviews, centralized: {len(frozen.reviews)} reviews with text; stratified 80/20 split, seed 42 "
          f"({frozen.central.num_train} train / {len(test)} test); input 'title. text'; label Recommended IND.{sliced}\n")  # fmt: skip
    print(f"| {'model':<48} | accuracy / ROC AUC     | anchor          | seconds | setting")
    print("|---|---|---|---|---|")
    majority = float(np.mean(test.labels))
    _row(rows, "majority class", (max(majority, 1 - majority), 0.5), "0.819 / -", 0.0)
    start = time.perf_counter()
    torch.manual_seed(0)
    head = frozen.task.build_model()
    train_local(head, task=frozen.task, data=frozen.central, config=TrainConfig(lr=1e-3, epochs=args.head_epochs, batch_size=64),
                generator=torch.Generator().manual_seed(0))  # fmt: skip
    m = frozen.task.evaluate(head, test)
    _row(rows, "frozen MiniLM + logistic head", (m["accuracy"], m["auc"]), "- / 0.892", time.perf_counter() - start,
         f"embeddings (max {args.frozen_length} tokens) encoded once ({encode_s:.0f} s, cached on disk), "
         f"Adam lr 1e-3, {args.head_epochs} epochs")  # fmt: skip
    out["clothing_frozen_auc"] = m["auc"]

    start = time.perf_counter()
    tuned = clothing_federation(data, config=ClothingConfig(trainable_layers=1, max_length=args.ft_length),
                                max_reviews=args.max_reviews, cache_dir=args.cache_dir)  # fmt: skip
    train = tuned.central.train
    if args.ft_max_train is not None and args.ft_max_train < len(train):
        keep = np.random.default_rng(0).choice(len(train), size=args.ft_max_train, replace=False)
        train = torch.utils.data.Subset(train, np.sort(keep).tolist())
    torch.manual_seed(0)
    model = tuned.task.build_model()
    train_local(model, task=tuned.task, data=ClientData(train=train, test=tuned.central.test),
                config=TrainConfig(optimizer="adamw", lr=args.ft_lr, epochs=args.ft_epochs, batch_size=32),
                generator=torch.Generator().manual_seed(0))  # fmt: skip
    m = tuned.task.evaluate(model, tuned.central.test)
    _row(rows, "MiniLM top layer + head fine-tuned", (m["accuracy"], m["auc"]), "- / 0.935", time.perf_counter() - start,
         f"max {args.ft_length} tokens, {len(train)} training reviews, AdamW lr {args.ft_lr}, {args.ft_epochs} epochs")  # fmt: skip
    out["clothing_top1_auc"] = m["auc"]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 seed, fewer epochs, a 3,000-review clothing slice")
    parser.add_argument("--cache-dir", default=None, help="data cache (default: $PRIVFL_DATA_DIR or ~/.cache/privfl/data)")
    parser.add_argument("--only", choices=("movielens", "clothing"), default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--ft-max-train", type=int, default=None, help="cap the fine-tuning set (a seeded random subset)")
    parser.add_argument("--ft-epochs", type=int, default=None, help="fine-tuning epochs (default 2, quick 1)")
    args = parser.parse_args(argv)
    args.seeds = 1 if args.quick else 3
    args.mf_epochs = 6 if args.quick else 20
    args.tr_epochs = 3 if args.quick else 10
    args.frozen_length = 128
    args.head_epochs = 20
    args.ft_length = 64
    args.max_reviews = 3000 if args.quick else None
    if args.ft_epochs is None:
        args.ft_epochs = 1 if args.quick else 2
    args.ft_lr = 1e-4
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, float] = {}
    if args.only in (None, "movielens"):
        results |= movielens(args)
    if args.only in (None, "clothing"):
        results |= clothing(args)
    print("\ncentralized " + " ".join(f"{k}={v:.3f}" for k, v in results.items()))


if __name__ == "__main__":
    main()
