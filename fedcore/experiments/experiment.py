"""Build and run an experiment from an :class:`~fedcore.experiments.config.ExperimentConfig`.

This is where the three packages meet: the workload (``fedcore.workloads.recsys``), the protection mode
(``secagg``) and the privacy mechanisms, ledger, budget and report (``dp``).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

import dp
import secagg
from dp.audit import AuditResult, audit_dp_sgd

from ..errors import ConfigError
from ..rounds._threads import use_library_threads
from ..rounds.observability import JsonlLogger, MetricsLogger, MultiLogger, TensorBoardLogger, WandbLogger
from ..rounds.parties import Channel
from ..rounds.sampling import AllClients, ClientSampler, FixedCountSampler, PoissonSampler
from ..rounds.server import DropoutSimulator, Federation
from ..rounds.training import EarlyStopping, TrainConfig
from ..stages.layout import ParameterLayout
from ..stages.pipeline import UpdatePipeline
from ..strategies._strategies import FedAdagrad, FedAdam, FedAvg, FedSGD, FedYogi, ModelSelection, OutputEnsemble
from ..workloads.task import ClientData, Task
from .config import AUDIT_MAX_NOISE_DRAWS, ExperimentConfig, WorkloadSection

_log = logging.getLogger(__name__)

__all__ = [
    "Workload",
    "Experiment",
    "ExperimentOutcome",
    "build_workload",
    "build_experiment",
    "run_experiment",
    "lora_spec",
    "communication",
]


@dataclass(frozen=True)
class Workload:
    """A task with its clients and its centralized twin (all data in one client).

    Attributes:
        description: the partition rule and evaluation protocol, stated for every table.
        baseline: the trivial predictor's test metrics on the same held-out data, the floor any
            model must clear (MovieLens: popularity ranking, ``hr@10``/``ndcg@10``; clothing: the
            majority class, ``accuracy`` and ``auc`` 0.5).
        section: the ``[workload]`` settings it was built from.
        units: the units of sample-level DP its training examples support (see ``privacy.unit``);
            none unless the builder states them.
        base_model: identity of the pretrained model it builds on (package, version, weights
            file, SHA-256), recorded in the run's summary and report; None without one.
    """

    task: Task
    clients: dict[str, ClientData]
    central: ClientData
    description: str
    baseline: dict[str, float]
    section: WorkloadSection
    units: tuple[str, ...] = ()
    base_model: dict[str, str] | None = None


def build_workload(config: ExperimentConfig, *, validation: bool | None = None) -> Workload:
    """Load the real data set of ``config.workload`` and partition it into clients.

    ``validation``: hold out a validation split (default: when early stopping or model
    selection needs one; a private search needs one for its selection score).

    Sets the library's thread policy first (see :class:`~fedcore.Federation`): text encoders run here.
    """
    from ..workloads import datasets, recsys

    use_library_threads()
    w = config.workload
    assert w.model is not None and w.partition is not None  # WorkloadSection fills in the case's defaults
    if validation is None:
        validation = config.train.early_stopping_metric is not None or config.strategy.name == "selection"
    if w.case == "movielens":
        fed = recsys.movielens_federation(
            datasets.load_movielens100k(),
            config=recsys.RecommenderConfig(
                model=w.model, dim=w.dim, loss=w.loss, num_train_negatives=w.num_train_negatives, history_length=w.history_length
            ),
            partition=w.partition,
            num_silos=w.num_silos,
            max_users=w.max_users,
            validation=validation,
            negative_seed=0,
            sampling_seed=config.seed,
            unit=config.privacy_unit,
        )
        users = np.sort(np.concatenate(list(fed.client_users.values())))
        hr, ndcg = recsys.hit_rate_ndcg(recsys.popularity_scores(fed.split)[fed.split.candidates(users)], k=10)
        return Workload(
            fed.task,
            fed.clients,
            fed.central,
            f"{fed.partition_rule}. Protocol: {fed.protocol}",
            {"hr@10": hr, "ndcg@10": ndcg},
            w,
            units=fed.units,
        )
    frozen = w.model == "frozen"
    adapter = lora_spec(w, seed=config.seed)
    layers = 0 if frozen or adapter is not None else (1 if w.trainable_layers is None else w.trainable_layers)
    clothing = recsys.clothing_federation(
        datasets.load_clothing_reviews(),
        config=recsys.ClothingConfig(trainable_layers=layers, max_length=w.max_length, cached_features=frozen, adapter=adapter),
        num_silos=w.num_silos,
        max_reviews=w.max_reviews,
        validation_fraction=0.1 if validation else 0.0,
    )
    test: Any = clothing.central.test  # a clothing review dataset (tokenized or cached features): it has labels
    positive = float(np.mean(test.labels, dtype=np.float64))
    baseline = {"accuracy": max(positive, 1.0 - positive), "auc": 0.5}
    return Workload(
        clothing.task, clothing.clients, clothing.central, clothing.partition_rule, baseline, w, units=("record",),
        base_model=recsys.minilm_identity(),
    )  # fmt: skip


def lora_spec(w: WorkloadSection, *, seed: int) -> Any:
    """The :class:`fedcore.workloads.recsys.LoraSpec` of ``[workload]`` (``A`` drawn from the run's seed), or None."""
    from ..workloads import recsys

    if w.adapter == "none":
        return None
    given: dict[str, Any] = {"rank": w.lora_rank, "alpha": w.lora_alpha, "layers": w.lora_layers, "targets": w.lora_targets}
    return recsys.LoraSpec(**{k: v for k, v in given.items() if v is not None}, ffa=w.adapter == "ffa-lora", seed=seed)


def _train_config(config: ExperimentConfig, task: Task) -> TrainConfig:
    t = config.train
    stopping = None
    if t.early_stopping_metric is not None:
        stopping = EarlyStopping(
            metric=t.early_stopping_metric,
            min_delta=t.early_stopping_min_delta,
            patience=t.early_stopping_patience,
            higher_is_better=task.higher_is_better if t.early_stopping_metric == task.primary_metric else True,
        )
    user_clip = config.privacy.clip if _users_across_silos(config) else None
    return TrainConfig(
        optimizer=t.optimizer, lr=t.lr, epochs=t.epochs, max_steps=t.max_steps, batch_size=t.batch_size,
        weight_decay=t.weight_decay, momentum=t.momentum, device=t.device, early_stopping=stopping, user_clip=user_clip,
    )  # fmt: skip


def _users_across_silos(config: ExperimentConfig) -> bool:
    """Whether the run is user-level DP across silos (``privacy.level = "client"``, ``unit = "user"``)."""
    return config.privacy.level == "client" and config.privacy_unit == "user"


def _check_user_level_config(config: ExperimentConfig, workload: Workload) -> None:
    """The config half of the checks (the federation checks the rest: strategy, sampling, users in one silo).

    Raises:
        ConfigError: naming the setting that breaks user-level DP across silos.
    """
    if "user" not in workload.units:
        raise ConfigError(f"privacy.unit 'user': the workload's examples support {list(workload.units)}")
    if config.aggregation.mode != "plaintext" and config.aggregation.value_bound is None:
        raise ConfigError(
            "privacy.unit 'user' at level 'client': a silo sends the sum of its users' clipped gradients (up to users x "
            f"privacy.clip in norm), clipped to aggregation.value_bound for the {config.aggregation.mode} encoder; set "
            "aggregation.value_bound"
        )


def _sampler(config: ExperimentConfig) -> ClientSampler:
    s = config.sampling
    if s.kind == "poisson":
        return PoissonSampler(q=float(s.q))  # type: ignore[arg-type]
    if s.kind == "fixed":
        return FixedCountSampler(count=int(s.count))  # type: ignore[arg-type]
    return AllClients()


def _strategy(config: ExperimentConfig, task: Task) -> Any:
    s = config.strategy
    adaptive = {"fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}
    if s.name in adaptive:
        return adaptive[s.name](lr=s.lr, beta1=s.beta1, beta2=s.beta2, tau=s.tau)
    if s.name == "fedsgd":
        return FedSGD(lr=s.lr)
    if s.name == "selection":
        metric = s.metric or task.primary_metric
        return ModelSelection(metric=metric, higher_is_better=task.higher_is_better if metric == task.primary_metric else True)
    if s.name == "ensemble":
        return OutputEnsemble()
    return FedAvg(server_lr=s.lr)


def _max_clients(config: ExperimentConfig, num_clients: int) -> int:
    return int(config.sampling.count) if config.sampling.kind == "fixed" else num_clients  # type: ignore[arg-type]


def _encoder_scale(noise: Any, *, value_bound: float, max_clients: int, bits: int) -> float:
    """The masking encoder's scale with ``noise``: it makes room for the noise, so the scale depends on it."""
    return secagg.encoding.FixedPointEncoder(
        value_bound=value_bound, max_clients=max_clients, bits=bits, integer_noise=noise
    ).scale


def _sample_noise_multiplier(config: ExperimentConfig, clients: dict[str, ClientData], train: TrainConfig) -> float:
    """The DP-SGD noise that keeps every client's epsilon within the target over all rounds."""
    p = config.privacy
    if p.noise_multiplier is not None:
        return float(p.noise_multiplier)
    runs = {}
    for cid, data in clients.items():
        steps, rate = train.dp_schedule(data.num_train)
        runs[cid] = (config.rounds * steps, rate)
    return dp.calibrate_for_runs(
        target_epsilon=_target_epsilon(config),
        delta=p.delta,
        runs=runs,
        accountant=p.accountant,
    )[0]


def _target_epsilon(config: ExperimentConfig) -> float:
    """``privacy.target_epsilon``, which PrivacySection requires whenever noise_multiplier is not given."""
    eps = config.privacy.target_epsilon
    assert eps is not None, "privacy.target_epsilon is calibrated to only when privacy.noise_multiplier is not set"
    return float(eps)


@dataclass
class Experiment:
    """A built experiment: its workload, federation, and privacy bookkeeping."""

    config: ExperimentConfig
    workload: Workload
    federation: Federation
    budget: dp.PrivacyBudget | None
    noise_multiplier: float | None = None
    loggers: list[MetricsLogger] = field(default_factory=list)

    @property
    def ledger(self) -> dp.Ledger:
        """The federation's privacy ledger (every mechanism use of the run)."""
        return self.federation.ledger

    def report(
        self,
        *,
        audit: Any = None,
        ledger: dp.Ledger | None = None,
        budget: dp.PrivacyBudget | None = None,
        tuning: dict[str, Any] | None = None,
    ) -> dp.PrivacyReport:
        """The privacy budget report of the run so far, read from the ledger (see ``Federation.report``).

        A private search reports its selected run with the search's ``ledger``, ``budget`` and
        ``tuning`` description instead of the run's own (``fedcore.tune``).
        """
        unit = self.config.privacy_unit if self.config.privacy.level == "sample" else None
        return self.federation.report(
            ledger=ledger,
            budget=budget,
            tuning=tuning,
            delta=self.config.privacy.delta,
            accountant=self.config.privacy.accountant,
            unit_of_privacy={"record": "one record of a client"}.get(unit or ""),
            description=self.workload.description,
            audit=audit,
            provenance=self.provenance(),
            title=f"Privacy budget report: {self.config.name}" + (" (private hyperparameter search)" if tuning else ""),
        )

    def provenance(self) -> dict[str, Any]:
        """The pretrained base (if any) and the parameters trained and shared (the update's coordinates)."""
        base = self.workload.base_model or {}
        out: dict[str, Any] = {f"base_model_{k}": v for k, v in base.items()}
        out["shared_parameters"] = ", ".join(self.federation.layout.names)
        return out


def build_experiment(
    config: ExperimentConfig,
    *,
    workload: Workload | None = None,
    quiet: bool | None = None,
    channel: Channel | None = None,
    directory: Mapping[str, bytes] | None = None,
) -> Experiment:
    """Assemble workload, protection, privacy and federation; every mismatch is refused here.

    With ``channel`` (and ``directory``, the clients' identity public keys) the client parties
    are remote (:mod:`fedcore.deploy`): the federation is the server party alone.

    Raises:
        ConfigError: settings that cannot work together, with what to change.
    """
    if workload is None:
        workload = build_workload(config)
    elif workload.section != config.workload:
        differ = [
            f"workload.{f.name}={getattr(workload.section, f.name)!r} (the config says {getattr(config.workload, f.name)!r})"
            for f in fields(WorkloadSection)
            if getattr(workload.section, f.name) != getattr(config.workload, f.name)
        ]
        raise ConfigError(f"the workload passed in was built with {', '.join(differ)}; build it from this config")
    task, clients = workload.task, workload.clients
    p, a = config.privacy, config.aggregation
    torch.manual_seed(config.seed)
    dimension = ParameterLayout(task.build_model(), local_only=task.local_only).size
    sampler = _sampler(config)
    max_clients = _max_clients(config, len(clients))
    rate = sampler.rate(len(clients))

    sample_privacy = None
    clip: dp.L2Clip | dp.AdaptiveClip | None = None
    central = None
    integer_noise = None
    budget = None
    noise_multiplier = None
    client_level = p.level == "client"
    if p.level == "sample":
        unit = config.privacy_unit
        if unit not in workload.units:
            raise ConfigError(
                f"privacy.unit {unit!r}: the workload's examples support {list(workload.units)}; build it from this config"
            )
        noise_multiplier = _sample_noise_multiplier(config, clients, _train_config(config, task))
        dp_args: dict[str, Any] = dict(
            noise_multiplier=noise_multiplier, max_grad_norm=p.max_grad_norm, clipping=p.clipping, lazy_noise=p.lazy_noise
        )
        sample_privacy = (
            dp.UserLevelDP(**dp_args, user_parameters=getattr(task, "user_parameters", ()))
            if unit == "user" else dp.SampleLevelDP(**dp_args)
        )  # fmt: skip
        limit = p.budget_epsilon or p.target_epsilon
        if limit is not None:
            budget = dp.PrivacyBudget(epsilon=limit, delta=p.delta, accountant=p.accountant, level="sample")
    across = _users_across_silos(config)
    if across:
        _check_user_level_config(config, workload)
    distributed = client_level and p.noise in ("skellam", "discrete_gaussian")
    if client_level:
        noise_multiplier = (
            None
            if p.noise_multiplier is None and distributed  # calibrated below, under the bound it is charged with
            else float(p.noise_multiplier)
            if p.noise_multiplier is not None
            else dp.calibrate_noise_multiplier(
                target_epsilon=_target_epsilon(config),
                delta=p.delta,
                steps=config.rounds,
                sample_rate=rate,
                accountant=p.accountant,
            )
        )
        limit = p.budget_epsilon or p.target_epsilon
        if limit is not None:
            budget = dp.PrivacyBudget(epsilon=limit, delta=p.delta, accountant=p.accountant, level="client")
    if across:  # each user's gradient is clipped to p.clip by its silo; the clip stage bounds the silo's sum
        clip = dp.L2Clip(a.value_bound) if a.value_bound is not None else None
    elif client_level or a.mode != "plaintext":
        clip = dp.L2Clip(p.clip)
    if p.adaptive_clip:
        count = float(p.count_noise_multiplier)  # type: ignore[arg-type]
        clip = dp.AdaptiveClip(
            initial_bound=p.clip, target_quantile=p.target_quantile, learning_rate=p.clip_learning_rate,
            count_noise_multiplier=count,
        )  # fmt: skip
        if p.noise_multiplier is None:  # the calibrated multiplier is the effective one of update and count
            assert noise_multiplier is not None  # central noise (adaptive clip needs it): calibrated above
            noise_multiplier = dp.AdaptiveClip.update_noise_multiplier(
                effective_noise_multiplier=float(noise_multiplier),
                count_noise_multiplier=count,
            )
    value_bound = a.value_bound if a.value_bound is not None else max(p.clip, 1.0)

    if a.mode == "masked":
        masked_kwargs: dict[str, Any] = dict(
            value_bound=value_bound, max_clients=max_clients, bits=a.bits, graph=a.graph, threshold=a.threshold,
            dropout_rate=a.dropout_tolerance, signed_keys=a.signed_keys,
        )  # fmt: skip
        if distributed:
            expected = max(1, round(rate * len(clients)))
            min_clients = a.threshold or secagg.MaskedSum(**masked_kwargs).plan(expected).threshold
            noise_cls = dp.SkellamNoise if p.noise == "skellam" else dp.DiscreteGaussianNoise
            integer_noise = noise_cls(
                noise_multiplier=1.0 if noise_multiplier is None else noise_multiplier,
                clip_bound=p.clip,
                dim=dimension,
                min_clients=min_clients,
            )
            if p.noise_multiplier is None:  # calibrated under the bound the ledger charges it with, at min_clients survivors
                integer_noise = integer_noise.calibrated(
                    target_epsilon=_target_epsilon(config),
                    delta=p.delta,
                    rounds=config.rounds,
                    scale=functools.partial(_encoder_scale, value_bound=value_bound, max_clients=max_clients, bits=a.bits),
                    sample_rate=rate,
                    sampling="poisson" if sampler.poisson else "fixed_size",
                    accountant=p.accountant,
                )
                noise_multiplier = integer_noise.noise_multiplier
        backend: secagg.SecureSum = secagg.MaskedSum(**masked_kwargs, integer_noise=integer_noise)
    elif a.mode == "ckks":
        backend = secagg.CKKSSum(value_bound=value_bound, max_clients=max_clients, preset=a.preset or "compact")
    elif a.mode == "bfv":
        backend = secagg.BFVSum(value_bound=value_bound, max_clients=max_clients, preset=a.preset or "bfv")
    else:
        backend = secagg.PlaintextSum()
    if client_level and integer_noise is None:
        if p.noise != "central":
            raise ConfigError(
                f"privacy.noise={p.noise!r} is added by clients in the integer domain before masking: "
                f"it needs aggregation.mode='masked', got {a.mode!r}"
            )
        assert noise_multiplier is not None  # client level with central noise: given or calibrated above
        central = dp.CentralGaussian(noise_multiplier=noise_multiplier, clip_bound=p.clip)

    pipeline = UpdatePipeline(
        backend=backend,
        clip=clip,
        weighting="uniform" if client_level else "examples",
        max_examples=None if client_level else max(c.num_train for c in clients.values()),
        central_noise=central,
        user_bound=p.clip if across else None,
    )
    out = Path(config.output_dir)
    quiet = config.logging.quiet if quiet is None else quiet
    loggers: list[MetricsLogger] = []
    if config.logging.jsonl:
        loggers.append(JsonlLogger(out / "metrics.jsonl"))
    if config.logging.tensorboard:
        loggers.append(TensorBoardLogger(out / "tensorboard"))
    if config.logging.wandb:
        loggers.append(WandbLogger(project=config.name, mode="offline", config=config.to_dict(), dir=str(out)))
    executor = None
    if config.executor == "ray" and channel is None:
        from ..rounds.ray_parties import RayParties

        executor = RayParties(task, device=config.train.device)
    federation = Federation(
        task=task,
        clients=clients,
        strategy=_strategy(config, task),
        train=_train_config(config, task),
        pipeline=pipeline,
        sampler=sampler,
        sample_privacy=sample_privacy,
        ledger=dp.Ledger(),
        budget=budget,
        executor=executor,
        dropouts=DropoutSimulator(rate=a.dropout_rate) if a.dropout_rate > 0 else None,
        allow_reveal=config.strategy.allow_reveal,
        logger=MultiLogger(loggers),
        checkpoint_dir=out / "checkpoint",
        evaluate_every=config.evaluate_every,
        seed=config.seed,
        reproducible=config.reproducible,
        quiet=quiet,
        channel=channel,
        directory=directory,
    )
    return Experiment(config, workload, federation, budget, noise_multiplier, loggers)


def communication(experiment: Experiment) -> dict[str, float | int | None]:
    """Upload per client per round, measured, against the full model's float32 bytes.

    ``bytes_up_per_client_per_round`` is what the protection mode's messages weighed, averaged
    over the rounds run; ``full_model_coordinates`` counts every parameter of the model a full
    fine-tune would send (the whole MiniLM and head for the MiniLM workloads), and
    ``upload_fraction`` is the measured upload over that model's float32 size.
    """
    fed = experiment.federation
    task = experiment.workload.task
    full = int(getattr(task, "full_model_parameters", 0) or sum(p.numel() for p in task.build_model().parameters()))
    per_client = [h["bytes_up"] / h["contributors"] for h in fed.history if h.get("bytes_up") and h.get("contributors")]
    measured = float(np.mean(per_client)) if per_client else None
    return {
        "shared_coordinates": fed.layout.size,
        "full_model_coordinates": full,
        "shared_float32_bytes": 4 * fed.layout.size,
        "full_model_float32_bytes": 4 * full,
        "bytes_up_per_client_per_round": measured,
        "upload_fraction": None if measured is None else measured / (4 * full),
    }


@dataclass(frozen=True)
class ExperimentOutcome:
    """Where a finished experiment left its outputs, and its headline figures."""

    output_dir: Path
    paths: dict[str, Path]
    final_metrics: dict[str, float]
    epsilon: float | None
    stop_reason: str | None
    audit: str | None = None

    def summary(self) -> str:
        """What the CLI prints at the end: where the outputs are, final metrics and epsilon spent."""
        lines = [f"finished: outputs in {self.output_dir}"]
        if self.stop_reason:
            lines.append(f"stopped early: {self.stop_reason}")
        metrics = ", ".join(f"{k}={v:.4f}" for k, v in sorted(self.final_metrics.items()))
        lines.append(f"final test metrics: {metrics or 'none'}")
        if self.epsilon is not None:
            lines.append(f"epsilon spent: {self.epsilon:.4f}")
        if self.audit is not None:
            lines.append(f"privacy audit: {self.audit}")
        lines += [f"  {name}: {path}" for name, path in self.paths.items()]
        return "\n".join(lines)


def audit_run(experiment: Experiment) -> AuditResult | None:
    """The one-run canary audit of a DP-SGD run: the history of the client with the largest epsilon,
    replayed through the library's DP-SGD (``dp.audit.audit_dp_sgd``); None when there is no DP-SGD,
    the audit is off (``privacy.audit_canaries = 0``) or it would cost more than ``AUDIT_MAX_NOISE_DRAWS``.
    """
    p = experiment.config.privacy
    if p.level != "sample" or p.audit_canaries == 0:
        return None
    ledger = experiment.ledger
    spent = dp.sample_level_epsilons(ledger, delta=p.delta, accountant=p.accountant)
    if not spent:
        return None
    worst = max(spent, key=lambda cid: spent[cid])
    events = [e for e in ledger.events if isinstance(e, dp.SampleLevelEvent) and e.client_id == worst]
    steps = sum(e.steps for e in events)
    if steps * p.audit_canaries > AUDIT_MAX_NOISE_DRAWS:
        _log.info("no privacy audit: %d steps x %d canaries is above %d noise draws", steps, p.audit_canaries,
                  AUDIT_MAX_NOISE_DRAWS)  # fmt: skip
        return None
    return audit_dp_sgd(
        events, num_canaries=p.audit_canaries, seed=experiment.config.seed, lazy_noise=p.lazy_noise, accountant=p.accountant
    )


def run_experiment(
    config: ExperimentConfig,
    *,
    resume: bool = False,
    channel: Channel | None = None,
    directory: Mapping[str, bytes] | None = None,
) -> ExperimentOutcome:
    """Build, run (or resume) and write every output of an experiment (``channel``: see :func:`build_experiment`)."""
    out = Path(config.output_dir)
    checkpoint = out / "checkpoint"
    if not resume and checkpoint.exists():
        raise ConfigError(
            f"{str(out)!r} already holds a run (checkpoint found); pass --resume to continue it or choose "
            "another output folder with --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    experiment = build_experiment(config, channel=channel, directory=directory)
    fed = experiment.federation
    try:
        if resume:
            fed.restore(checkpoint)
        fed.run(config.rounds)
    finally:
        fed.logger.close() if fed.logger is not None else None
    paths = {"metrics": out / "metrics.jsonl", "checkpoint": checkpoint}
    if config.logging.tensorboard:
        paths["tensorboard"] = out / "tensorboard"
    model_path = out / "model.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.clone() for k, v in fed.layout.to_state_dict(torch.from_numpy(fed.global_vector)).items()}, str(model_path))
    paths["model"] = model_path
    epsilon = None
    audit = audit_run(experiment)
    if config.privacy.level != "none":
        report_paths = experiment.report(audit=audit).save(out)
        paths["privacy_report_json"] = Path(report_paths.json)
        paths["privacy_report_html"] = Path(report_paths.html)
        if experiment.budget is not None:
            epsilon = experiment.budget.spent(fed.ledger)
    final = {k[5:]: float(v) for k, v in (fed.history[-1].items() if fed.history else []) if k.startswith("test_")}
    summary = {
        "name": config.name,
        "config": config.to_dict(),
        "workload": experiment.workload.description,
        "rounds_run": fed.round_index,
        "final_test_metrics": final,
        "epsilon": epsilon,
        "noise_multiplier": experiment.noise_multiplier,
        "stop_reason": fed.stop_reason,
        "base_model": experiment.workload.base_model,
        "shared_parameters": list(fed.layout.names),
        "communication": communication(experiment),
        "audit": None if audit is None else audit.to_dict(),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    paths["summary"] = out / "summary.json"
    return ExperimentOutcome(out, paths, final, epsilon, fed.stop_reason, None if audit is None else audit.summary())
