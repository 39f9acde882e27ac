"""Asynchronous rounds: a seeded virtual clock, FedBuff and FedAsync.

Clients train from whatever global model they downloaded and report whenever they finish;
the server never waits for a whole cohort. Time is simulated: a :class:`VirtualClock` gives each
client a speed (drawn once) and each job a network latency, so a run is reproducible under the
federation's seed whatever executor (in process, Ray) computes the local training.

- **FedBuff** (Nguyen et al., AISTATS 2022, Alg. 1): the server keeps up to ``concurrency``
  clients busy and applies an update once ``buffer_size`` results of distinct clients arrived
  (a client whose result waits in the buffer starts again after the buffer is applied). Each
  result is weighted by a staleness function ``s(tau)`` of how many server updates happened since its client downloaded
  the model; the buffer then goes through the federation's :class:`~fedcore.UpdatePipeline`
  (clip, weight, protection backend, central noise) and strategy, exactly like a synchronous
  round, so masking (:class:`secagg.MaskedSum`) and CKKS work per buffer.
- **FedAsync** (Xie, Koyejo, Gupta 2019, "Asynchronous Federated Optimization"): every result is
  mixed in at once, ``x <- (1 - a_t) x + a_t x_new`` with ``a_t = alpha * s(tau)`` and
  ``x_new`` the client's local model. Plaintext only: a single update cannot be masked.

Who sees what: as in the synchronous rounds of the chosen aggregation mode, per buffer. The
staleness weight is applied by the client after clipping and before protection (it knows the
version it started from; the server announces the version the buffer closes at, which is public).

Privacy accounting: each buffer is one use of the client-level mechanism (central Gaussian or
distributed integer noise), recorded with the same event types as a synchronous round, plus the
sample-level events of the results in the buffer. Clients are not sampled independently in an
asynchronous run, so no amplification by sampling is claimed: client-level events are recorded
with ``sample_rate=1.0, sampling="full"`` (a valid bound: a client contributes at most once per
buffer, with weight ``s(tau) <= 1``, hence L2 sensitivity at most the clip bound). Results staler
than ``max_staleness`` are refused before upload and cost nothing.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, Union, runtime_checkable

import numpy as np

import dp

from ..errors import ConfigError, RoundFailedError
from ..strategies._strategies import FedAvg
from . import messages as msg
from .server import Federation
from .training import TrainConfig

__all__ = [
    "Distribution",
    "Constant",
    "LogNormal",
    "Exponential",
    "VirtualClock",
    "examples_per_job",
    "Staleness",
    "ConstantStaleness",
    "PolynomialStaleness",
    "HingeStaleness",
    "FedBuff",
    "FedAsync",
    "AsyncFederation",
]

_STREAM_SPEED, _STREAM_LATENCY, _STREAM_DISPATCH = 11, 12, 13
_ASYNC_DOMAIN = 0xA5


def _finite(name: str, value: Any, *, minimum: float = 0.0, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    bad = not math.isfinite(value) or (value <= minimum if strict else value < minimum)
    if bad:
        raise ConfigError(f"{name} must be a finite number {'>' if strict else '>='} {minimum:g}, got {value!r}")
    return float(value)


def _count(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value!r}")
    return value


# --------------------------------------------------------------------------- distributions
@runtime_checkable
class Distribution(Protocol):
    """A non-negative random quantity (seconds, or a speed factor); draws from the passed generator."""

    def sample(self, rng: np.random.Generator) -> float:
        """One draw, in virtual seconds, from ``rng``."""


@dataclass(frozen=True)
class Constant:
    """Always ``value``."""

    value: float

    def __post_init__(self) -> None:
        _finite("value", self.value)

    def sample(self, rng: np.random.Generator) -> float:
        """Always ``value``: a client of fixed speed."""
        return float(self.value)


@dataclass(frozen=True)
class LogNormal:
    """``median * exp(sigma * N(0, 1))``: heavy-tailed, the usual model of device speeds."""

    median: float = 1.0
    sigma: float = 0.5

    def __post_init__(self) -> None:
        _finite("median", self.median, strict=True)
        _finite("sigma", self.sigma)

    def sample(self, rng: np.random.Generator) -> float:
        """``median * exp(sigma * N(0, 1))``: heavy-tailed client speeds."""
        return float(self.median * math.exp(self.sigma * rng.standard_normal()))


@dataclass(frozen=True)
class Exponential:
    """Exponential with the given mean (memoryless network delays)."""

    mean: float

    def __post_init__(self) -> None:
        _finite("mean", self.mean)

    def sample(self, rng: np.random.Generator) -> float:
        """An exponential draw with mean ``mean`` (0 when the mean is 0)."""
        return float(rng.exponential(self.mean)) if self.mean > 0 else 0.0


@dataclass(frozen=True)
class VirtualClock:
    """Simulated durations of client jobs.

    A job of a client with speed ``v`` that processes ``n`` training examples lasts
    ``n * seconds_per_example / v + latency`` virtual seconds. ``speed`` is drawn once per
    client; ``latency`` (download plus upload) once per job. Only virtual time is simulated:
    wall-clock time does not enter the run, so it is reproducible under a seed.

    Attributes:
        speed: distribution of each client's speed factor (must draw values > 0).
        latency: distribution of each job's network latency, in virtual seconds.
        seconds_per_example: compute time per training example at speed 1.
    """

    speed: Distribution = LogNormal(1.0, 0.5)
    latency: Distribution = Exponential(0.5)
    seconds_per_example: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("speed", "latency"):
            if not isinstance(getattr(self, name), Distribution):
                raise TypeError(f"{name} must have a sample(rng) method (a Distribution), got {getattr(self, name)!r}")
        _finite("seconds_per_example", self.seconds_per_example)
        if isinstance(self.speed, Constant) and self.speed.value <= 0:
            raise ConfigError(f"speed must draw values > 0, got Constant({self.speed.value!r})")

    def client_speed(self, rng: np.random.Generator) -> float:
        """Draw one client's speed factor.

        Raises:
            ConfigError: the speed distribution drew a value that is not > 0.
        """
        value = self.speed.sample(rng)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"speed distribution {self.speed!r} drew {value!r}; speeds must be > 0")
        return value

    def job_duration(self, *, examples: int, speed: float, rng: np.random.Generator) -> float:
        """Virtual seconds one job takes: compute at ``speed`` plus one latency draw."""
        latency = self.latency.sample(rng)
        if not (math.isfinite(latency) and latency >= 0):
            raise ConfigError(f"latency distribution {self.latency!r} drew {latency!r}; latencies must be >= 0")
        return examples * self.seconds_per_example / speed + latency


def examples_per_job(num_train: int, train: TrainConfig) -> int:
    """Training examples one local job processes (epochs, capped by ``max_steps`` batches)."""
    examples = num_train * train.epochs
    if train.max_steps is not None:
        examples = min(examples, train.max_steps * train.batch_size)
    return examples


# --------------------------------------------------------------------------- staleness
@runtime_checkable
class Staleness(Protocol):
    """Weight ``s(tau)`` in (0, 1] of a result computed ``tau`` server updates ago (``s(0) = 1``)."""

    @property
    def name(self) -> str:
        """The rule's name in records and reports."""

    def __call__(self, staleness: int) -> float: ...


