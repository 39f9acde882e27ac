"""Privacy events: one immutable record per use of a DP mechanism.

Accountants and reports read these and nothing else (the ledger is the source of truth,
never a config). Each event states what an accountant needs: the mechanism, its noise
relative to the sensitivity, how the contributors were sampled and how often it ran, plus
who took part. Modelled on ``dp_accounting/dp_event.py`` (google/differential-privacy).

Levels: ``"client"`` events protect a whole client's contribution to a round (DP-FedAvg), or,
with ``unit="user"``, one user's contribution to the sum over all clients (user-level DP across
silos: each silo clips each of its users' gradients and sends their sum); ``"sample"`` events
protect one record (or one user) of one client's data set (DP-SGD on that client).
Adjacency is add/remove-one (of a client, a user, or a record) throughout, as in Opacus.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Union

from . import _checks as chk
from ._errors import DPTypeError, DPValueError
from ._tuning import TrialDistribution

__all__ = [
    "SAMPLINGS",
    "GaussianEvent",
    "QuantileEvent",
    "SampleLevelEvent",
    "SkellamEvent",
    "DiscreteGaussianEvent",
    "TuningEvent",
    "Event",
    "EVENT_TYPES",
    "event_to_dict",
    "event_from_dict",
]

#: How the contributors of one mechanism run were chosen.
#: ``poisson``: each independently with probability ``sample_rate`` (what the accountants assume);
#: ``fixed_size``: a fixed-size uniform subset, accounted *as if* Poisson with the same rate
#: (the usual approximation; stated in every report); ``full``: everyone, ``sample_rate == 1``.
SAMPLINGS = ("poisson", "fixed_size", "full")


def _f(ev: Any, name: str, check: Any, *args: Any, **kwargs: Any) -> None:
    """Check ``ev.name`` and store the normalised value (floats as float, ints as int)."""
    object.__setattr__(ev, name, check(name, getattr(ev, name), *args, **kwargs))


def _common(ev: Any) -> None:
    _f(ev, "round_index", chk.integer, minimum=0)
    _f(ev, "sample_rate", chk.probability)
    _f(ev, "sampling", chk.one_of, SAMPLINGS)
    if ev.sampling == "full" and ev.sample_rate != 1.0:
        raise DPValueError(f"sample_rate must be 1.0 when sampling='full', got {ev.sample_rate!r}")
    if ev.client_id is not None and not isinstance(ev.client_id, str):
        raise DPTypeError(f"client_id must be a str or None, got {ev.client_id!r}")


#: What one client-level event protects: a client's whole update, or one user of a silo.
CLIENT_LEVEL_UNITS = ("client", "user")


def _participants(ev: Any) -> None:
    _f(ev, "participants", chk.integer, minimum=0)
    _f(ev, "survivors", chk.integer, minimum=0)
    if ev.survivors > ev.participants:
        raise DPValueError(f"survivors must be <= participants={ev.participants}, got {ev.survivors!r}")


@dataclass(frozen=True, kw_only=True)
class GaussianEvent:
    """Gaussian noise added centrally to a clipped sum (DP-FedAvg, McMahan et al. ICLR 2018).

    Attributes:
        round_index: the round the noise was added in.
        noise_multiplier: noise standard deviation divided by the L2 sensitivity ``clip_bound``.
        clip_bound: L2 sensitivity of the sum, in the update's float units.
        sample_rate: probability with which each client was sampled into the round.
        participants: clients sampled into the round.
        survivors: clients whose update is in the noised sum.
        count: how many times the mechanism ran (1 per round).
        sampling: see ``SAMPLINGS``.
        level: ``"client"``.
        client_id: ``None`` (a client-level event concerns every client).
        unit: ``"client"`` (``clip_bound`` bounds each client's update) or ``"user"`` (it bounds
            each user's gradient inside a silo's sum; ``participants`` and ``survivors`` count silos).
    """

    mechanism: ClassVar[str] = "gaussian"
    round_index: int
    noise_multiplier: float
    clip_bound: float
    sample_rate: float = 1.0
    participants: int
    survivors: int
    count: int = 1
    sampling: str = "poisson"
    level: str = "client"
    client_id: str | None = None
    unit: str = "client"

    def __post_init__(self) -> None:
        _common(self)
        _participants(self)
        _f(self, "noise_multiplier", chk.positive)
        _f(self, "clip_bound", chk.positive)
        _f(self, "count", chk.integer, minimum=1)
        _f(self, "level", chk.one_of, ("client",))
        _f(self, "unit", chk.one_of, CLIENT_LEVEL_UNITS)


@dataclass(frozen=True, kw_only=True)
class QuantileEvent:
    """The noisy count of adaptive clipping (Andrew et al. NeurIPS 2021, Alg. 1).

    The server noises the sum of the bits ``b_i = 1[norm <= bound]`` with standard deviation
    ``noise_multiplier / 2``; the estimate uses the centred sum ``sum(b_i - 1/2)``, whose
    sensitivity to adding or removing one client is 1/2. The count is computed on the same
    clients as the round's update noise, so accountants join it with that round's client-level
    update-noise event into one mechanism (the effective noise multiplier of Sec. 3.1).

    Attributes:
        noise_multiplier: noise standard deviation divided by the count's sensitivity (1/2).
        target_quantile, learning_rate: the quantile tracked and the geometric step size.
        bound_before, bound_after: the clip bound before and after this update.
    """

    mechanism: ClassVar[str] = "quantile"
    round_index: int
    noise_multiplier: float
    sample_rate: float = 1.0
    participants: int
    survivors: int
    target_quantile: float
    learning_rate: float
    bound_before: float
    bound_after: float
    count: int = 1
    sampling: str = "poisson"
    level: str = "client"
    client_id: str | None = None

    def __post_init__(self) -> None:
        _common(self)
        _participants(self)
        _f(self, "noise_multiplier", chk.positive)
        _f(self, "target_quantile", chk.open_unit)
        _f(self, "learning_rate", chk.positive)
        _f(self, "bound_before", chk.positive)
        _f(self, "bound_after", chk.positive)
        _f(self, "count", chk.integer, minimum=1)
        _f(self, "level", chk.one_of, ("client",))


@dataclass(frozen=True, kw_only=True)
class SampleLevelEvent:
    """One client's DP-SGD run in one round (Abadi et al. CCS 2016, via Opacus).

    Attributes:
        client_id: whose records are protected.
        round_index: the federated round this local training belongs to.
        noise_multiplier: per-step noise standard deviation over ``max_grad_norm``.
        max_grad_norm: per-sample gradient clip bound.
        sample_rate: per-step record sampling probability (Poisson).
        steps: optimizer steps taken (empty Poisson batches included).
        clipping: the per-sample clipping mode used ("default", "ghost", "embedding").
        sampling: ``"poisson"`` or ``"fixed_size"`` (shuffled batches, accounted as Poisson).
        level: ``"sample"``.
        unit: what one "sample" is: ``"record"`` (one example) or ``"user"`` (all of one user's
            examples, clipped together: ``dp.UserLevelDP``; ``sample_rate`` is then per user).
    """

    mechanism: ClassVar[str] = "dp_sgd"
    client_id: str
    round_index: int
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    clipping: str = "default"
    sampling: str = "poisson"
    level: str = "sample"
    unit: str = "record"

    def __post_init__(self) -> None:
        if not isinstance(self.client_id, str) or not self.client_id:
            raise DPTypeError(f"client_id must be a non-empty str, got {self.client_id!r}")
        _common(self)
        _f(self, "noise_multiplier", chk.positive)
        _f(self, "max_grad_norm", chk.positive)
        _f(self, "steps", chk.integer, minimum=0)
        _f(self, "clipping", chk.one_of, ("default", "ghost", "embedding"))
        _f(self, "level", chk.one_of, ("sample",))
        _f(self, "unit", chk.one_of, ("record", "user"))


@dataclass(frozen=True, kw_only=True)
class _DistributedNoiseEvent:
    """What the Skellam and discrete Gaussian events share: a masked sum noised by its clients.

    Attributes:
        scale: the encoder's scale (one integer unit is ``1/scale``).
        clip_bound: L2 sensitivity in float units before scaling and rounding.
        dim: number of coordinates noised.
        l2_sensitivity, l1_sensitivity: integer-domain sensitivities used for accounting.
        min_clients: survivors the noise was sized for.
        target_noise_multiplier: the noise multiplier requested for ``min_clients`` survivors.
        noise_multiplier: the one actually present, ``sqrt(variance) / l2_sensitivity``.
        unit: as in ``GaussianEvent``; with ``"user"`` the sensitivities bound one user's
            gradient in its silo's rounded vector (the bound of ``_noise.rounded_l2_sensitivity`` holds
            for the difference of two stochastically rounded vectors too, coupled coordinate by coordinate).
    """

    round_index: int
    scale: float
    clip_bound: float
    dim: int
    l2_sensitivity: float
    l1_sensitivity: float
    min_clients: int
    target_noise_multiplier: float
    sample_rate: float = 1.0
    participants: int
    survivors: int
    count: int = 1
    sampling: str = "poisson"
    level: str = "client"
    client_id: str | None = None
    unit: str = "client"

    def __post_init__(self) -> None:
        _common(self)
        _participants(self)
        _f(self, "unit", chk.one_of, CLIENT_LEVEL_UNITS)
        _f(self, "scale", chk.positive)
        _f(self, "clip_bound", chk.positive)
        _f(self, "dim", chk.integer, minimum=1)
        _f(self, "l2_sensitivity", chk.positive)
        _f(self, "l1_sensitivity", chk.positive)
        _f(self, "min_clients", chk.integer, minimum=1)
        _f(self, "target_noise_multiplier", chk.positive)
        _f(self, "count", chk.integer, minimum=1)
        _f(self, "level", chk.one_of, ("client",))
        if self.survivors < 1:
            raise DPValueError(f"survivors must be >= 1 for distributed noise, got {self.survivors!r}")

    @property
    def variance(self) -> float:
        """Variance of the summed noise, in integer units squared."""
        raise NotImplementedError

    @property
    def noise_multiplier(self) -> float:
        """The noise actually present over the integer-domain L2 sensitivity."""
        return math.sqrt(self.variance) / self.l2_sensitivity


@dataclass(frozen=True, kw_only=True)
class SkellamEvent(_DistributedNoiseEvent):
    """Distributed Skellam noise in a masked sum (Agarwal, Kairouz, Liu NeurIPS 2021).

    Every surviving client added ``Sk(per_client_variance)`` in integer units; Skellam is
    closed under sums, so the sum carries exactly ``Sk(variance)`` with
    ``variance = survivors * per_client_variance`` (the noise actually present, which the
    accountant uses). Sensitivities are in integer units after scaling by ``scale`` and
    rounding (inflation bound of Kairouz, Liu, Steinke ICML 2021, Thm. 1 / Prop. 22).

    Attributes:
        per_client_variance: Skellam variance each client added.
        variance: variance of the summed noise (``survivors * per_client_variance``).
        Other attributes as in the shared base: scale, clip_bound, dim, sensitivities,
        min_clients, target_noise_multiplier, noise_multiplier.
    """

    mechanism: ClassVar[str] = "skellam"
    per_client_variance: float

    def __post_init__(self) -> None:
        super().__post_init__()
        _f(self, "per_client_variance", chk.positive)

    @property
    def variance(self) -> float:
        """``survivors * per_client_variance``."""
        return self.survivors * self.per_client_variance


@dataclass(frozen=True, kw_only=True)
class DiscreteGaussianEvent(_DistributedNoiseEvent):
    """Distributed discrete Gaussian noise in a masked sum (Kairouz, Liu, Steinke ICML 2021).

    Every surviving client added ``N_Z(0, local_stddev^2)`` in integer units. A sum of
    discrete Gaussians is not discrete Gaussian; the accountant uses Theorem 1 / Prop. 14 of
    the paper with ``survivors`` summands (its ``tau`` term grows with the number of summands).

    Attributes:
        local_stddev: scale parameter of each client's discrete Gaussian (integer units).
        noise_multiplier: ``sqrt(survivors) * local_stddev / l2_sensitivity``.
        Other attributes as in ``SkellamEvent``.
    """

    mechanism: ClassVar[str] = "discrete_gaussian"
    local_stddev: float

    def __post_init__(self) -> None:
        super().__post_init__()
        _f(self, "local_stddev", chk.positive)

    @property
    def variance(self) -> float:
        """``survivors * local_stddev**2``."""
        return self.survivors * self.local_stddev**2


_TrialEvent = Union[GaussianEvent, QuantileEvent, SampleLevelEvent, SkellamEvent, DiscreteGaussianEvent]
_TRIAL_TYPES = (GaussianEvent, QuantileEvent, SampleLevelEvent, SkellamEvent, DiscreteGaussianEvent)


@dataclass(frozen=True, kw_only=True)
class TuningEvent:
    """A private hyperparameter search: the best of ``K ~ distribution`` trials (Papernot & Steinke 2022).

    One event per guarantee it concerns: ``level="client"`` holds one trial's client-level
    events; ``level="sample"`` one client's sample-level events of one trial (``client_id``).
    ``trial`` is the worst case any trial of the search may spend (every trial's own events
    must be dominated by it, order by order), and each trial also releases one score noised
    with ``score_noise_multiplier`` (Gaussian, sensitivity 1). Accountants compose the RDP bound
    of Theorem 2 / 6 (``dp.tuning_rdp``) on that per-trial curve; PLD and PRV cannot represent it,
    so a history holding one is accounted with RDP.

    Attributes:
        distribution: the ``TrialDistribution`` the number of trials was drawn from.
        trial: one trial's events at this level (and client), none of them a ``TuningEvent``.
        score_noise_multiplier: noise standard deviation of the released selection score over
            its sensitivity (1: one unit changes a sum of per-example scores in [0, 1] by <= 1).
        round_index: 0 (the search precedes the run it selects).
        level: ``"client"`` or ``"sample"``.
        client_id: for ``level="sample"``, whose records are protected; else ``None``.
    """

    mechanism: ClassVar[str] = "tuning"
    distribution: TrialDistribution
    trial: tuple[_TrialEvent, ...]
    score_noise_multiplier: float
    round_index: int = 0
    level: str = "client"
    client_id: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.distribution, TrialDistribution):
            raise DPTypeError(f"distribution must be a dp.TrialDistribution, got {type(self.distribution).__name__}")
        _f(self, "round_index", chk.integer, minimum=0)
        _f(self, "level", chk.one_of, ("client", "sample"))
        _f(self, "score_noise_multiplier", chk.positive)
        trial = tuple(self.trial) if isinstance(self.trial, (list, tuple)) else None
        if not trial:
            raise DPValueError(f"trial must be a non-empty tuple of dp events, got {self.trial!r}")
        for e in trial:
            if type(e) not in _TRIAL_TYPES:
                raise DPTypeError(f"trial events must be dp mechanism events (not a TuningEvent), got {type(e).__name__}")
            if e.level != self.level or e.client_id != self.client_id:
                raise DPValueError(
                    f"every trial event must concern level={self.level!r}, client_id={self.client_id!r}; got an event "
                    f"of level {e.level!r}, client_id {e.client_id!r}"
                )
        if self.level == "sample" and not (isinstance(self.client_id, str) and self.client_id):
            raise DPTypeError(f"client_id must be a non-empty str for level='sample', got {self.client_id!r}")
        object.__setattr__(self, "trial", trial)

    @property
    def sampling(self) -> str:
        """How the search chose its data: every trial sees all of it."""
        return "full"

    @property
    def sample_rate(self) -> float:
        return 1.0


Event = Union[GaussianEvent, QuantileEvent, SampleLevelEvent, SkellamEvent, DiscreteGaussianEvent, TuningEvent]
EVENT_TYPES: dict[str, type] = {cls.mechanism: cls for cls in (*_TRIAL_TYPES, TuningEvent)}


def is_event(obj: object) -> bool:
    return type(obj) in EVENT_TYPES.values()


def event_to_dict(event: Event) -> dict[str, Any]:
    """A JSON-ready dict: ``{"mechanism": ..., <fields>}`` (derived figures under ``"derived"``)."""
    if not is_event(event):
        raise DPTypeError(f"event must be one of {sorted(EVENT_TYPES)} events, got {type(event).__name__}")
    out: dict[str, Any] = {"mechanism": event.mechanism}
    if isinstance(event, TuningEvent):
        out.update({f.name: getattr(event, f.name) for f in dataclasses.fields(event)})
        out["distribution"] = dataclasses.asdict(event.distribution)
        out["trial"] = [event_to_dict(e) for e in event.trial]
        return out
    out.update(dataclasses.asdict(event))
    if isinstance(event, _DistributedNoiseEvent):
        out["derived"] = {"variance": event.variance, "noise_multiplier": event.noise_multiplier}
    return out


def event_from_dict(data: Mapping[str, Any]) -> Event:
    """Inverse of ``event_to_dict``; refuses unknown mechanisms and unknown or missing fields."""
    if not isinstance(data, Mapping):
        raise DPTypeError(f"an event record must be a mapping, got {type(data).__name__}")
    kind = data.get("mechanism")
    if not isinstance(kind, str) or kind not in EVENT_TYPES:
        raise DPValueError(f"event mechanism must be one of {sorted(EVENT_TYPES)}, got {kind!r}")
    cls = EVENT_TYPES[kind]
    names = {f.name for f in dataclasses.fields(cls)}
    fields = {k: v for k, v in data.items() if k not in ("mechanism", "derived")}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise DPValueError(f"{kind} event record has unknown fields {unknown}; allowed: {sorted(names)}")
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = sorted(required - set(fields))
    if missing:
        raise DPValueError(f"{kind} event record lacks the required fields {missing}")
    if cls is TuningEvent:
        dist, trial = fields.get("distribution"), fields.get("trial")
        if not isinstance(dist, Mapping) or not isinstance(trial, list):
            raise DPValueError("a tuning event record needs a 'distribution' mapping and a 'trial' list")
        fields["distribution"] = TrialDistribution(**dist)
        fields["trial"] = tuple(event_from_dict(e) for e in trial)
    return cls(**fields)
