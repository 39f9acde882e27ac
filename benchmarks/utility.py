"""Utility of every protection mode on the real cases: one table per case.

Rows: centralized (the figures of ``benchmarks/centralized.py``, whose functions run here on the
same splits), federated plaintext, federated with masked aggregation (SecAgg), federated with
CKKS, and federated with sample-level DP at epsilon 1, 4 and 8 (delta 1e-5; MovieLens: record level,
one rating, on examples built from that rating alone, and user level, one person, at epsilon 8), with the metric,
the epsilon actually spent (read from the run's ledger, largest silo) and the wall time per
round. Cases:

1. MovieLens-100K, 5 regional silos, MF (HR@10 / NDCG@10, leave-one-out), plus the text-aware
   models (MF + frozen MiniLM features, transformer) federated in plaintext;
2. Women's Clothing reviews, 10 shops, frozen MiniLM features + logistic head averaged with
   FedAvg (accuracy / ROC AUC on the fixed stratified 80/20 split, seed 42);
3. MovieLens-100K cross-device: one client per user (943), Poisson sampling, client-level DP.

Every federated run is built from an experiment config (``fedcore.experiments.config.parse_config`` or
``examples/main.toml``) by ``fedcore.experiments.experiment.build_experiment``, runs in one process (clients
train one after another), and is evaluated once at the end; "s/round" is the mean wall time of a
round without evaluation. The last line is ``utility ml100k_central_hr10=A ml100k_fed_hr10=B
ml100k_text_fed_hr10=C ml100k_dp8_hr10=D clothing_central_auc=E clothing_fed_auc=F ml100k_userdp8_hr10=G
ml100k_userdp8_insilo_hr10=H`` (D: record-level DP at epsilon 8; G: user-level DP at epsilon 8 across the silos, noise
added once to their masked sum; H: user-level DP-SGD inside each silo).

Usage: ``python benchmarks/utility.py`` (about 31 minutes on a fresh machine, 9 of them filling the clothing
embedding cache, 11 the cross-device case) or ``--quick``
(about 2 minutes: fewer rounds and epochs, the 3,000-review clothing slice).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the packages, not benchmarks/secagg.py

from fedcore.experiments.config import ExperimentConfig, load_config, parse_config  # noqa: E402
from fedcore.experiments.experiment import Experiment, Workload, build_experiment, build_workload  # noqa: E402


def _load_centralized():
    """``benchmarks/centralized.py`` as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("_centralized_benchmark", Path(__file__).with_name("centralized.py"))
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


centralized = _load_centralized()

DELTA = 1e-5
EPSILONS = (1.0, 4.0, 8.0)


@dataclass(frozen=True)
class Settings:
    """Every choice that differs between the full run and ``--quick``."""

    central_mf_epochs: int
    central_tr_epochs: int
    ft_max_train: int
    max_reviews: int | None
    ml_rounds: int
    ml_dp_rounds: int
    main_job_rounds: int | None
    transformer_rounds: int
    clothing_rounds: int
    device_rounds: int
    dp_repeats: int  # runs of each DP row at epsilon 8 (each client draws its own noise: no two runs agree)


FULL = Settings(central_mf_epochs=20, central_tr_epochs=5, ft_max_train=2000, max_reviews=None, ml_rounds=20, ml_dp_rounds=10,
                main_job_rounds=None, transformer_rounds=5, clothing_rounds=20, device_rounds=100, dp_repeats=5)  # fmt: skip
QUICK = Settings(central_mf_epochs=3, central_tr_epochs=1, ft_max_train=300, max_reviews=3000, ml_rounds=3, ml_dp_rounds=2,
                 main_job_rounds=2, transformer_rounds=1, clothing_rounds=5, device_rounds=10, dp_repeats=1)  # fmt: skip

