"""Private hyperparameter search with FLAML, its privacy cost charged to the budget (``fedcore tune``).

Papernot & Steinke (ICLR 2022): the number of trials ``K`` is drawn once, before the first trial,
from a truncated negative binomial (geometric by default) or Poisson distribution, with OS
randomness (from ``seed`` only in a reproducible simulation) and kept hidden; every trial is an
independent, whole federated run with hyperparameters drawn independently from the space
(``flaml.tune`` with its ``RandomSearch``: no trial depends on another's result, and no trial is
stopped early, since the theorem covers neither); only the best trial is released. Each trial
scores its model on the clients' validation data with Gaussian noise each client adds itself
(``Federation.noised_score``), so a trial's output, score included, is DP.

The noise is calibrated before the first trial: the planned trial's noise multiplier is the
smallest whose search bound (``dp.TuningEvent``: the trial's events and its noised score, through
Theorem 2 / 6) meets ``privacy.target_epsilon``; a trial whose settings change the privacy curve
(batch size, epochs, rounds) gets the smallest noise keeping its RDP curve at or below the
planned trial's at every order, so every trial costs at most what was charged. The budget
(``privacy.budget_epsilon`` or the target) refuses a search it cannot afford before anything runs;
the ledger records the search once, before the first trial.
"""

from __future__ import annotations

import dataclasses
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

import dp

from ..errors import ConfigError
from .config import ExperimentConfig, load_config, parse_config
from .experiment import Experiment, Workload, build_experiment, build_workload

__all__ = ["SEARCHABLE", "SearchSpace", "TrialRecord", "TuneOutcome", "load_search_space", "parse_search_space", "tune"]

#: Settings a search may vary: training, clipping and the privacy-curve shape (batch, epochs, rounds).
#: The noise multiplier is not one of them: each trial's is calibrated (see the module docstring).
SEARCHABLE = (
    "rounds",
    "train.optimizer",
    "train.lr",
    "train.epochs",
    "train.batch_size",
    "train.momentum",
    "train.weight_decay",
    "strategy.lr",
    "privacy.max_grad_norm",
    "privacy.clip",
)
_DOMAINS = ("uniform", "loguniform", "randint", "lograndint", "choice")
#: Per-example metrics in [0, 1], so that one unit changes a sum of them by at most 1.
_SUMMABLE = ("hr@10", "ndcg@10", "accuracy")


def _flaml_tune() -> Any:
    """``flaml.tune``, without its notice about the AutoML extra (not needed here) or its search log lines."""
    import logging
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flaml.automl is not available")
            from flaml import tune as flaml_tune
    except ImportError:  # pragma: no cover - the 'tune' extra
        raise ImportError("fedcore tune needs flaml: pip install 'privfl[tune]'") from None
    logging.getLogger("flaml").setLevel(logging.WARNING)
    return flaml_tune


@dataclass(frozen=True)
class SearchSpace:
    """A private search: what varies, how many trials, and the noised selection score.

    Attributes:
        params: ``{"train.lr": ("loguniform", [10.0, 1000.0]), ...}`` (keys from ``SEARCHABLE``).
        distribution: the distribution of the number of trials.
        metric: the validation metric that selects (higher is better).
        score_noise_multiplier: each client's score noise over its sensitivity (1).
    """

    params: dict[str, tuple[str, list[Any]]]
    distribution: dp.TrialDistribution
    metric: str = "hr@10"
    score_noise_multiplier: float = 5.0

    def flaml_space(self) -> dict[str, Any]:
        """The space as ``flaml.tune`` domains."""
        flaml_tune = _flaml_tune()
        return {
            k: getattr(flaml_tune, kind)(*args) if kind != "choice" else flaml_tune.choice(args)
            for k, (kind, args) in self.params.items()
        }

    def describe(self) -> dict[str, str]:
        return {k: f"{kind}({', '.join(repr(a) for a in args)})" for k, (kind, args) in self.params.items()}