def _tau(staleness: Any) -> int:
    if isinstance(staleness, bool) or not isinstance(staleness, (int, np.integer)):
        raise TypeError(f"staleness must be an int, got {staleness!r}")
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness!r}")
    return int(staleness)


@dataclass(frozen=True)
class ConstantStaleness:
    """``s(tau) = 1``: every result counts fully, however stale."""

    name: ClassVar[str] = "constant"

    def __call__(self, staleness: int) -> float:
        _tau(staleness)
        return 1.0


@dataclass(frozen=True)
class PolynomialStaleness:
    """``s(tau) = (1 + tau)^-a`` (Xie et al. 2019; FedBuff uses ``a = 0.5``)."""

    a: float = 0.5
    name: ClassVar[str] = "polynomial"

    def __post_init__(self) -> None:
        _finite("a", self.a)

    def __call__(self, staleness: int) -> float:
        return float((1.0 + _tau(staleness)) ** -self.a)


@dataclass(frozen=True)
class HingeStaleness:
    """``s(tau) = 1`` for ``tau <= b``, else ``1 / (a * (tau - b) + 1)`` (Xie et al. 2019)."""

    a: float = 10.0
    b: int = 4
    name: ClassVar[str] = "hinge"

    def __post_init__(self) -> None:
        _finite("a", self.a, strict=True)
        _count("b", self.b, minimum=0)

    def __call__(self, staleness: int) -> float:
        tau = _tau(staleness)
        return 1.0 if tau <= self.b else 1.0 / (self.a * (tau - self.b) + 1.0)