# Federated training settings (the DP MovieLens ones are examples/main.toml's; all tuned once
# on this data: see the DP note printed under the MovieLens table).
ML_TRAIN = {"optimizer": "adam", "lr": 0.01, "batch_size": 256, "epochs": 1}
ML_DP_TRAIN = {"optimizer": "sgd", "lr": 300.0, "batch_size": 4096, "epochs": 4}
ML_DP_GRAD_NORM = 0.3
# The DP rows' MF dimension (examples/main.toml's): fewer coordinates to noise per item. At epsilon 8 dimensions 4
# and 8 give about the same HR@10 under DP (means of 3 to 5 runs: record level 0.571 to 0.584 / 0.584, user level
# 0.490 to 0.502 / 0.480), and dimension 4 without DP is weaker (twins 0.621 / 0.636 and 0.628 / 0.647): DP costs
# the smaller model less.
ML_DP_DIM = 4
# The DP rows' loss (and their no-DP twins'): sampled softmax over the positive and its negatives. At epsilon 8,
# seed 0 it beats BCE at both units: record level HR@10 0.571 against 0.533, user level 0.485 against 0.410 (one
# run each, side by side; the DP notes printed under the table give the sweep).
ML_DP_LOSS = "softmax"
# User-level DP (one person = all of a user's ratings, clipped together; user rows stay local and noise-free):
# a batch larger than any silo (about 22,000 ratings), so every step takes every user (q = 1: about 190 users
# where a record-level step averages about 4,000 ratings); the sweep is printed under the table.
ML_USER_DP_TRAIN = {"optimizer": "sgd", "lr": 30.0, "batch_size": 100_000, "epochs": 4}
ML_USER_DP_GRAD_NORM = 0.1
# User-level DP across silos (FedSGD: one step a round over all 943 users, noise added once to the silos' sum): the
# same 40 steps, per-user bound and step as one silo holding every user (lr 30 over the 943 users' clipped sum), which
# at dim 8 gave 0.547 to 0.566 for C 0.3 / 0.5 and lr 20 to 50; at dim 4, single runs of the masked row (seeds 0 to 3):
# 0.539 to 0.565 at lr 30, 0.541 to 0.568 at lr 45, 0.541 to 0.559 at lr 60; C 0.5: 0.567 (lr 30), 0.534 (lr 45).
ML_ACROSS_GRAD_NORM = 0.3
ML_ACROSS_LR = 30.0
ML_ACROSS_STEPS_PER_DP_ROUND = 4  # the in-silo rows' 4 local epochs of one full batch, one round each
ML_ACROSS_SILO_BOUND = 60.0  # a silo's sum: at most (users in the silo, about 190) x 0.3 in norm, so never clipped
ML_CLIP = 100.0  # client-level L2 clip (= value bound) of the protected modes; not binding for MF
CLOTHING_TRAIN = {"optimizer": "adam", "lr": 0.01, "batch_size": 64, "epochs": 2}
CLOTHING_DP_TRAIN = {"optimizer": "sgd", "lr": 15.0, "batch_size": 1024, "epochs": 3}
CLOTHING_DP_GRAD_NORM = 1.0
CLOTHING_CLIP = 10.0
# 5 local epochs: with 1, a device's few Adam steps a round left plaintext FedAvg below popularity (HR@10 0.372)
DEVICE_TRAIN = {"optimizer": "adam", "lr": 0.01, "batch_size": 64, "epochs": 5}
DEVICE_Q = 0.3
DEVICE_CLIP = 1.0


# ---------------------------------------------------------------------------- plumbing


@dataclass(frozen=True)
class Row:
    """One table row: two metrics, the epsilon spent, seconds per round and the setting."""

    name: str
    metrics: tuple[float, float]
    epsilon: float | None
    seconds_per_round: float | None
    setting: str


@dataclass(frozen=True)
class Outcome:
    """A finished federated run: final metrics, privacy spent, time, and the final model."""

    metrics: dict[str, float]
    epsilon: float | None
    seconds_per_round: float
    vector: np.ndarray
    noise_multiplier: float | None
    clipped: float
    rounds: int
    stop_reason: str | None
    repeats: str | None = None  # for a mean over runs: how many, and each run's metric (``run_repeated``)


def experiment_config(
    *, workload: dict[str, Any], train: dict[str, Any], rounds: int, seed: int, **sections: dict[str, Any]
) -> ExperimentConfig:
    """An experiment config with quiet logging and no files beyond the run's checkpoint.

    A run without DP is ``reproducible``: every draw (the clients' shuffles and negatives too) comes
    from the seed, so the masked and CKKS runs differ from the plaintext one by their encoding
    alone, which ``max_diff`` shows. A DP run is not: its clients draw their noise afresh, as in a
    deployment (``run_repeated`` averages such runs).
    """
    raw: dict[str, Any] = {
        "name": "utility", "seed": seed, "rounds": rounds, "output_dir": "unused", "evaluate_every": 0,
        "reproducible": "level" not in sections.get("privacy", {}),
        "workload": workload, "train": train, "logging": {"jsonl": False, "tensorboard": False, "quiet": True},
    }  # fmt: skip
    raw.update(sections)
    return parse_config(raw)


def run(config: ExperimentConfig, workload: Workload, evaluate: Callable[[Experiment], dict[str, float]]) -> Outcome:
    """Build and run one experiment (outputs in a temporary folder) and evaluate its final model."""
    with tempfile.TemporaryDirectory(prefix="utility-") as out:
        config = parse_config(config.to_dict(), overrides={"output_dir": out})
        experiment = build_experiment(config, workload=workload, quiet=True)
        fed = experiment.federation
        history = fed.run(config.rounds)
        metrics = evaluate(experiment)
    epsilon = experiment.budget.spent(experiment.ledger) if experiment.budget is not None else None
    return Outcome(
        metrics=metrics,
        epsilon=epsilon,
        seconds_per_round=float(np.mean([h["round_seconds"] for h in history])) if history else math.nan,
        vector=fed.global_vector.copy(),
        noise_multiplier=experiment.noise_multiplier,
        clipped=float(np.mean([h.get("clipped_fraction", 0.0) for h in history])) if history else 0.0,
        rounds=fed.round_index,
        stop_reason=fed.stop_reason,
    )