def parse_search_space(raw: Mapping[str, Any]) -> SearchSpace:
    """Build a ``SearchSpace`` from ``{"trials": {...}, "score": {...}, "space": {...}}`` (the TOML tables).

    ``[trials]``: ``distribution`` = geometric | truncated_negative_binomial (with ``eta``) |
    poisson, and ``mean`` (expected trials, >= 1). ``[score]``: ``metric``, ``noise_multiplier``.
    ``[space]``: ``"section.key" = {loguniform = [lo, hi]}`` (or uniform, randint, lograndint, choice).

    Raises:
        ConfigError: an unknown table, key or domain, or a value out of range.
    """
    unknown = sorted(set(raw) - {"trials", "score", "space"})
    if unknown:
        raise ConfigError(f"unknown table(s) {unknown} in the search space; allowed: ['score', 'space', 'trials']")
    trials = dict(raw.get("trials", {}))
    kind = trials.pop("distribution", "geometric")
    mean = trials.pop("mean", 3.0)
    eta = trials.pop("eta", None)
    if trials:
        raise ConfigError(f"unknown key(s) {sorted(trials)} in [trials]; allowed: ['distribution', 'eta', 'mean']")
    try:
        if kind == "geometric":
            dist = dp.TrialDistribution.geometric(mean=mean)
        elif kind == "truncated_negative_binomial":
            dist = dp.TrialDistribution.truncated_negative_binomial(eta=1.0 if eta is None else eta, mean=mean)
        elif kind == "poisson":
            dist = dp.TrialDistribution.poisson(mean=mean)
        else:
            raise ConfigError(
                f"trials.distribution must be one of ['geometric', 'truncated_negative_binomial', 'poisson'], got {kind!r}"
            )
        if eta is not None and kind != "truncated_negative_binomial":
            raise ConfigError(f"trials.eta applies to distribution 'truncated_negative_binomial', got {kind!r}")
    except (dp.DPValueError, dp.DPTypeError) as exc:
        raise ConfigError(f"[trials]: {exc}") from None
    score = dict(raw.get("score", {}))
    metric = score.pop("metric", "hr@10")
    z = score.pop("noise_multiplier", 5.0)
    if score:
        raise ConfigError(f"unknown key(s) {sorted(score)} in [score]; allowed: ['metric', 'noise_multiplier']")
    if isinstance(z, bool) or not isinstance(z, (int, float)) or not z > 0:
        raise ConfigError(f"score.noise_multiplier must be a number > 0, got {z!r}")
    params: dict[str, tuple[str, list[Any]]] = {}
    for key, spec in dict(raw.get("space", {})).items():
        if key not in SEARCHABLE:
            raise ConfigError(f"space key {key!r} cannot be searched; allowed: {list(SEARCHABLE)}")
        if not isinstance(spec, Mapping) or len(spec) != 1 or next(iter(spec)) not in _DOMAINS:
            raise ConfigError(
                f"space.{key} must be one table entry {{domain = [...]}} with domain in {list(_DOMAINS)}, got {spec!r}"
            )
        domain, args = next(iter(spec.items()))
        if not isinstance(args, list) or not args or (domain != "choice" and len(args) != 2):
            raise ConfigError(f"space.{key}.{domain} takes [low, high] (choice: a non-empty list), got {args!r}")
        params[key] = (domain, list(args))
    if not params:
        raise ConfigError("the search space is empty: give at least one [space] entry")
    return SearchSpace(params, dist, str(metric), float(z))


def load_search_space(path: str | Path) -> SearchSpace:
    """Read a search space from a TOML file (see ``parse_search_space``)."""
    from .config import tomllib  # with its Python 3.10 fallback

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space file {str(path)!r} does not exist")
    try:
        return parse_search_space(tomllib.loads(path.read_text(encoding="utf-8")))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"search space file {str(path)!r} is malformed: {exc}") from None


@dataclass(frozen=True)
class TrialRecord:
    """One trial, for the operator only (releasing any but the winner's is not covered)."""

    index: int
    params: dict[str, Any]
    noise_multiplier: float
    score: float
    test_metrics: dict[str, float]