# --------------------------------------------------------------------------- schedules
def _check_schedule(concurrency: Any, staleness: Any, max_staleness: Any) -> None:
    _count("concurrency", concurrency, minimum=1)
    if not isinstance(staleness, Staleness):
        raise TypeError(f"staleness must be a Staleness (e.g. PolynomialStaleness(0.5)), got {staleness!r}")
    if max_staleness is not None:
        _count("max_staleness", max_staleness, minimum=0)


@dataclass(frozen=True)
class FedBuff:
    """Buffered asynchronous aggregation (Nguyen et al., AISTATS 2022).

    Attributes:
        buffer_size: results per server update (K).
        concurrency: clients training at any time.
        staleness: weight of a result by its staleness.
        max_staleness: results staler than this are refused before upload (None: never).
    """

    buffer_size: int
    concurrency: int
    staleness: Staleness = PolynomialStaleness(0.5)
    max_staleness: int | None = None
    name: ClassVar[str] = "fedbuff"

    def __post_init__(self) -> None:
        _count("buffer_size", self.buffer_size, minimum=1)
        _check_schedule(self.concurrency, self.staleness, self.max_staleness)


@dataclass(frozen=True)
class FedAsync:
    """Asynchronous mixing (Xie et al. 2019): ``x <- (1 - alpha s(tau)) x + alpha s(tau) x_new``.

    ``x_new`` is the client's local model (the model it started from plus its clipped update).
    The federation's dropout simulation does not apply: a client that drops never reports.

    Attributes:
        alpha: mixing weight in (0, 1].
        concurrency: clients training at any time.
        staleness: scales ``alpha`` by the result's staleness.
        max_staleness: results staler than this are refused before upload (None: never).
    """

    alpha: float = 0.6
    concurrency: int = 1
    staleness: Staleness = PolynomialStaleness(0.5)
    max_staleness: int | None = None
    name: ClassVar[str] = "fedasync"

    def __post_init__(self) -> None:
        if not (isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and 0.0 < self.alpha <= 1.0):
            raise ConfigError(f"alpha must be in (0, 1], got {self.alpha!r}")
        _check_schedule(self.concurrency, self.staleness, self.max_staleness)

    @property
    def buffer_size(self) -> int:
        """FedAsync mixes every result into the model as it arrives: a buffer of one."""
        return 1


Schedule = Union[FedBuff, FedAsync]


@dataclass
class _Job:
    index: int
    client_id: str
    version: int
    start: float
    finish: float
    report: dict[str, Any] | None = None

    def __lt__(self, other: "_Job") -> bool:  # heap tie-break: dispatch order
        return self.index < other.index