def federated_eval(experiment: Experiment) -> dict[str, float]:
    """Each client scores the global model with its local-only parameters (MF user vectors stay home)."""
    return experiment.federation.evaluate("test")


def pooled_eval(experiment: Experiment) -> dict[str, float]:
    """The shared model on the pooled held-out split (ROC AUC is not a mean of per-shop AUCs)."""
    return experiment.workload.task.evaluate(experiment.federation.model(), experiment.workload.central.test)


def run_repeated(
    config: ExperimentConfig,
    workload: Workload,
    repeats: int,
    evaluate: Callable[[Experiment], dict[str, float]] = federated_eval,
    metric: str = "hr@10",
) -> Outcome:
    """``repeats`` runs of one DP config: an outcome with their mean metrics (``repeats`` names each run's ``metric``).

    The clients draw their DP noise from the operating system (the server must not know it), so a
    run is one draw of the noise: the mean over runs is what a table of figures can stand on.
    """
    outs = [run(config, workload, evaluate) for _ in range(repeats)]
    if repeats == 1:
        return outs[0]
    metrics = {k: float(np.mean([o.metrics[k] for o in outs])) for k in outs[0].metrics}
    each = " / ".join(f"{o.metrics[metric]:.3f}" for o in outs)
    return replace(
        outs[0],
        metrics=metrics,
        seconds_per_round=float(np.mean([o.seconds_per_round for o in outs])),
        repeats=f"mean of {repeats} runs, each its own noise draw ({metric.upper()} {each})",
    )


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def print_table(title: str, notes: list[str], metric_names: tuple[str, str], rows: list[Row]) -> None:
    print(f"\n{title}")
    for note in notes:
        print(f"# {note}")
    print()
    print(f"| {'row':<44} | {metric_names[0]:>8} | {metric_names[1]:>8} | epsilon (delta 1e-5) | s/round | setting")
    print("|---|---|---|---|---|---|")
    for r in rows:
        eps = "no DP" if r.epsilon is None else f"{r.epsilon:.3f}"
        print(f"| {r.name:<44} | {_fmt(r.metrics[0]):>8} | {_fmt(r.metrics[1]):>8} | {eps:>20} | "
              f"{_fmt(r.seconds_per_round, 2):>7} | {r.setting}", flush=True)  # fmt: skip


def fed_row(name: str, outcome: Outcome, keys: tuple[str, str], setting: str) -> Row:
    extra = []
    if outcome.noise_multiplier is not None:
        extra.append(f"noise multiplier {outcome.noise_multiplier:.3f}")
    if outcome.clipped > 0:
        extra.append(f"{outcome.clipped:.0%} of updates clipped")
    if outcome.stop_reason:
        extra.append(f"stopped after {outcome.rounds} rounds: {outcome.stop_reason}")
    if outcome.repeats:
        extra.append(outcome.repeats)
    return Row(name, (outcome.metrics[keys[0]], outcome.metrics[keys[1]]), outcome.epsilon, outcome.seconds_per_round,
               "; ".join([setting, *extra]))  # fmt: skip


def max_diff(a: Outcome, b: Outcome) -> str:
    return f"max |model - plaintext model| = {float(np.max(np.abs(a.vector - b.vector))):.1e}"


def _train_text(t: dict[str, Any]) -> str:
    optimizer = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}[t["optimizer"]]
    return f"{optimizer} lr {t['lr']:g}, batch {t['batch_size']}, {t['epochs']} local epoch(s)"


# ---------------------------------------------------------------------------- centralized


class CentralRows:
    """The rows ``benchmarks/centralized.py`` printed, looked up by the start of their name."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float, float, str]] = []

    def find(self, prefix: str) -> tuple[str, float, float, float, str]:
        return next(row for row in self.rows if row[0].startswith(prefix))


def central_row(label: str, found: tuple[str, float, float, float, str]) -> Row:
    name, first, second, seconds, note = found
    setting = f"benchmarks/centralized.py: {name}; {note + '; ' if note else ''}{seconds:.0f} s in all"
    return Row(label, (first, second), None, None, setting)


def centralized_namespace(s: Settings, args: argparse.Namespace) -> argparse.Namespace:
    """centralized.py's arguments, at the epochs and slices this benchmark affords."""
    return argparse.Namespace(
        cache_dir=args.cache_dir, seeds=1, mf_epochs=s.central_mf_epochs, tr_epochs=s.central_tr_epochs,
        frozen_length=128, head_epochs=20, ft_length=64, max_reviews=s.max_reviews, ft_max_train=s.ft_max_train,
        ft_epochs=1, ft_lr=1e-4,
    )  # fmt: skip


# ---------------------------------------------------------------------------- cases