@dataclass
class TuneOutcome:
    """A finished private search.

    Attributes:
        config: the winner's whole config (its noise multiplier fixed), runnable with ``fedcore run``.
        winner: the winning trial; ``None`` when ``K = 0`` (Poisson) drew no trial.
        trials: every trial (operator only: kept out of the report, whose release is covered).
        ledger: the search's ledger (its ``TuningEvent`` records, plus what it was given).
        epsilon: the budget's spend after the search (RDP: see ``dp.TuningEvent``).
        report: the winner's privacy report with the search's ledger and tuning section.
    """

    config: ExperimentConfig | None
    winner: TrialRecord | None
    trials: list[TrialRecord]
    ledger: dp.Ledger
    epsilon: float
    budget: dp.PrivacyBudget
    tuning: dict[str, Any] = field(default_factory=dict)
    report: dp.PrivacyReport | None = None

    def summary(self) -> str:
        """What ``fedcore tune`` prints: trials, epsilon spent (search included) and the winner."""
        lines = [f"private search: {self.tuning.get('trials_run')} trial(s); epsilon spent {self.epsilon:.4f} "
                 f"(delta {self.budget.delta:g}, RDP bound of the search)"]  # fmt: skip
        if self.winner is None:
            lines.append("no trial was drawn (K = 0): nothing selected, nothing released")
        else:
            lines.append(f"winner: {self.tuning['winner']}")
            lines.append("winner test metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(self.winner.test_metrics.items())))
        return "\n".join(lines)


def _check(config: ExperimentConfig, space: SearchSpace) -> None:
    p = config.privacy
    if p.level == "none":
        raise ConfigError("a private search needs privacy.level 'sample' or 'client', got 'none'")
    if p.level == "client" and p.noise != "central":
        raise ConfigError(f"a private search plans central noise only, got privacy.noise={p.noise!r}")
    if p.adaptive_clip:
        raise ConfigError("a private search needs fixed clipping, got privacy.adaptive_clip=true")
    if config.train.early_stopping_metric is not None:
        raise ConfigError("train.early_stopping_metric reads the validation data without noise; a private search refuses it")
    if config.strategy.name in ("selection", "ensemble"):
        raise ConfigError(f"strategy {config.strategy.name!r} reveals individual models; a private search refuses it")
    if p.level == "sample" and space.metric not in _SUMMABLE:
        raise ConfigError(f"score.metric must be one of {list(_SUMMABLE)} (a per-example metric in [0, 1]), got {space.metric!r}")


def _trial_config(base: ExperimentConfig, params: Mapping[str, Any], noise: float, out: str) -> ExperimentConfig:
    over: dict[str, Any] = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in params.items()}
    over.update({
        "privacy.noise_multiplier": float(noise), "privacy.target_epsilon": None, "privacy.budget_epsilon": None,
        "output_dir": out, "evaluate_every": 0, "logging.jsonl": False, "logging.tensorboard": False,
        "logging.wandb": False, "logging.quiet": True,
    })  # fmt: skip
    return parse_config(base.to_dict(), overrides=over)


def _planned(experiment: Experiment) -> list[Any]:
    """Every event the run would record, planned for the worst case (as its budget checks are)."""
    fed = experiment.federation
    rate = fed.sampler.rate(len(fed.client_ids))
    return [e for t in range(experiment.config.rounds) for e in fed._planned_events(t, list(fed.client_ids), rate)]


def _with_noise(events: list[Any], z: float) -> list[Any]:
    return [dataclasses.replace(e, noise_multiplier=z) for e in events]


def _guarantees(events: list[Any], level: str) -> list[str | None]:
    return [None] if level == "client" else sorted({e.client_id for e in events})


def _tuning_events(events: list[Any], space: SearchSpace, level: str) -> list[dp.TuningEvent]:
    out = []
    for cid in _guarantees(events, level):
        trial = tuple(e for e in events if e.level == level and e.client_id == cid)
        out.append(dp.TuningEvent(distribution=space.distribution, trial=trial, score_noise_multiplier=space.score_noise_multiplier,
                                  level=level, client_id=cid))  # fmt: skip
    return out


def _curves(events: list[Any], level: str) -> dict[str | None, np.ndarray]:
    return {cid: dp.rdp_curve(events, level=level, client_id=cid) for cid in _guarantees(events, level)}