# --------------------------------------------------------------------------- the runner
class AsyncFederation:
    """Runs a :class:`~fedcore.Federation` asynchronously under a virtual clock.

    The federation supplies the clients, executor, pipeline, strategy, ledger, budget, dropout
    simulation, evaluation and seed; this object supplies the event loop. Every random choice
    (client speeds, latencies, which idle client starts next, training seeds, pipeline noise)
    derives from the federation's seed and the job or update index, so a run is deterministic,
    and it does not depend on when or where (in process, on Ray) the local training is computed:
    a client's local-only parameters change when its job finishes in virtual time.

    The pipeline is rebuilt for ``schedule.buffer_size`` expected clients per update (the fixed
    denominator under client-level DP). Asynchronous runs are not checkpointed (the jobs in
    flight are not saved); ``federation.global_vector`` always holds the current model.

    Args:
        federation: the experiment; its strategy applies each FedBuff buffer (FedAsync needs
            ``FedAvg``, whose step it replaces by mixing).
        schedule: :class:`FedBuff` or :class:`FedAsync`.
        clock: the virtual clock.

    Raises:
        ConfigError: a revealing strategy, more concurrency than clients, FedAsync with a
            protected backend or a strategy other than FedAvg, or a pipeline that does not fit.
    """

    def __init__(self, federation: Federation, *, schedule: Schedule, clock: VirtualClock | None = None) -> None:
        if not isinstance(federation, Federation):
            raise TypeError(f"federation must be a Federation, got {type(federation).__name__}")
        if not isinstance(schedule, (FedBuff, FedAsync)):
            raise TypeError(f"schedule must be FedBuff or FedAsync, got {type(schedule).__name__}")
        clock = VirtualClock() if clock is None else clock
        if not isinstance(clock, VirtualClock):
            raise TypeError(f"clock must be a VirtualClock, got {type(clock).__name__}")
        if federation.pipeline.user_bound is not None:
            raise ConfigError(
                "user-level DP across silos needs every silo's sum in every round; an asynchronous buffer holds the "
                "silos that finished first, and one user's data can decide which (its silo's training time)"
            )
        n = len(federation.client_ids)
        if schedule.concurrency > n:
            raise ConfigError(f"concurrency must be <= the {n} clients, got {schedule.concurrency!r}")
        if schedule.buffer_size > n:
            raise ConfigError(
                f"buffer_size must be <= the {n} clients (a client contributes at most once per buffer), "
                f"got {schedule.buffer_size!r}"
            )
        strategy = federation.strategy
        if hasattr(strategy, "combine"):
            raise ConfigError(
                f"strategy {strategy.name!r} needs individual local models each round; asynchronous rounds "
                "support aggregating strategies only (FedAvg, FedAdam, FedYogi, FedAdagrad, FedSGD)"
            )
        pipeline = federation.pipeline
        if isinstance(schedule, FedAsync):
            if pipeline.backend.mode != "plaintext":
                raise ConfigError(
                    f"FedAsync applies one client's update at a time, which aggregation mode {pipeline.backend.mode!r} "
                    "cannot protect (a sum of one is the update itself); use FedBuff with buffer_size >= the "
                    "backend's threshold, or aggregation 'plaintext'"
                )
            if type(strategy) is not FedAvg or strategy.server_lr != 1.0:
                raise ConfigError(
                    f"FedAsync replaces the server step by mixing; give the federation strategy=FedAvg() "
                    f"(server_lr=1), got {strategy.name!r}"
                )
        pipeline.build(dimension=federation.layout.size, num_clients=n, expected_clients=float(schedule.buffer_size))
        self.federation = federation
        self.schedule = schedule
        self.clock = clock
        self.version = 0
        self.now = 0.0
        self.received = 0
        self.applied = 0
        self.discarded = 0
        self.history: list[dict[str, Any]] = []
        self.stop_reason: str | None = None
        self._jobs: list[tuple[float, _Job]] = []
        self._buffer: list[tuple[_Job, int]] = []
        self._snapshots: dict[int, np.ndarray] = {0: np.array(federation.global_vector, dtype=np.float32)}
        self._speeds: dict[str, float] = {}
        self._dispatched = 0
        self._started = False
        self._refused: set[str] = set()  # clients that refused to train past their own privacy budget

    # ------------------------------------------------------------------ running
    @property
    def global_vector(self) -> np.ndarray:
        """The current global shared parameters (the wrapped federation's)."""
        return self.federation.global_vector

    def run(self, updates: int, *, on_budget: str = "stop") -> list[dict[str, Any]]:
        """Run until ``updates`` server updates were applied in total.

        Args:
            updates: total number of server updates (buffers applied, or mixings for FedAsync).
            on_budget: ``"stop"`` ends cleanly when the next update would exceed the privacy
                budget (reason in ``stop_reason``); ``"raise"`` re-raises.
        """
        _count("updates", updates, minimum=0)
        if on_budget not in ("stop", "raise"):
            raise ConfigError(f"on_budget must be 'stop' or 'raise', got {on_budget!r}")
        while self.version < updates:
            try:
                self.step()
            except dp.BudgetExceededError as exc:
                if on_budget == "stop":
                    self.stop_reason = str(exc)
                    break
                raise
            except RoundFailedError as exc:
                if on_budget == "stop" and self._refused and not self._jobs:  # the clients' own budgets are spent
                    self.stop_reason = str(exc)
                    break
                raise
        return self.history

    def step(self) -> dict[str, Any]:
        """Advance virtual time until the next server update is applied; return its record.

        Raises:
            RoundFailedError: the buffer's protected sum failed; its results are discarded and
                the model is unchanged.
            dp.BudgetExceededError: applying the buffer would exceed the budget (nothing recorded).
        """
        self._start()
        while True:
            if not self._jobs:
                raise RoundFailedError(
                    f"no client can train: {len(self._refused)} of {len(self.federation.client_ids)} refused to go past "
                    f"their own privacy budget, too few are left to fill a buffer of {self.schedule.buffer_size}"
                )
            _, job = heapq.heappop(self._jobs)
            self.now = job.finish
            if job.report is None:
                self._train_pending(job)
            assert job.report is not None
            fed = self.federation
            done = msg.encode(msg.Kind.FINISH, {"round": job.version + 1})
            msg.decode(fed.channel.send(job.client_id, done) or b"", expect=msg.Kind.ACK)
            self.received += 1
            tau = self.version - job.version
            limit = self.schedule.max_staleness
            if (limit is not None and tau > limit) or not job.report["ok"]:
                self.discarded += 1
                if job.report.get("budget_refused"):
                    self._refused.add(job.client_id)
            else:
                self._buffer.append((job, tau))
            record = None
            try:
                if len(self._buffer) >= self.schedule.buffer_size:
                    record = self._apply()
            finally:
                self._fill()
                self._release()
            if record is not None:
                return record

    # ------------------------------------------------------------------ jobs
    def _rng(self, stream: int, index: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.federation.seed, _ASYNC_DOMAIN, stream, index]))

    def _speed(self, client_id: str) -> float:
        if client_id not in self._speeds:
            tag = int.from_bytes(hashlib.sha256(client_id.encode()).digest()[:8], "little")
            self._speeds[client_id] = self.clock.client_speed(self._rng(_STREAM_SPEED, tag))
        return self._speeds[client_id]

    def _start(self) -> None:
        if not self._started:
            self._started = True
            self._fill()

    def _fill(self) -> None:
        """Start idle clients until ``concurrency`` jobs are in flight (or no client is idle).

        A client is busy while its job is in flight and while its result waits in the buffer, so
        it contributes at most once to any buffer.
        """
        while len(self._jobs) < self.schedule.concurrency and self._dispatch():
            pass

    def _dispatch(self) -> bool:
        """Start one idle client (uniformly at random) on the current model; False if none is idle."""
        busy = {job.client_id for _, job in self._jobs} | {job.client_id for job, _ in self._buffer} | self._refused
        idle = [c for c in self.federation.client_ids if c not in busy]
        if not idle:
            return False
        index = self._dispatched
        self._dispatched += 1
        cid = idle[int(self._rng(_STREAM_DISPATCH, index).integers(len(idle)))]
        fed = self.federation
        examples = examples_per_job(fed.declared_sizes[cid], fed.train)
        duration = self.clock.job_duration(examples=examples, speed=self._speed(cid), rng=self._rng(_STREAM_LATENCY, index))
        job = _Job(index, cid, self.version, self.now, self.now + duration)
        self._snapshots.setdefault(self.version, np.array(fed.global_vector, dtype=np.float32))
        heapq.heappush(self._jobs, (job.finish, job))
        return True

    def _train_pending(self, due: _Job) -> None:
        """Compute every job in flight that has no result yet (one executor call per base version).

        Results depend only on the base model, the client's local state and the job's seed, so
        computing them early changes nothing; it lets a parallel executor run them together.
        """
        fed = self.federation
        pending = sorted([due] + [job for _, job in self._jobs if job.report is None], key=lambda j: j.index)
        for version in sorted({j.version for j in pending}):
            group = [j for j in pending if j.version == version]
            model = self._snapshots[version]
            batch = {
                j.client_id: msg.encode(
                    msg.Kind.TRAIN, {"round": version + 1, "version": version, "job": j.index + 1, "defer_local": True}, model
                )
                for j in group
            }
            replies = fed.channel.exchange(batch)
            for job in group:
                report = msg.decode(replies.get(job.client_id) or b"", expect=msg.Kind.TRAIN_REPORT).header
                if report.get("client") != job.client_id:
                    raise RoundFailedError(
                        f"job {job.index}: {job.client_id!r} answered with a report of {report.get('client')!r}"
                    )
                job.report = report

    def _release(self) -> None:
        keep = {job.version for _, job in self._jobs} | {self.version}
        for version in [v for v in self._snapshots if v not in keep]:
            del self._snapshots[version]

    # ------------------------------------------------------------------ server updates
    def _weights(self, taus: list[int]) -> list[float]:
        weights = []
        for tau in taus:
            s = float(self.schedule.staleness(tau))
            if not 0.0 < s <= 1.0:
                raise ConfigError(
                    f"staleness {self.schedule.staleness!r} gave weight {s!r} at staleness {tau}; weights must lie "
                    "in (0, 1] so that a weighted update keeps the clip bound as its sensitivity"
                )
            weights.append(s)
        return weights

    def _charge_unfinished(self, t: int, planned: list[Any], error: str) -> None:
        """Update ``t`` failed after its updates may have left: charge its planned events, use up its number.

        The model stays as it was (a new version of the same vector), as a synchronous round does.
        """
        fed = self.federation
        if fed.ledger is not None:
            for event in planned:
                fed.ledger.record(event)
        self.version = t
        self._snapshots[t] = fed.global_vector.copy()
        self.history.append({"update": t, "interrupted": True, "charged_events": len(planned), "error": error[:300]})

    def _apply(self) -> dict[str, Any]:
        fed = self.federation
        started = time.perf_counter()
        t = self.version + 1
        jobs = [job for job, _ in self._buffer]
        taus = [tau for _, tau in self._buffer]
        weights = self._weights(taus)
        mixing = isinstance(self.schedule, FedAsync)
        ids = [job.client_id for job in jobs]
        reports = [job.report for job in jobs if job.report is not None]
        sample_events = [dp.event_from_dict(r["privacy_event"]) for r in reports if r["privacy_event"]]
        n = len(ids)
        planned = sample_events + fed.pipeline.planned_events(
            round_index=t, participants=n, survivors=fed.min_survivors(n), sample_rate=1.0, sampling="full"
        )

        released = False  # from the first PROTECT on, the buffer's updates may have left their clients

        def body() -> tuple[np.ndarray, list[Any], dict[str, Any]]:
            nonlocal released
            released = True
            staleness = {cid: 1.0 if mixing else w for cid, w in zip(ids, weights)}
            out = fed.protected_sum(t, ids, staleness=staleness, sample_rate=1.0, sampling="full")
            if mixing:
                base = self._snapshots[jobs[0].version].astype(np.float64)
                local_model = base + out.aggregate.mean
                a_t = self.schedule.alpha * weights[0]  # type: ignore[union-attr]
                new_vector = (1.0 - a_t) * fed.global_vector.astype(np.float64) + a_t * local_model
            else:
                new_vector = fed.strategy.apply(fed.global_vector, out.aggregate)
            events = sample_events + list(out.events)
            record: dict[str, Any] = {
                "update": t,
                "virtual_time": self.now,
                "participants": n,
                "contributors": int(out.aggregate.contributors),
                "dropped": len(out.sum_result.dropped),
                "clients": tuple(ids),
                "staleness": tuple(taus),
                "staleness_weights": tuple(weights),
                "staleness_mean": float(np.mean(taus)),
                "staleness_max": int(max(taus)),
                "bytes_up": float(sum(out.sum_result.bytes_up.values())),
            }
            return new_vector, events, record

        try:
            record = fed.transact(f"asynchronous update {t}", planned, body)
        except BaseException as exc:
            self._buffer.clear()
            if released and not fed.revealed_nothing(exc):
                self._charge_unfinished(t, planned, f"{type(exc).__name__}: {exc}")
            if isinstance(exc, RoundFailedError):
                raise RoundFailedError(f"{exc}; its {n} results were discarded") from exc
            raise
        self.version = t
        self._snapshots[t] = fed.global_vector.copy()
        self._buffer.clear()
        self.applied += n
        record.update(client_updates=self.applied, received=self.received, discarded=self.discarded)
        fed._finish_record(t, record, started, key="wall_seconds")
        self.history.append(record)
        return record