def movielens_case(s: Settings, args: argparse.Namespace, ns: argparse.Namespace) -> dict[str, float]:
    central = CentralRows()
    centralized.movielens(ns, central.rows)
    seed = args.seed
    regions = {"case": "movielens", "model": "mf", "partition": "regions", "num_silos": 5}
    base = experiment_config(workload=regions, train=ML_TRAIN, rounds=s.ml_rounds, seed=seed)
    workload = build_workload(base)
    ml = lambda **kw: experiment_config(workload=regions, seed=seed, **kw)  # noqa: E731
    keys = ("hr@10", "ndcg@10")
    popularity = central.find("popularity")
    rows = [
        Row(
            "popularity (training counts)",
            (popularity[1], popularity[2]),
            None,
            None,
            "benchmarks/centralized.py: the trivial floor",
        ),
        central_row("centralized MF", central.find("MF dim 32 (BCE")),
        central_row("centralized MF + MiniLM text features", central.find("MF dim 32 + frozen")),
        central_row("centralized transformer (MiniLM item tower)", central.find("transformer")),
    ]
    train = _train_text(ML_TRAIN)
    plain = run(base, workload, federated_eval)
    rows.append(fed_row("federated plaintext, MF", plain, keys, f"FedAvg, {s.ml_rounds} rounds, {train}"))
    protected = {"aggregation": {"mode": "masked"}, "privacy": {"clip": ML_CLIP}}
    masked = run(ml(train=ML_TRAIN, rounds=s.ml_rounds, **protected), workload, federated_eval)
    rows.append(fed_row("federated masked (SecAgg), MF", masked, keys,
                        f"as plaintext; 32-bit ring, clip = value bound {ML_CLIP:g}; {max_diff(masked, plain)}"))  # fmt: skip
    ckks = run(
        ml(train=ML_TRAIN, rounds=s.ml_rounds, aggregation={"mode": "ckks"}, privacy={"clip": ML_CLIP}), workload, federated_eval
    )
    rows.append(fed_row("federated CKKS, MF", ckks, keys,
                        f"as plaintext; preset 'compact', clip = value bound {ML_CLIP:g}; {max_diff(ckks, plain)}"))  # fmt: skip
    small_regions = {**regions, "dim": ML_DP_DIM, "loss": ML_DP_LOSS}
    small_base = experiment_config(workload=small_regions, train=ML_TRAIN, rounds=s.ml_rounds, seed=seed)
    small_workload = build_workload(small_base)
    small = run(small_base, small_workload, federated_eval)
    rows.append(fed_row(f"federated plaintext, MF dim {ML_DP_DIM}, {ML_DP_LOSS}", small, keys,
                        f"as plaintext MF with dim {ML_DP_DIM}, {ML_DP_LOSS} loss: the user-level DP row's model without DP"))  # fmt: skip
    # Record level: each example built from one rating alone (negatives uniform over all items, own randomness).
    record = {"level": "sample", "unit": "record", "delta": DELTA, "max_grad_norm": ML_DP_GRAD_NORM, "clip": ML_CLIP}
    record_workload = build_workload(experiment_config(workload=small_regions, train=ML_TRAIN, rounds=1, seed=seed,
                                                       privacy={**record, "target_epsilon": 8.0}))  # fmt: skip
    uniform = run(small_base, record_workload, federated_eval)
    rows.append(fed_row(f"federated plaintext, MF dim {ML_DP_DIM}, {ML_DP_LOSS}, uniform negatives", uniform, keys,
                        "as above on the record-level examples (negatives uniform over all items): the record-level "
                        "rows' model without DP"))  # fmt: skip
    dp8 = math.nan
    for eps in EPSILONS:
        dp_cfg = experiment_config(workload=small_regions, seed=seed, train=ML_DP_TRAIN, rounds=s.ml_dp_rounds,
                                   aggregation={"mode": "masked"}, privacy={**record, "target_epsilon": eps})  # fmt: skip
        out = run_repeated(dp_cfg, record_workload, s.dp_repeats if eps == 8.0 else 1)
        rows.append(fed_row(f"federated DP-SGD eps={eps:g} record level + masked, MF dim {ML_DP_DIM}, {ML_DP_LOSS}", out, keys,
                            f"{s.ml_dp_rounds} rounds, {_train_text(ML_DP_TRAIN)}, max_grad_norm {ML_DP_GRAD_NORM:g}; "
                            "unit: one rating"))  # fmt: skip
        if eps == 8.0:
            dp8 = out.metrics["hr@10"]
    user = {"level": "sample", "unit": "user", "target_epsilon": 8.0, "delta": DELTA, "max_grad_norm": ML_USER_DP_GRAD_NORM,
            "clip": ML_CLIP}  # fmt: skip
    user_cfg = experiment_config(workload=small_regions, seed=seed, train=ML_USER_DP_TRAIN, rounds=s.ml_dp_rounds,
                                 aggregation={"mode": "masked"}, privacy=user)  # fmt: skip
    out = run_repeated(user_cfg, small_workload, s.dp_repeats)
    userdp8_silo = out.metrics["hr@10"]
    rows.append(fed_row(f"federated DP-SGD eps=8 user level + masked, MF dim {ML_DP_DIM}, {ML_DP_LOSS}", out, keys,
                        f"{s.ml_dp_rounds} rounds, {_train_text(ML_USER_DP_TRAIN)}, per-user max_grad_norm "
                        f"{ML_USER_DP_GRAD_NORM:g}; unit: one user (Poisson sampling of users, user rows local and noise-free)"))  # fmt: skip
    # User-level DP across silos: each silo sums its users' clipped gradients, the silos add Skellam noise shares
    # before masking, so all 943 users share one noise draw a round (FedSGD, one step a round).
    users = sum(len(c.train.users) for c in small_workload.clients.values())
    silos = len(small_workload.clients)
    across = {"level": "client", "unit": "user", "target_epsilon": 8.0, "delta": DELTA, "clip": ML_ACROSS_GRAD_NORM,
              "noise": "skellam"}  # fmt: skip
    across_cfg = experiment_config(
        workload=small_regions, seed=seed, rounds=ML_ACROSS_STEPS_PER_DP_ROUND * s.ml_dp_rounds,
        train={"optimizer": "sgd", "lr": ML_ACROSS_LR / users, "batch_size": 1024, "epochs": 1},
        strategy={"name": "fedsgd", "lr": ML_ACROSS_LR * silos / users},
        aggregation={"mode": "masked", "value_bound": ML_ACROSS_SILO_BOUND}, privacy=across,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="utility-") as tmp:  # the noise's survivors, as the run plans them
        built = build_experiment(parse_config(across_cfg.to_dict(), overrides={"output_dir": tmp}), workload=small_workload)
        threshold = built.federation.pipeline.backend.integer_noise.min_clients
    out = run_repeated(across_cfg, small_workload, s.dp_repeats)
    userdp8 = out.metrics["hr@10"]
    rows.append(fed_row(f"federated user level across silos eps=8 + masked, Skellam, MF dim {ML_DP_DIM}", out, keys,
                        f"FedSGD, {across_cfg.rounds} rounds (one step each), every user every round; each silo sums its users' "
                        f"gradients clipped to {ML_ACROSS_GRAD_NORM:g} (sum clipped to {ML_ACROSS_SILO_BOUND:g}) and adds its "
                        f"Skellam share, sized for the masking threshold of {threshold} of {silos} silos; step lr {ML_ACROSS_LR:g} "
                        f"over {users} users; user rows local (SGD, same step); unit: one user"))  # fmt: skip
    main_over = {"logging.tensorboard": False, "logging.jsonl": False, "logging.quiet": True, "seed": seed, "evaluate_every": 0}
    if s.main_job_rounds is not None:
        main_over["rounds"] = s.main_job_rounds
    main_job = load_config(ROOT / "examples" / "main.toml", overrides=main_over)
    out = run(main_job, build_workload(main_job), federated_eval)
    t, p = main_job.train, main_job.privacy
    rows.append(fed_row(f"main job: DP-SGD eps={p.target_epsilon:g} + masked, MF dim {main_job.workload.dim}", out, keys,
                        f"examples/main.toml as is: {main_job.rounds} rounds, {t.optimizer.capitalize()} lr {t.lr:g}, batch "
                        f"{t.batch_size}, {t.epochs} epoch(s), max_grad_norm {p.max_grad_norm:g}, clip {p.clip:g}"))  # fmt: skip

    text_cfg = experiment_config(workload={**regions, "model": "mf_text"}, train=ML_TRAIN, rounds=s.ml_rounds, seed=seed)
    text = run(text_cfg, build_workload(text_cfg), federated_eval)
    rows.append(fed_row("federated plaintext, MF + MiniLM text features", text, keys, f"FedAvg, {s.ml_rounds} rounds, {train}"))

    tr_train = {"optimizer": "adam", "lr": 1e-3, "batch_size": 256, "epochs": 1}
    transformer = {
        **regions,
        "model": "transformer",
        "dim": 64,
        "loss": "softmax",
        "num_train_negatives": 16,
        "history_length": 20,
    }
    tr_cfg = experiment_config(workload=transformer, train=tr_train, rounds=s.transformer_rounds, seed=seed)
    tr_workload = build_workload(tr_cfg)
    tr = run(tr_cfg, tr_workload, federated_eval)
    rows.append(fed_row("federated plaintext, transformer", tr, keys,
                        f"FedAvg, {s.transformer_rounds} rounds, {_train_text(tr_train)}; centralized.py's model "
                        "(dim 64, sampled softmax, 16 negatives)"))  # fmt: skip

    print_table(
        "MovieLens-100K, 5 regional silos: HR@10 / NDCG@10",
        [
            f"Partition: {workload.description}; every user is evaluated on the silo holding it (MF user vectors never "
            "leave it), so the silos' user-weighted mean is the mean over all 943 users.",
            f"Centralized rows: benchmarks/centralized.py's functions at 1 seed, MF/MF+text {s.central_mf_epochs} epochs, "
            f"transformer {s.central_tr_epochs} epoch(s), to fit the time budget (its own full run: 3 seeds, 20 and 10 epochs).",
            f"Federated: seed {seed}, every silo every round, in one process, 1 torch thread; evaluated once after the last round. "
            f"DP rows: sample-level DP-SGD on every silo (Poisson batches, RDP accountant), noise calibrated so every silo "
            f"spends at most epsilon over all rounds; epsilon shown = the largest silo's, from the ledger. The across-silos "
            "row is client-level DP with a user as the unit: its epsilon covers each of the 943 users (PLD of the Skellam "
            "noise actually present; it is sized for the masking threshold, so all silos surviving spend less than 8).",
        ],
        ("HR@10", "NDCG@10"),
        rows,
    )
    print("# DP note: Adam with batches of 1024 over 5 rounds (the main job's earlier settings) reached only popularity's "
          f"HR@10 (0.398 at epsilon 8). At the same epsilon, plain SGD (lr {ML_DP_TRAIN['lr']:g}: the clipped, averaged gradients are small), Poisson batches of "
          f"{ML_DP_TRAIN['batch_size']} (q ~ 0.2 per silo), {ML_DP_TRAIN['epochs']} local epochs, {s.ml_dp_rounds} rounds and "
          f"max_grad_norm {ML_DP_GRAD_NORM:g} do better: Adam's per-coordinate scaling turns the noise on the many embedding rows "
          "a batch does not touch into full-size steps, SGD does not; larger batches raise signal over noise faster than the "
          "calibrated noise multiplier grows. With Adam, max_grad_norm changes nothing (Adam is scale-invariant when every "
          "per-sample gradient is clipped). A smaller embedding helps most: at epsilon 8, seed 0, HR@10 0.465 / 0.523 / 0.556 / "
          "0.576 / 0.546 with dim 64 / 32 / 16 / 8 / 4 (seed 1, dim 8: 0.571); the noise is spread over fewer coordinates "
          f"while dim {ML_DP_DIM} still holds most of the plaintext model's quality (see the plaintext dim {ML_DP_DIM} row). "
          "Those figures were measured with negatives among each user's unrated items, which breaks the record-level claim "
          "(one rating changes the negatives of the user's other examples); the record-level rows now draw negatives uniformly "
          "over all items (epsilon 8, seed 0, BCE: HR@10 0.554 at lr 300 batch 4096, 0.545 at lr 500 batch 8192; the "
          "sampled softmax loss of the rows above: 0.583 and 0.571 in two runs at lr 300, 0.530 / 0.538 at lr 100 / 1000).")  # fmt: skip
    print("# User-level DP note (epsilon 8, MF dim 8, seed 0, 10 rounds, SGD; per-user max_grad_norm C): every setting tried "
          "lands near the popularity floor: Poisson batches of 4096 (q ~ 0.2, 200 steps, noise multiplier 2.2): lr 10 C 0.05 "
          "0.385, lr 3 C 0.1 0.400, lr 10 C 0.02 0.396, lr 30 C 0.02 0.329, lr 50 C 0.01 0.309, lr 10 C 1 0.165; dim 2 0.404; "
          "weight decay 0.01 0.233; Adam lr 0.01 / 0.003 0.344 / 0.303. Full batches (q = 1, 40 steps, noise multiplier 4.0): "
          "lr 30 C 0.1 0.413 (2 negatives: 0.426); 20 steps: lr 3 C 3 0.423. Without noise the same per-user clipping reaches "
          "0.636 (q ~ 0.2), so the loss is the noise: one user's bound spread over 15,000 item coordinates, with about 190 "
          "users per silo to average it over. All of those used the BCE loss. The sampled softmax loss (the rows above; "
          "q = 1, 40 steps) reaches 0.485 at lr 30 C 0.1, 0.484 at lr 10 C 0.3, 0.468 at lr 3 C 1, 0.444 at lr 100 C 0.03, "
          "0.422 at lr 10 C 0.1, 0.305 at lr 100 C 0.1; dim 4 / 16: 0.488 / 0.474; 32 negatives 0.468; 20 / 80 steps "
          "0.453 / 0.476; SGD momentum 0.5 / 0.9 (lr 15 / 3) 0.452 / 0.369. Its twin without DP: 0.633 in the sweep (the table's run may differ by 0.01). "
          "Where the gap comes from (dim 8, seed 0, q = 1, 40 steps): with the noise all but off (epsilon 1000) the same clipped SGD "
          "reaches 0.536 at lr 30 C 0.1, 0.614 at lr 100 C 0.1 and 0.643 at lr 30 C 1, so most of the gap is the small step "
          "(lr x C about 3) that the noise of about 190 users per silo allows, and the noise itself costs the last 0.05; "
          "refitting the user rows to the final item table (Adam, 20 epochs) adds 0.005, averaging the last 2 to 5 global "
          "models -0.01 to +0.01. Putting every user behind one noise draw affords lr x C 9: that is the across-silos row (each "
          "silo sums its users' clipped gradients, the silos' Skellam shares make the noise of the masked sum); one silo "
          "holding all 943 users, the same steps, gave 0.547 to 0.566 at dim 8 against 0.645 / 0.652 without DP.")  # fmt: skip
    print("# Record-level runs of the sweep (the table's setting at dim 8, epsilon 8): 0.564 / 0.571 / 0.577 at seed 0, 0.572 / 0.592 at seed 1; "
          "8 local epochs, 20 rounds, lr 500, C 0.5 with lr 200, or batch 8192 with lr 500 and 8 epochs: 0.546 to 0.590, no "
          "better. With the noise all but off the same clipped SGD reaches 0.618 (C 1: 0.643), so here too the step the "
          "noise allows is most of the gap.")  # fmt: skip
    _, central_hr, central_ndcg, _, _ = central.find("MF dim 32 (BCE")
    return {
        "ml100k_central_hr10": central_hr,
        "ml100k_central_ndcg10": central_ndcg,
        "ml100k_fed_hr10": plain.metrics["hr@10"],
        "ml100k_text_fed_hr10": tr.metrics["hr@10"],  # the text-aware recommender: MiniLM item tower
        "ml100k_dp8_hr10": dp8,
        "ml100k_userdp8_hr10": userdp8,  # across silos: the federation's users behind one noise draw
        "ml100k_userdp8_insilo_hr10": userdp8_silo,
    }