def _dominated(curves: Mapping[str | None, np.ndarray], reference: Mapping[str | None, np.ndarray]) -> float:
    """The largest ratio of a curve to its reference over every order and guarantee (<= 1: dominated)."""
    worst = 0.0
    for cid, c in curves.items():
        if cid not in reference:
            raise dp.AccountingError(f"a trial spent privacy of {cid or 'the clients'} that the search did not plan")
        with np.errstate(invalid="ignore"):  # inf / inf: an order neither curve bounds, which no accountant uses
            worst = max(worst, float(np.nanmax(c / reference[cid])))
    return worst


def tune(
    config: ExperimentConfig,
    space: SearchSpace,
    *,
    ledger: dp.Ledger | None = None,
    budget: dp.PrivacyBudget | None = None,
    workload: Workload | None = None,
    rng: np.random.Generator | None = None,
) -> TuneOutcome:
    """Run a private search over ``space`` on ``config``'s workload; return the winner and the search's report.

    ``config.privacy.target_epsilon`` is the whole search's epsilon (the noise is calibrated to
    it), or ``privacy.noise_multiplier`` fixes the planned trial's noise. ``budget`` (default:
    ``privacy.budget_epsilon`` or the target, at ``privacy.delta``) is checked against ``ledger``
    (default: a new one) plus the search before the first trial. ``rng`` draws ``K`` and the
    hyperparameters (default: OS randomness; from ``seed`` when ``config.reproducible``).

    Raises:
        ConfigError: a setting a private search cannot account for.
        dp.BudgetExceededError: the search does not fit the budget (nothing ran, nothing recorded).
    """
    _check(config, space)
    p = config.privacy
    level = p.level
    ledger = dp.Ledger() if ledger is None else ledger
    if workload is None:
        workload = build_workload(config, validation=True)
    with tempfile.TemporaryDirectory(prefix="fedcore-tune-") as tmp:
        plan = build_experiment(_trial_config(config, {}, p.noise_multiplier or 1.0, tmp), workload=workload, quiet=True)
        planned = _planned(plan)
    if not planned or any(e.level != level for e in planned):
        raise ConfigError(
            f"the planned trial must record {level}-level privacy events only, got {sorted({e.level for e in planned})}"
        )
    accountant = p.accountant

    def search_epsilon(z: float) -> float:
        events = _tuning_events(_with_noise(planned, z), space, level)
        return dp.PrivacyBudget(epsilon=1.0, delta=p.delta, accountant=accountant, level=level).spent(events)

    if p.target_epsilon is not None:
        z_ref = dp.smallest_noise_multiplier(search_epsilon, target_epsilon=float(p.target_epsilon), what="the private search")
    else:
        z_ref = float(p.noise_multiplier)  # type: ignore[arg-type]
    reference_events = _with_noise(planned, z_ref)
    tuning_events = _tuning_events(reference_events, space, level)
    limit = p.budget_epsilon or p.target_epsilon
    if budget is None:
        if limit is None:
            raise ConfigError("a private search needs privacy.budget_epsilon or privacy.target_epsilon (its total), or budget=")
        budget = dp.PrivacyBudget(epsilon=float(limit), delta=p.delta, accountant=accountant, level=level)
    search_total = budget.spent(tuning_events)
    budget.check(
        ledger, tuning_events,
        what=f"the private search (K ~ {space.distribution.describe()}; epsilon {search_total:.6g} on its own)",
    )  # fmt: skip
    ledger.extend(tuning_events)  # charged before the first trial, whatever K turns out to be
    reference = _curves(reference_events, level)

    if rng is None:
        rng = np.random.default_rng([config.seed, 19]) if config.reproducible else np.random.default_rng(secrets.randbits(128))
    k = space.distribution.sample(rng)
    searcher_seed = int(rng.integers(0, 2**31 - 1))
    trials: list[TrialRecord] = []
    best: tuple[TrialRecord, Experiment] | None = None

    with tempfile.TemporaryDirectory(prefix="fedcore-tune-") as tmp:

        def noise_for(params: Mapping[str, Any]) -> float:
            shaped = build_experiment(_trial_config(config, params, z_ref, tmp), workload=workload, quiet=True)
            events = _planned(shaped)
            if _dominated(_curves(events, level), reference) <= 1.0:
                return z_ref
            return dp.smallest_noise_multiplier(
                lambda z: _dominated(_curves(_with_noise(events, z), level), reference), target_epsilon=1.0, guess=z_ref,
                what="a trial whose settings change the privacy curve",
            )  # fmt: skip

        def evaluate(params: dict[str, Any]) -> dict[str, float]:
            nonlocal best
            z = noise_for(params)
            cfg = _trial_config(config, params, z, str(Path(tmp) / f"trial-{len(trials)}"))
            experiment = build_experiment(cfg, workload=workload, quiet=True)
            fed = experiment.federation
            fed.run(cfg.rounds)
            spent = _dominated(_curves(list(fed.ledger.events), level), reference)
            if spent > 1.0 + 1e-9:
                raise dp.AccountingError(f"trial {len(trials)} spent {spent:.6g} x the planned RDP at some order")
            per = "sum" if level == "sample" else "mean"
            score = fed.noised_score(metric=space.metric, noise_multiplier=space.score_noise_multiplier, per=per)
            record = TrialRecord(len(trials), dict(params), z, score, fed.evaluate("test"))
            trials.append(record)
            if best is None or score > best[0].score:
                best = (record, experiment)
            return {"score": score}

        if k > 0:
            flaml_tune = _flaml_tune()
            from flaml.tune.searcher.blendsearch import RandomSearch

            flaml_space = space.flaml_space()
            searcher = RandomSearch(metric="score", mode="max", space=flaml_space, seed=searcher_seed)
            flaml_tune.run(evaluate, config=flaml_space, metric="score", mode="max", search_alg=searcher, num_samples=k,
                           use_ray=False, verbose=0)  # fmt: skip
        if len(trials) != k:
            raise dp.AccountingError(f"the search drew K={k} trials but ran {len(trials)}; its bound needs exactly K")
    epsilon = budget.spent(ledger)
    tuning = {
        "space": space.describe(),
        "trials_run": k,
        "score": {
            "metric": space.metric,
            "split": "validation",
            "per_client": "sum" if level == "sample" else "mean",
            "noise_multiplier": space.score_noise_multiplier,
            "computed": "each client scores the DP-trained model on its validation split and adds Gaussian noise "
            "of its own drawing before sending; the server sums",
            "sensitivity": "1: given the DP-trained models, one unit changes its client's sent value by at most 1 "
            "(sample level: the sum of a per-example metric in [0, 1], one held-out item per user; client level: "
            "the client's mean)",
        },
        "planned_noise_multiplier": z_ref,
        "reproducible": config.reproducible,
    }
    if best is None:
        return TuneOutcome(None, None, trials, ledger, epsilon, budget, tuning)
    record, experiment = best
    tuning["winner"] = {**record.params, "noise_multiplier": record.noise_multiplier, "noised_score": record.score}
    winner = _trial_config(config, record.params, record.noise_multiplier, config.output_dir)
    report = experiment.report(ledger=ledger, budget=budget, tuning=tuning)
    return TuneOutcome(winner, record, trials, ledger, epsilon, budget, tuning, report)


def run_tune(config_path: str | Path, space_path: str | Path, *, overrides: Mapping[str, Any] | None = None) -> TuneOutcome:
    """``fedcore tune``: load both files, search, write the winner's config and the report to ``output_dir``."""
    import json

    config = load_config(config_path, overrides=overrides)
    outcome = tune(config, load_search_space(space_path))
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if outcome.report is not None:
        outcome.report.save(out)
    summary = {
        "trials_run": outcome.tuning["trials_run"],
        "epsilon": outcome.epsilon,
        "winner": outcome.tuning.get("winner"),
        "winner_test_metrics": outcome.winner.test_metrics if outcome.winner else None,
        "winner_config": outcome.config.to_dict() if outcome.config else None,
        "trials_for_the_operator_only": [dataclasses.asdict(t) for t in outcome.trials],  # not covered if released
    }
    (out / "tune_summary.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    return outcome
