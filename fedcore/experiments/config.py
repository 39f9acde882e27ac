"""Experiment configuration from TOML or YAML: parsed into frozen sections, checked up front.

Every key is documented in ``fedcore run --help`` and in ``examples/main.toml``. Unknown keys
and impossible values are refused with a :class:`~fedcore.errors.ConfigError` naming the key,
the value and what is allowed, before anything runs.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

import dp

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from ..errors import ConfigError
from ..rounds.training import TrainConfig
from ..workloads.recsys._lora import LORA_TARGETS

__all__ = [
    "ExperimentConfig",
    "WorkloadSection",
    "TrainSection",
    "SamplingSection",
    "StrategySection",
    "AggregationSection",
    "PrivacySection",
    "LoggingSection",
    "load_config",
    "parse_config",
]


def _did_you_mean(unknown: list[str], allowed: set[str]) -> str:
    """``" (did you mean 'lr'?)"`` for the closest allowed key to each unknown one, or nothing."""
    guesses = [g for k in unknown for g in difflib.get_close_matches(k, sorted(allowed), n=1)]
    return f" (did you mean {', '.join(repr(g) for g in guesses)}?)" if guesses else ""


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")


def _positive(key: str, value: Any, *, allow_none: bool = False, integer: bool = False) -> None:
    if value is None and allow_none:
        return
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
        what = "an integer" if integer else "a number"
        raise ConfigError(f"{key} must be {what} > 0, got {value!r}")


@dataclass(frozen=True)
class WorkloadSection:
    """``[workload]``: which case, model and partition.

    case: ``movielens`` or ``clothing``. model: movielens ``mf`` | ``mf_text`` | ``transformer``;
    clothing ``frozen`` (cached MiniLM features + head) | ``finetune`` (top ``trainable_layers``
    layers + head). partition: movielens ``regions`` (silos by ZIP region) or ``users`` (one
    client per user); clothing ``silos`` (by department/class). Model and partition default to
    the first listed for the case. num_silos: silo count. max_users / max_reviews: slice for fast runs.
    trainable_layers: MiniLM layers fine-tuned whole for ``finetune`` (default 1). max_length: tokens per review.
    adapter (clothing ``finetune``): ``none`` | ``lora`` | ``ffa-lora`` (``A`` frozen from the run's
    seed, only ``B`` trained and sent): LoRA adapters instead of whole layers, with lora_rank
    (default 8), lora_alpha (16), lora_layers (MiniLM layers 0..5 adapted, default [5]) and
    lora_targets (projections, default ["query", "value"]; allowed: fedcore.workloads.recsys.LORA_TARGETS).
    MovieLens models: dim (embedding size), loss (``bce`` | ``softmax``: sampled softmax),
    num_train_negatives (items drawn per training positive), history_length (items the
    transformer's user tower reads).
    """

    case: str = "movielens"
    model: str | None = None
    partition: str | None = None
    num_silos: int = 5
    max_users: int | None = None
    max_reviews: int | None = None
    trainable_layers: int | None = None
    max_length: int = 64
    dim: int = 32
    loss: str = "bce"
    num_train_negatives: int = 8
    history_length: int = 20
    adapter: str = "none"
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_layers: tuple[int, ...] | None = None
    lora_targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _choice("workload.case", self.case, ("movielens", "clothing"))
        movielens = self.case == "movielens"
        if self.model is None:
            object.__setattr__(self, "model", "mf" if movielens else "frozen")
        _choice("workload.model", self.model, ("mf", "mf_text", "transformer") if movielens else ("frozen", "finetune"))
        if self.partition is None:  # the case's natural partition
            object.__setattr__(self, "partition", "regions" if movielens else "silos")
        _choice("workload.partition", self.partition, ("regions", "users") if movielens else ("silos",))
        _positive("workload.num_silos", self.num_silos, integer=True)
        _positive("workload.max_users", self.max_users, allow_none=True, integer=True)
        _positive("workload.max_reviews", self.max_reviews, allow_none=True, integer=True)
        _positive("workload.max_length", self.max_length, integer=True)
        _positive("workload.dim", self.dim, integer=True)
        _choice("workload.loss", self.loss, ("bce", "softmax"))
        _positive("workload.num_train_negatives", self.num_train_negatives, integer=True)
        _positive("workload.history_length", self.history_length, integer=True)
        if self.trainable_layers is not None and (
            isinstance(self.trainable_layers, bool)
            or not isinstance(self.trainable_layers, int)
            or not 0 <= self.trainable_layers <= 6
        ):
            raise ConfigError(f"workload.trainable_layers must be an integer in [0, 6], got {self.trainable_layers!r}")
        self._check_adapter()

    def _check_adapter(self) -> None:
        _choice("workload.adapter", self.adapter, ("none", "lora", "ffa-lora"))
        lora_keys = {k: getattr(self, k) for k in ("lora_rank", "lora_alpha", "lora_layers", "lora_targets")}
        if self.adapter == "none":
            given = sorted(k for k, v in lora_keys.items() if v is not None)
            if given:
                raise ConfigError(f"workload.{given[0]} applies to workload.adapter 'lora' or 'ffa-lora', got adapter 'none'")
            return
        if self.case != "clothing" or self.model != "finetune":
            raise ConfigError(
                f"workload.adapter {self.adapter!r} applies to case 'clothing' with model 'finetune', "
                f"got case {self.case!r} and model {self.model!r}"
            )
        if self.trainable_layers is not None:
            raise ConfigError(
                f"workload.trainable_layers={self.trainable_layers!r} trains whole layers; with workload.adapter "
                f"{self.adapter!r} the adapted layers are workload.lora_layers: remove trainable_layers"
            )
        _positive("workload.lora_rank", self.lora_rank, allow_none=True, integer=True)
        _positive("workload.lora_alpha", self.lora_alpha, allow_none=True)
        for key, allowed in (("lora_layers", tuple(range(6))), ("lora_targets", LORA_TARGETS)):
            value = lora_keys[key]
            if value is None:
                continue
            listed = isinstance(value, (list, tuple)) and bool(value) and len(set(value)) == len(value)
            if not listed or any(isinstance(v, bool) or v not in allowed for v in value):
                raise ConfigError(
                    f"workload.{key} must be a non-empty list of distinct values from {list(allowed)}, got {value!r}"
                )
            object.__setattr__(self, key, tuple(value))


@dataclass(frozen=True)
class TrainSection:
    """``[train]``: local training of each client; the defaults are :class:`fedcore.TrainConfig`'s."""

    optimizer: str = TrainConfig.optimizer
    lr: float = TrainConfig.lr
    epochs: int = TrainConfig.epochs
    max_steps: int | None = TrainConfig.max_steps
    batch_size: int = TrainConfig.batch_size
    weight_decay: float = TrainConfig.weight_decay
    momentum: float = TrainConfig.momentum
    device: str = TrainConfig.device
    early_stopping_metric: str | None = None
    early_stopping_min_delta: float = 0.0
    early_stopping_patience: int = 1


@dataclass(frozen=True)
class SamplingSection:
    """``[sampling]``: ``kind`` = ``all`` | ``poisson`` (with ``q``) | ``fixed`` (with ``count``)."""

    kind: str = "all"
    q: float | None = None
    count: int | None = None

    def __post_init__(self) -> None:
        _choice("sampling.kind", self.kind, ("all", "poisson", "fixed"))
        if self.kind == "poisson" and not (isinstance(self.q, (int, float)) and 0 < self.q <= 1):
            raise ConfigError(f"sampling.q must be in (0, 1] for poisson sampling, got {self.q!r}")
        if self.kind == "fixed":
            _positive("sampling.count", self.count, integer=True)


@dataclass(frozen=True)
class StrategySection:
    """``[strategy]``: ``name`` = fedavg | fedsgd | fedadam | fedyogi | fedadagrad | selection | ensemble."""

    name: str = "fedavg"
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    metric: str | None = None
    allow_reveal: bool = False

    def __post_init__(self) -> None:
        _choice("strategy.name", self.name, ("fedavg", "fedsgd", "fedadam", "fedyogi", "fedadagrad", "selection", "ensemble"))
        _positive("strategy.lr", self.lr)


@dataclass(frozen=True)
class AggregationSection:
    """``[aggregation]``: ``mode`` = plaintext | masked | ckks | bfv, with the backend's settings.

    graph: ``complete`` (SecAgg) or ``secagg+``. threshold: survivors needed (default: planned).
    bits: ring size for masking (32 or 64). preset: CKKS / BFV preset (default: the scheme's
    first). value_bound: bound on every coordinate of a client's input, the masking and
    encryption encoders' range (defaults to the larger of the clip bound and 1). signed_keys:
    Ed25519-signed masked rounds (each client party makes its identity key). dropout_tolerance:
    the dropout rate the masking planner sizes the threshold for. dropout_rate: dropouts
    simulated per round (a separate setting: what happens, not what is planned for).
    """

    mode: str = "plaintext"
    graph: str = "complete"
    threshold: int | None = None
    bits: int = 32
    preset: str | None = None
    value_bound: float | None = None
    signed_keys: bool = False
    dropout_tolerance: float = 0.25
    dropout_rate: float = 0.0

    def __post_init__(self) -> None:
        _choice("aggregation.mode", self.mode, ("plaintext", "masked", "ckks", "bfv"))
        if not isinstance(self.signed_keys, bool):
            raise ConfigError(f"aggregation.signed_keys must be true or false, got {self.signed_keys!r}")
        if not (isinstance(self.dropout_tolerance, (int, float)) and 0 <= self.dropout_tolerance < 1):
            raise ConfigError(f"aggregation.dropout_tolerance must be in [0, 1), got {self.dropout_tolerance!r}")
        _choice("aggregation.graph", self.graph, ("complete", "secagg+"))
        if self.bits not in (32, 64):
            raise ConfigError(f"aggregation.bits must be 32 or 64, got {self.bits!r}")
        _positive("aggregation.threshold", self.threshold, allow_none=True, integer=True)
        _positive("aggregation.value_bound", self.value_bound, allow_none=True)
        if not (isinstance(self.dropout_rate, (int, float)) and 0 <= self.dropout_rate < 1):
            raise ConfigError(f"aggregation.dropout_rate must be in [0, 1), got {self.dropout_rate!r}")


#: The most noise draws (DP-SGD steps times canaries) an after-run audit may cost: about 20 s here.
AUDIT_MAX_NOISE_DRAWS = 200_000_000


@dataclass(frozen=True)
class PrivacySection:
    """``[privacy]``: ``level`` = none | sample | client.

    sample: DP-SGD on every client (noise_multiplier, max_grad_norm, clipping mode; lazy_noise:
    embedding rows get their noise when next read, for plain SGD with clipping 'embedding').
    client: DP-FedAvg (clip, noise_multiplier, noise = central | skellam | discrete_gaussian).
    target_epsilon: calibrate noise_multiplier to it instead. budget_epsilon: stop before it.
    adaptive_clip (client level, central noise): the clip bound starts at ``clip`` and tracks the
    ``target_quantile`` of the update norms (Andrew et al. 2021), moved by ``clip_learning_rate``
    from a count noised with ``count_noise_multiplier`` (required); a calibrated noise multiplier
    is the effective one, split between the update and the count.
    unit (sample level): ``record`` (one example) or ``user`` (all of a user's examples, clipped
    together); default ``user`` for movielens, ``record`` for clothing (no user ids). At level
    client, ``user`` is user-level DP across silos: with strategy fedsgd and every silo in every
    round, each silo sends the sum of its users' gradients, each clipped to ``clip``, and the
    noise is added once to the sum over all silos (all users share one noise draw); the silo's sum
    is clipped to ``aggregation.value_bound``, which a protected mode then needs set.
    audit_canaries (sample level): after the run, the DP-SGD history of the client with the largest
    epsilon is replayed through the library's DP-SGD with this many canaries and audited
    (``dp.audit.audit_dp_sgd``), when that costs at most ``AUDIT_MAX_NOISE_DRAWS`` (steps times
    canaries); 0 turns the audit off.
    """

    level: str = "none"
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    clipping: str = "auto"
    clip: float = 1.0
    noise: str = "central"
    accountant: str = "pld"
    budget_epsilon: float | None = None
    lazy_noise: bool = False
    adaptive_clip: bool = False
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    count_noise_multiplier: float | None = None
    unit: str | None = None
    audit_canaries: int = 100_000

    def __post_init__(self) -> None:
        _choice("privacy.level", self.level, ("none", "sample", "client"))
        if self.unit is not None:
            _choice("privacy.unit", self.unit, ("record", "user"))
            if self.level == "none" or (self.level == "client" and self.unit != "user"):
                raise ConfigError(
                    f"privacy.unit {self.unit!r} at level {self.level!r}: a unit applies to level 'sample' (record or "
                    "user) or to level 'client' ('user': user-level DP across silos)"
                )
        if not isinstance(self.lazy_noise, bool):
            raise ConfigError(f"privacy.lazy_noise must be true or false, got {self.lazy_noise!r}")
        if (
            isinstance(self.audit_canaries, bool) or not isinstance(self.audit_canaries, int)
            or not (self.audit_canaries == 0 or self.audit_canaries >= 100)
        ):  # fmt: skip
            raise ConfigError(f"privacy.audit_canaries must be 0 (no audit) or an int >= 100, got {self.audit_canaries!r}")
        if self.lazy_noise and self.level != "sample":
            raise ConfigError(f"privacy.lazy_noise applies to level 'sample' (DP-SGD), got level {self.level!r}")
        if not isinstance(self.adaptive_clip, bool):
            raise ConfigError(f"privacy.adaptive_clip must be true or false, got {self.adaptive_clip!r}")
        if self.adaptive_clip:
            if self.level != "client" or self.noise != "central":
                raise ConfigError(
                    "privacy.adaptive_clip applies to level 'client' with noise 'central', "
                    f"got level {self.level!r} and noise {self.noise!r}"
                )
            _positive("privacy.count_noise_multiplier", self.count_noise_multiplier)
            _positive("privacy.clip_learning_rate", self.clip_learning_rate)
            if not (isinstance(self.target_quantile, (int, float)) and 0 < self.target_quantile < 1):
                raise ConfigError(f"privacy.target_quantile must be in (0, 1), got {self.target_quantile!r}")
        _choice("privacy.noise", self.noise, ("central", "skellam", "discrete_gaussian"))
        _choice("privacy.accountant", self.accountant, dp.ACCOUNTANTS)
        if not (isinstance(self.delta, float) and 0 < self.delta < 1):
            raise ConfigError(f"privacy.delta must be a float in (0, 1), got {self.delta!r}")
        _positive("privacy.max_grad_norm", self.max_grad_norm)
        _positive("privacy.clip", self.clip)
        _positive("privacy.target_epsilon", self.target_epsilon, allow_none=True)
        _positive("privacy.budget_epsilon", self.budget_epsilon, allow_none=True)
        if self.noise_multiplier is not None and (isinstance(self.noise_multiplier, bool) or not self.noise_multiplier >= 0):
            raise ConfigError(f"privacy.noise_multiplier must be >= 0, got {self.noise_multiplier!r}")
        if self.level != "none" and (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ConfigError(
                f"privacy level {self.level!r} needs exactly one of privacy.noise_multiplier and "
                f"privacy.target_epsilon, got {self.noise_multiplier!r} and {self.target_epsilon!r}"
            )


@dataclass(frozen=True)
class LoggingSection:
    """``[logging]``: jsonl and tensorboard on by default; wandb (offline) when installed."""

    jsonl: bool = True
    tensorboard: bool = True
    wandb: bool = False
    quiet: bool = False


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole experiment. Top-level keys: name, seed, reproducible, rounds, output_dir, evaluate_every, executor.

    ``seed`` fixes the data split, the initial model and simulated dropouts. ``reproducible``
    (default false) makes it fix every other draw too (clients' training, DP-SGD and distributed
    noise, stochastic rounding, sampling): a simulation setting, and the report says that the
    noise is then derivable from the seed.
    """

    name: str = "experiment"
    seed: int = 0
    reproducible: bool = False
    rounds: int = 5
    output_dir: str = "outputs/experiment"
    evaluate_every: int = 1
    executor: str = "in-process"
    workload: WorkloadSection = field(default_factory=WorkloadSection)
    train: TrainSection = field(default_factory=TrainSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    strategy: StrategySection = field(default_factory=StrategySection)
    aggregation: AggregationSection = field(default_factory=AggregationSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def __post_init__(self) -> None:
        _positive("rounds", self.rounds, integer=True)
        _choice("executor", self.executor, ("in-process", "ray"))
        if isinstance(self.evaluate_every, bool) or not isinstance(self.evaluate_every, int) or self.evaluate_every < 0:
            raise ConfigError(f"evaluate_every must be an integer >= 0 (0 = never), got {self.evaluate_every!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not isinstance(self.reproducible, bool):
            raise ConfigError(f"reproducible must be true or false, got {self.reproducible!r}")
        if self.privacy.unit == "user" and self.workload.case != "movielens":
            raise ConfigError(
                f"privacy.unit 'user' needs user ids, which workload.case {self.workload.case!r} lacks; use 'record'"
            )

    @property
    def privacy_unit(self) -> str | None:
        """The unit of privacy below a whole client: ``privacy.unit`` or, at sample level, the case's default.

        None at level none, and at level client for a whole client's update.
        """
        if self.privacy.level != "sample":
            return self.privacy.unit if self.privacy.level == "client" else None
        return self.privacy.unit or ("user" if self.workload.case == "movielens" else "record")

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (sections as dicts), as written to ``summary.json``."""
        return dataclasses.asdict(self)


_SECTIONS = {
    "workload": WorkloadSection,
    "train": TrainSection,
    "sampling": SamplingSection,
    "strategy": StrategySection,
    "aggregation": AggregationSection,
    "privacy": PrivacySection,
    "logging": LoggingSection,
}


def parse_config(raw: Mapping[str, Any], *, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Build an :class:`ExperimentConfig` from a mapping, with ``"section.key": value`` overrides.

    Raises:
        ConfigError: an unknown section or key, or a value that is not allowed.
    """
    data: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in raw.items()}
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.rpartition(".")
        target = data.setdefault(section, {}) if section else data
        target[key] = value
    top_fields = {f.name for f in dataclasses.fields(ExperimentConfig)} - set(_SECTIONS)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in _SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"[{key}] must be a table of settings, got {value!r}")
            allowed = {f.name for f in dataclasses.fields(_SECTIONS[key])}
            unknown = sorted(set(value) - allowed)
            if unknown:
                raise ConfigError(
                    f"unknown key(s) {unknown} in [{key}]{_did_you_mean(unknown, allowed)}; allowed: {sorted(allowed)}"
                )
            kwargs[key] = _SECTIONS[key](**value)
        elif key in top_fields:
            kwargs[key] = value
        else:
            known = top_fields | set(_SECTIONS)
            raise ConfigError(f"unknown top-level key {key!r}{_did_you_mean([key], known)}; allowed: {sorted(known)}")
    return ExperimentConfig(**kwargs)


def load_config(path: str | Path, *, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) experiment file.

    Raises:
        ConfigError: the file is missing, of another type, malformed, or holds bad settings.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            raw = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            raw = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"config file must end in .toml, .yaml or .yml, got {path.name!r}")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {str(path)!r} is malformed: {exc}") from exc
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config file {str(path)!r} must hold a table of settings, got {type(raw).__name__}")
    return parse_config(raw, overrides=overrides)