def clothing_case(s: Settings, args: argparse.Namespace, ns: argparse.Namespace) -> dict[str, float]:
    central = CentralRows()
    centralized.clothing(ns, central.rows)
    seed = args.seed
    shops = {"case": "clothing", "model": "frozen", "partition": "silos", "num_silos": 10, "max_length": 128}
    if s.max_reviews is not None:
        shops["max_reviews"] = s.max_reviews
    cl = lambda **kw: experiment_config(workload=shops, seed=seed, **kw)  # noqa: E731
    base = cl(train=CLOTHING_TRAIN, rounds=s.clothing_rounds)
    workload = build_workload(base)
    keys = ("accuracy", "auc")
    majority = central.find("majority")
    rows = [
        Row("majority class", (majority[1], majority[2]), None, None, "benchmarks/centralized.py"),
        central_row("centralized frozen MiniLM + head", central.find("frozen MiniLM")),
        central_row("centralized MiniLM top layer fine-tuned", central.find("MiniLM top layer")),
    ]
    train = _train_text(CLOTHING_TRAIN)
    plain = run(base, workload, pooled_eval)
    rows.append(fed_row("federated plaintext, frozen + head", plain, keys, f"FedAvg, {s.clothing_rounds} rounds, {train}"))
    protected = {"privacy": {"clip": CLOTHING_CLIP}}
    for mode, label in (("masked", "masked (SecAgg)"), ("ckks", "CKKS")):
        out = run(
            cl(train=CLOTHING_TRAIN, rounds=s.clothing_rounds, aggregation={"mode": mode}, **protected), workload, pooled_eval
        )
        rows.append(fed_row(f"federated {label}, frozen + head", out, keys,
                            f"as plaintext; clip = value bound {CLOTHING_CLIP:g}; {max_diff(out, plain)}"))  # fmt: skip
    for eps in EPSILONS:
        privacy = {
            "level": "sample",
            "target_epsilon": eps,
            "delta": DELTA,
            "max_grad_norm": CLOTHING_DP_GRAD_NORM,
            "clip": CLOTHING_CLIP,
        }
        config = cl(train=CLOTHING_DP_TRAIN, rounds=s.clothing_rounds, aggregation={"mode": "masked"}, privacy=privacy)
        out = run_repeated(config, workload, s.dp_repeats if eps == 8.0 else 1, pooled_eval, "auc")
        rows.append(fed_row(f"federated DP-SGD eps={eps:g} + masked, frozen + head", out, keys,
                            f"FedAvg, {s.clothing_rounds} rounds, {_train_text(CLOTHING_DP_TRAIN)}, max_grad_norm "
                            f"{CLOTHING_DP_GRAD_NORM:g}"))  # fmt: skip
    test = workload.central.test
    sliced = f"the first {s.max_reviews} reviews of the shuffled split" if s.max_reviews else "all 22,641 reviews with a text"
    print_table(
        "Clothing reviews, 10 shops: accuracy / ROC AUC",
        [
            f"Data: {sliced}; stratified 80/20 split, seed 42 ({workload.central.num_train} train / {len(test)} test); "
            "label Recommended IND; input 'title. text'.",
            f"Partition: {workload.description}.",
            "Model: the frozen MiniLM (all-MiniLM-L6-v2) embedding of each review (128 tokens, encoded once and cached) and a "
            "logistic head: fine-tuning MiniLM federated on CPU is too slow for this budget; centralized.py's fine-tuned row "
            f"uses a seeded {s.ft_max_train}-review subset of the training split and 1 epoch.",
            "Every federated model is shared whole, so it is scored on the pooled held-out split like the centralized one "
            "(the federated evaluation would average per-shop AUCs).",
            "DP rows: sample-level DP-SGD on every shop, the noise calibrated so every shop spends at most epsilon over all "
            "rounds; epsilon shown = the largest shop's, from the ledger. Their settings come from a sweep at epsilon 8 "
            "(seeds 0 / 1 / 2): SGD lr 15, batch 1024, 3 epochs AUC 0.9116 / 0.9118 / 0.9094; SGD lr 3, batch 512, 2 epochs "
            "0.9009 / 0.8994 / 0.9002; Adam (lr 0.003 to 0.1) at most 0.9095.",
        ],
        ("accuracy", "ROC AUC"),
        rows,
    )
    return {"clothing_central_auc": central.find("frozen MiniLM")[2], "clothing_fed_auc": plain.metrics["auc"]}


def devices_case(s: Settings, args: argparse.Namespace, central_mf: tuple[float, float] | None) -> None:
    seed = args.seed
    users = {"case": "movielens", "model": "mf", "partition": "users"}
    sampling = {"kind": "poisson", "q": DEVICE_Q}
    base = experiment_config(workload=users, train=DEVICE_TRAIN, rounds=s.device_rounds, seed=seed, sampling=sampling)
    workload = build_workload(base)
    keys = ("hr@10", "ndcg@10")
    rows = []
    if central_mf is not None:
        rows.append(Row("centralized MF (as in the silo table)", central_mf, None, None, "same users, split and model"))
    train = _train_text(DEVICE_TRAIN)
    plain = run(base, workload, federated_eval)
    rows.append(fed_row("federated plaintext, MF, Poisson q=0.3", plain, keys, f"FedAvg, {s.device_rounds} rounds, {train}"))
    privacy = {"level": "client", "target_epsilon": 8.0, "delta": DELTA, "clip": DEVICE_CLIP, "noise": "central"}
    cfg = experiment_config(
        workload=users, train=DEVICE_TRAIN, rounds=s.device_rounds, seed=seed, sampling=sampling, privacy=privacy
    )
    out = run(cfg, workload, federated_eval)
    rows.append(fed_row("federated DP-FedAvg eps=8 (client level), MF", out, keys,
                        f"as plaintext; clip {DEVICE_CLIP:g}, uniform weights, Gaussian noise added by the server"))  # fmt: skip
    print_table(
        "MovieLens-100K cross-device: one client per user (943 clients): HR@10 / NDCG@10",
        [
            "Same protocol and split as the silo table; each client holds one user (its training items and held-out item).",
            f"Poisson sampling: each user joins a round with probability {DEVICE_Q:g} (about {DEVICE_Q * 943:.0f} clients a "
            f"round); {s.device_rounds} rounds; a user's MF vector stays on its device and is trained only in rounds it joins.",
            "DP row: client-level DP-FedAvg (McMahan et al. 2018): updates clipped in L2, averaged over the expected count, "
            "Gaussian noise added by a trusted server (plaintext aggregation); epsilon over the whole run by RDP with "
            "amplification by Poisson sampling, from the ledger.",
        ],
        ("HR@10", "NDCG@10"),
        rows,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and epochs, the 3,000-review clothing slice (~3 min)")
    parser.add_argument("--only", choices=("movielens", "clothing", "devices"), default=None)
    parser.add_argument("--no-devices", action="store_true", help="skip the cross-device (per-user) case")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core box)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None, help="data cache (default: $PRIVFL_DATA_DIR or ~/.cache/privfl/data)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else FULL
    ns = centralized_namespace(s, args)
    started = time.perf_counter()
    print(
        f"# utility benchmark ({'quick' if args.quick else 'full'}): {os.cpu_count()} CPUs, {args.threads} torch thread(s), seed {args.seed}"
    )
    results: dict[str, float] = {}
    if args.only in (None, "movielens"):
        results |= movielens_case(s, args, ns)
    if args.only in (None, "clothing"):
        results |= clothing_case(s, args, ns)
    if args.only == "devices" or (args.only is None and not args.no_devices):
        central_mf = None
        if "ml100k_central_hr10" in results:
            central_mf = (results["ml100k_central_hr10"], results["ml100k_central_ndcg10"])
        devices_case(s, args, central_mf)
    print(f"\n# total {time.perf_counter() - started:.0f} s")
    order = (
        "ml100k_central_hr10",
        "ml100k_fed_hr10",
        "ml100k_text_fed_hr10",
        "ml100k_dp8_hr10",
        "clothing_central_auc",
        "clothing_fed_auc",
        "ml100k_userdp8_hr10",
        "ml100k_userdp8_insilo_hr10",
    )
    print("utility " + " ".join(f"{k}={_fmt(results.get(k, math.nan))}" for k in order))


if __name__ == "__main__":
    main()
