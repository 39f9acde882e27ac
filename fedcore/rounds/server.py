"""The server side of synchronous rounds: sampling, protection, strategy, ledger, checkpoints."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, cast

import numpy as np
import torch

import dp
from secagg import KEY_HOLDER, DropoutError, MaskedSum, Respond, SecAggError, Stage, drive_round

from ..errors import ConfigError, RoundFailedError
from ..stages.layout import ParameterLayout
from ..stages.pipeline import RoundAggregate, UpdatePipeline
from ..strategies._strategies import LocalModel
from ..workloads.task import ClientData, Task
from . import messages as msg
from ._threads import use_library_threads
from .checkpoint import (
    BegunRound,
    Checkpoint,
    clear_begun_round,
    load_begun_round,
    load_checkpoint,
    save_begun_round,
    save_checkpoint,
    saved_client_ids,
)
from .client import Client, ClientResult
from .costs import CostEstimate, CostWarning, message_bytes, peak_memory, probe_protection, protection_degree, upload_per_client
from .executors import Executor, InProcessExecutor
from .observability import ConsoleLogger, MetricsLogger, progress
from .parties import (
    HELD_OUT_SPLITS,
    Channel,
    ClientSide,
    InProcessChannel,
    PartyHost,
    PartySettings,
    Randomness,
    planned_sample_event,
)
from .sampling import AllClients, ClientSampler
from .training import SampleLevelPrivacy, TrainConfig

__all__ = ["Federation", "DropoutSimulator", "Reveal", "clients_own_budget"]

_STREAM_DROPOUT = 3
_LOG = logging.getLogger("fedcore")
_TIMED_EXAMPLES = 8  # examples of the timed training step (scaled to the batch size)
WARN_UPLOAD_BYTES = 100_000_000  # a client uploading more per round is warned about before round 1


@dataclass(frozen=True)
class DropoutSimulator:
    """Each participant goes silent with probability ``rate``, at a stage drawn uniformly."""

    rate: float
    stages: tuple[Stage, ...] = tuple(Stage)

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate < 1.0:
            raise ConfigError(f"dropout rate must be in [0, 1), got {self.rate!r}")
        if not self.stages:
            raise ConfigError("dropout stages must name at least one Stage")

    def draw(self, participants: Sequence[str], rng: np.random.Generator) -> dict[str, Stage]:
        """Which participants drop, and at which protocol stage, for one round."""
        drops = rng.random(len(participants)) < self.rate
        stages = rng.integers(0, len(self.stages), size=len(participants))
        return {c: self.stages[s] for c, d, s in zip(participants, drops, stages) if d}


@dataclass(frozen=True)
class Reveal:
    """A model revealed to the server (model selection, output ensembles), for the report."""

    round_index: int
    client_ids: tuple[str, ...]
    what: str
    why_allowed: str


def clients_own_budget(budget: dp.PrivacyBudget | None, sample_privacy: Any) -> dp.PrivacyBudget | None:
    """The cap each client party puts on its own sample-level epsilon: the run's budget, where it covers that level."""
    if budget is None or budget.level == "client" or not isinstance(sample_privacy, dp.SampleLevelDP):
        return None
    return replace(budget, level="sample")


class Federation:
    """The server party of a federated experiment, and the simulated client parties it talks to.

    The server party holds the global vector, the strategy, the sampler, the privacy ledger and
    budget, the clients' public keys and the public HE context. It reaches the client parties
    only through :attr:`channel`, as bytes (:mod:`fedcore.rounds.messages` and the secagg formats): it
    never holds a client's update in masked or HE modes, nor a client's secret or noise seed.
    Each client party (see :mod:`fedcore.rounds.parties`) holds its data, local-only parameters, keys and
    randomness, and runs the client half of the pipeline.

    Randomness: with ``reproducible=False`` (the default) every seed a client uses, and the
    server's sampling and central noise, come from the OS CSPRNG; ``seed`` then fixes only the
    initial model and the simulated dropouts. ``reproducible=True`` is a simulation setting:
    everything derives from ``seed``, a run reaches the same model bit for bit (also after a
    resume, and on Ray), and the privacy report says that the noise is derivable from the seed.

    Threads: the first federation (or workload) built in a process sets torch to one intra-op
    thread, which keeps rounds fast on a machine shared with other work, unless the user chose
    a count: ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` set, or ``torch.set_num_threads`` called
    after importing fedcore. Results do not depend on it.

    Args:
        task: the workload.
        clients: client id -> its data (each becomes a client party).
        strategy: a ``Strategy`` (FedAvg, FedAdam...) or a revealing one (ModelSelection...).
        train: local training settings.
        pipeline: clip, weighting, protection backend, central noise (default: plaintext,
            example-count weights bounded by the largest client).
        sampler: which clients take part each round (default: all).
        sample_privacy: sample-level DP-SGD for local training (``dp.SampleLevelDP``). With
            ``target_epsilon`` (and ``delta``) instead of a noise multiplier, the noise is
            calibrated here over ``rounds`` for the client whose schedule needs the most (the
            one with the fewest examples, i.e. the highest sampling rate), so that every
            client's epsilon stays within the target; :attr:`calibration` says what was chosen.
        ledger: privacy ledger receiving every mechanism use (``dp.Ledger``).
        budget: optional ``dp.PrivacyBudget`` checked before each round (needs ``ledger``).
        executor: where client parties' local training runs (default: in process).
        dropouts: optional dropout simulation.
        allow_reveal: the user's explicit consent to revealing individual models, needed by
            model selection and output ensembles unless sample-level DP covers them.
        logger: receives metrics per round.
        client_deadline: seconds of local work after which a client's result is discarded and
            the client counts as dropped (a client that raises counts as dropped too).
        checkpoint_dir: if set, a checkpoint is written after every round.
        evaluate_every: rounds between federated evaluations on the clients' test splits.
        seed: the simulation seed (None: drawn from the OS).
        reproducible: derive all randomness from ``seed`` (see above).
        record_inbox: keep every byte the server receives in ``channel.inbox``.
        quiet: no progress bar and no per-round line from :meth:`run`.
        channel: the client parties are elsewhere (other processes: :mod:`fedcore.deploy`) and
            this channel reaches them; ``clients`` then only declares their training-set sizes
            and no client party is built here. None (default): simulated parties in this process.
        directory: with ``channel``, the clients' Ed25519 identity public keys (signed masking).
        rounds: the rounds the run plans; needed by a ``target_epsilon`` (the noise is calibrated
            over them, and running more is refused); :meth:`run` runs them by default.
        max_upload_bytes: refuse, here, a run whose estimated upload per client and round
            (:meth:`estimate_costs`) is above this many bytes.
    """

    def __init__(
        self,
        *,
        task: Task,
        clients: Mapping[str, ClientData],
        strategy: Any,
        train: TrainConfig,
        pipeline: UpdatePipeline | None = None,
        sampler: ClientSampler | None = None,
        sample_privacy: SampleLevelPrivacy | None = None,
        ledger: Any = None,
        budget: Any = None,
        executor: Executor | PartyHost | None = None,
        dropouts: DropoutSimulator | None = None,
        allow_reveal: bool = False,
        logger: MetricsLogger | None = None,
        client_deadline: float | None = None,
        checkpoint_dir: str | Path | None = None,
        evaluate_every: int = 1,
        seed: int | None = 0,
        reproducible: bool = False,
        record_inbox: bool = False,
        quiet: bool = False,
        channel: Channel | None = None,
        directory: Mapping[str, bytes] | None = None,
        rounds: int | None = None,
        max_upload_bytes: int | None = None,
    ) -> None:
        if not clients:
            raise ConfigError("clients must hold at least one client, got none")
        use_library_threads()
        if evaluate_every < 0:
            raise ConfigError(f"evaluate_every must be >= 0 (0 = never), got {evaluate_every!r}")
        if budget is not None and ledger is None:
            raise ConfigError("budget needs a ledger to read what was spent: pass ledger=dp.Ledger() as well")
        if not isinstance(reproducible, bool):
            raise ConfigError(f"reproducible must be True or False, got {reproducible!r}")
        if channel is not None and (executor is not None or record_inbox):
            raise ConfigError(
                "with a channel to remote client parties, executor and record_inbox belong to the clients: leave them unset"
            )
        if (directory is not None) != (channel is not None):
            raise ConfigError("directory (the remote clients' identity keys) goes with channel, and only with it")
        if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1):
            raise ConfigError(f"rounds must be an int >= 1 or None, got {rounds!r}")
        if max_upload_bytes is not None and not (isinstance(max_upload_bytes, (int, float)) and max_upload_bytes > 0):
            raise ConfigError(f"max_upload_bytes must be a number of bytes > 0 or None, got {max_upload_bytes!r}")
        self.rounds = rounds
        self.task = task
        self.client_ids = sorted(clients)
        self.strategy = strategy
        self.train = train
        self.sampler: ClientSampler = sampler if sampler is not None else AllClients()
        self.sample_privacy = sample_privacy
        self.ledger = ledger
        self.budget = budget
        self.dropouts = dropouts
        self.allow_reveal = allow_reveal
        self.logger = logger
        if client_deadline is not None and not client_deadline > 0:
            raise ConfigError(f"client_deadline must be > 0 seconds or None, got {client_deadline!r}")
        self.client_deadline = client_deadline
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.evaluate_every = evaluate_every
        self.seed = int.from_bytes(os.urandom(7), "little") if seed is None else int(seed)
        self.randomness = Randomness(self.seed if reproducible else None)
        self.quiet = quiet
        torch.manual_seed(self.seed)
        initial_model = task.build_model()
        self.layout = ParameterLayout(initial_model, local_only=task.local_only)
        self.global_vector = self.layout.flatten(initial_model).numpy()
        if channel is None:
            executor = executor or InProcessExecutor(task, device=train.device)
            getattr(executor, "workspace", None)  # build a lazy workspace now, at a fixed point of torch's RNG
        parties = {cid: Client(cid, data) for cid, data in clients.items()}
        # what each client declares when it enrols: its training-set size (its DP-SGD events reveal it too)
        self.declared_sizes = {cid: c.data.num_train for cid, c in parties.items()}
        self.calibration: dict[str, Any] | None = None
        if getattr(sample_privacy, "target_epsilon", None) is not None:
            sample_privacy = self._calibrate(sample_privacy)
            self.sample_privacy = sample_privacy
        if pipeline is None:
            pipeline = UpdatePipeline(max_examples=max(self.declared_sizes.values()))
        self.pipeline = pipeline
        self._check_users_across_silos(clients)
        self.reveals: list[Reveal] = []
        self.history: list[dict[str, Any]] = []
        self.round_index = 0
        self.stop_reason: str | None = None
        # whether the strategy has clients reveal their local models in the clear (checked below: consent, plaintext)
        self.reveals_models = hasattr(strategy, "combine")
        if self.reveals_models and not (allow_reveal or sample_privacy is not None):
            raise ConfigError(
                f"strategy {strategy.name!r} reveals individual local models to the server "
                f"({strategy.reveal_reason}); allow it with allow_reveal=True or cover the models with "
                "sample-level DP (sample_privacy=...)"
            )
        if self.reveals_models and pipeline.backend.mode != "plaintext":
            raise ConfigError(
                f"strategy {strategy.name!r} needs individual local models, which {pipeline.backend.mode!r} "
                "aggregation exists to hide; use aggregation 'plaintext' with it"
            )
        expected = self.sampler.rate(len(self.client_ids)) * len(self.client_ids)
        pipeline.build(dimension=self.layout.size, num_clients=len(self.client_ids), expected_clients=expected)
        self._probe = parties[self.client_ids[0]]  # the declared data the build checks and the cost estimate run on
        self._check_loss(initial_model, self._probe)
        if sample_privacy is not None:
            self._check_sample_privacy(initial_model, parties[self.client_ids[0]])
        # the server party's public material: identity public keys, and each round's public HE context
        self.client_side: ClientSide | None = None
        self.channel: Channel
        if channel is None:
            settings = PartySettings(
                layout=self.layout,
                pipeline=pipeline,
                train=train,
                update_kind=strategy.update_kind,
                privacy=sample_privacy,
                randomness=self.randomness,
                client_deadline=client_deadline,
                budget=clients_own_budget(budget, sample_privacy),
                state_folder=None if checkpoint_dir is None else self.client_folder(checkpoint_dir),
                reveals=self.reveals_models,
            )
            self.channel, self.public_keys = self._client_parties(executor, parties, settings, record_inbox)
        else:
            signed = bool(getattr(pipeline.backend, "signed_keys", False))
            missing = sorted(set(self.client_ids) - set(directory or {})) if signed else []
            if missing:
                raise ConfigError(f"signed masking needs every client's identity key; the directory lacks {missing[:5]}")
            self.channel = channel
            self.public_keys = {c: bytes(directory[c]) for c in self.client_ids} if signed and directory else {}
        self.public_context: bytes | None = None
        self.costs = self.estimate_costs()
        if max_upload_bytes is not None and self.costs.upload_bytes_per_client > max_upload_bytes:
            raise ConfigError(
                f"max_upload_bytes={max_upload_bytes!r}, but each client would upload about "
                f"{self.costs.upload_bytes_per_client:,} bytes per round ({self.costs.summary()}); raise the limit, "
                "shrink the shared model (local_only, LoRA) or choose a lighter protection mode"
            )

    def _client_parties(
        self, executor: Any, parties: dict[str, Client], settings: PartySettings, record: bool
    ) -> tuple[Channel, dict[str, bytes]]:
        """Build the simulated client parties: here (in-process) or where ``executor`` hosts them (Ray actors)."""
        if hasattr(executor, "host"):  # a PartyHost: only bytes reach the parties it builds
            channel, directory = executor.host(parties, settings, record=record)
            return channel, dict(directory)
        self.client_side = ClientSide(clients=parties, executor=executor, **settings.as_kwargs())
        return InProcessChannel(self.client_side, record=record), dict(self.client_side.directory)

    @property
    def clients(self) -> dict[str, Client]:
        """The simulated client parties (for inspection; the server party never reads them); none when remote."""
        return self.client_side.clients if self.client_side is not None else {}

    @property
    def executor(self) -> Executor | None:
        """Where the simulated client parties' local training runs (None: the parties are remote)."""
        return self.client_side.executor if self.client_side is not None else None

    def _calibrate(self, sample_privacy: Any) -> Any:
        """The noise multiplier that keeps every client within ``target_epsilon`` over ``rounds``."""
        if self.rounds is None:
            raise ConfigError(
                f"sample_privacy.target_epsilon={sample_privacy.target_epsilon!r} is calibrated over the rounds the run "
                "plans: pass rounds= as well"
            )
        runs = {}
        for cid, size in self.declared_sizes.items():
            steps, rate = self.train.dp_schedule(size)
            runs[cid] = (self.rounds * steps, rate)
        calibrated, worst = sample_privacy.calibrated(runs)
        self.calibration = {
            "target_epsilon": sample_privacy.target_epsilon,
            "delta": sample_privacy.delta,
            "accountant": sample_privacy.accountant,
            "rounds": self.rounds,
            "noise_multiplier": calibrated.noise_multiplier,
            "worst_client": worst,
            "worst_client_examples": self.declared_sizes[worst],
            "worst_client_sample_rate": runs[worst][1],
        }
        return calibrated

    def _first_batch(self, client: Client) -> Any:
        loader = torch.utils.data.DataLoader(client.data.train, batch_size=self.train.batch_size, collate_fn=self.task.collate)
        return next(iter(loader))

    def _check_loss(self, model: torch.nn.Module, client: Client) -> None:
        """The task's loss is one loss per example (the Task contract, and what DP-SGD clips)."""
        batch = self._first_batch(client)
        with torch.random.fork_rng(), torch.no_grad():
            try:
                losses = self.task.loss(model, batch)
            except ConfigError:  # the task itself says its settings are wrong
                raise
            except Exception:
                if self.sample_privacy is not None:
                    raise
                return  # a loss that raises on this client's data is that client's failure, reported in its round
        if not isinstance(losses, torch.Tensor) or losses.ndim != 1:
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ConfigError(
                f"the federation needs task.loss to return one loss per example (a 1-D tensor), got {shape}: it averages "
                "them itself and DP-SGD clips each example's gradient, so a reduced (scalar) loss cannot be used; "
                "use reduction='none'"
            )

    def _check_sample_privacy(self, model: torch.nn.Module, client: Client) -> None:
        """Attach DP-SGD once to a fresh model, so that a setting it refuses fails here.

        Otherwise every client would raise the same error in round 1 and count as a dropout.
        """
        assert self.sample_privacy is not None
        optimizer = self.train.make_optimizer([p for p in model.parameters() if p.requires_grad])
        loader = torch.utils.data.DataLoader(client.data.train, batch_size=self.train.batch_size, collate_fn=self.task.collate)
        with torch.random.fork_rng():
            try:
                self.sample_privacy.attach(model, optimizer, loader).detach()
            except dp.DPError as exc:
                raise ConfigError(f"sample-level DP cannot train this model with these settings: {exc}") from exc

    # ------------------------------------------------------------------ rounds
    def run(self, rounds: int | None = None, *, on_budget: str = "stop") -> list[dict[str, Any]]:
        """Run until ``rounds`` rounds are done in total (a resumed run continues).

        Before round 1 the cost estimate is logged (logger ``"fedcore"``), and warned about
        (:class:`CostWarning`) when a client would upload more than 100 MB a round or the round
        would need more than half of this machine's memory.

        Unless the federation is ``quiet``, shows a progress bar (a widget in Jupyter, on a
        terminal a text bar) and prints one line per round (``round t/T (seconds)`` and the
        round's test metrics and epsilon), the same line ``fedcore run`` prints.

        Args:
            rounds: total number of rounds (default: the ``rounds`` the federation was built with).
            on_budget: ``"stop"`` ends training cleanly when the next round would exceed the
                privacy budget (the reason is kept in ``stop_reason`` and warned about);
                ``"raise"`` re-raises.

        Raises:
            ConfigError: no rounds given, or more rounds than a calibrated ``target_epsilon`` covers.
        """
        if on_budget not in ("stop", "raise"):
            raise ConfigError(f"on_budget must be 'stop' or 'raise', got {on_budget!r}")
        if rounds is None:
            if self.rounds is None:
                raise ConfigError("run() needs rounds: pass run(rounds) or build the federation with rounds=")
            rounds = self.rounds
        if self.calibration is not None and rounds > self.calibration["rounds"]:
            raise ConfigError(
                f"rounds={rounds} exceeds the {self.calibration['rounds']} rounds that sample_privacy's "
                f"target_epsilon={self.calibration['target_epsilon']!r} was calibrated over: every client would spend "
                f"more than the target; build the federation with rounds={rounds}"
            )
        if self.round_index == 0:
            self._announce_costs()
        bar = progress(total=rounds, desc="rounds", quiet=self.quiet)
        bar.update(self.round_index)
        console = None if self.quiet else ConsoleLogger(total_rounds=rounds)
        try:
            while self.round_index < rounds:
                try:
                    self.run_round()
                except dp.BudgetExceededError as exc:
                    if on_budget == "stop":
                        self.stop_reason = str(exc)
                        warnings.warn(f"training stopped before round {self.round_index + 1}: {exc}", stacklevel=2)
                        break
                    raise
                bar.update(1)
                last = self.history[-1]
                if console is not None:
                    console.log(self.round_index, last)
                bar.set_postfix({k: f"{v:.4f}" for k, v in last.items() if k.startswith("test_") and isinstance(v, float)})
        finally:
            bar.close()
        return self.history

    def transact(
        self, where: str, planned: Sequence[Any], body: Callable[[], tuple[np.ndarray, list[Any], dict[str, Any]]]
    ) -> dict[str, Any]:
        """The round transaction shared by synchronous and asynchronous rounds.

        Checks the budget against the ``planned`` events (nothing runs if they do not fit), runs
        ``body`` (which returns the new global vector, the events to record and the round's
        record), then commits the model and ledger together, or rolls the strategy back.

        Raises:
            dp.BudgetExceededError: the planned events would exceed the budget (nothing ran).
            RoundFailedError: the protected sum failed; nothing changed.
        """
        if self.budget is not None:
            self.budget.check(self.ledger, list(planned))
        strategy_before = self.strategy.state_dict()
        try:
            new_vector, events, record = body()
        except SecAggError as exc:
            self.strategy.load_state_dict(strategy_before)
            raise RoundFailedError(f"{where} failed and changed nothing: {exc}") from exc
        except BaseException:
            self.strategy.load_state_dict(strategy_before)
            raise
        self.global_vector = np.ascontiguousarray(new_vector, dtype=np.float32)
        if self.ledger is not None:
            for event in events:
                self.ledger.record(event)
        return record

    def run_round(self) -> dict[str, Any]:
        """Run one synchronous round; on failure the model and the server optimizer are left as they were.

        A round that fails or is interrupted after its first update may have left a client (PROTECT or
        REVEAL) is charged at its planned worst case and its number is used up (the model is
        unchanged), unless it showed the server nothing (:meth:`revealed_nothing`: masking or
        encryption with too few survivors); one that fails before (every client failed in training)
        changes nothing. With ``checkpoint_dir`` the planned events are written beside the checkpoint
        at that point (:func:`~fedcore.rounds.checkpoint.save_begun_round`), so a run resumed after a
        crash in the round charges them too (see :meth:`restore`); a first round saves the starting
        state as a checkpoint before it runs, so a crash in it can be resumed (and charged) too.

        Raises:
            RoundFailedError: the protected sum failed (too few survivors, a bad message); charged as above.
            dp.BudgetExceededError: the round would exceed the privacy budget (nothing ran).
        """
        t = self.round_index + 1
        started = time.perf_counter()
        participants = self.sampler.sample(
            self.client_ids, self.randomness.generator(round_index=t, party="server", purpose="sampling")
        )
        rate = self.sampler.rate(len(self.client_ids))
        planned = self._planned_events(t, participants, rate)
        released = False  # from the first PROTECT or REVEAL on, updates may have left the clients
        if self.checkpoint_dir is not None and not (self.checkpoint_dir / "state.json").exists():
            self.save(self.checkpoint_dir)  # the starting state, for a resume after a crash in this round

        def body() -> tuple[np.ndarray, list[Any], dict[str, Any]]:
            nonlocal released
            record: dict[str, Any] = {"round": t, "participants": len(participants)}
            if not participants:
                record.update(contributors=0, dropped=0)
                return self.global_vector, [], record
            reports = self.train_clients(t, participants, version=self.round_index)
            ok = [c for c in participants if reports[c]["ok"]]
            failures = [f"{c}: {reports[c]['error']}" for c in participants if not reports[c]["ok"]]
            if not ok:
                raise RoundFailedError(f"round {t}: every participant failed or dropped; first failure: {failures[0]}")
            self._write_ahead(t, planned)
            released = True
            round_events: list[Any] = []
            if self.reveals_models:
                new_vector, contributors, dropped = self._reveal_round(t, ok)
                record.update(contributors=contributors, dropped=dropped + len(failures))
            else:
                out = self.protected_sum(t, ok, participants=len(participants), sample_rate=rate, sampling=self._sampling())
                round_events = list(out.events)
                new_vector = self.strategy.apply(self.global_vector, out.aggregate)
                record.update(
                    contributors=out.aggregate.contributors,
                    dropped=len(out.sum_result.dropped) + len(failures),
                    bytes_up=float(sum(out.sum_result.bytes_up.values())),
                )
            record["failed"] = len(failures)
            record["client_train_seconds"] = float(sum(reports[c]["train_seconds"] for c in participants))
            events = [dp.event_from_dict(reports[c]["privacy_event"]) for c in ok if reports[c]["privacy_event"]]
            return new_vector, events + round_events, record

        try:
            record = self.transact(f"round {t}", planned, body)
        except BaseException as exc:
            if released and not self.revealed_nothing(exc):
                self._charge_unfinished(t, planned, folder=self.checkpoint_dir, error=f"{type(exc).__name__}: {exc}")
            elif released and self.checkpoint_dir is not None:
                clear_begun_round(self.checkpoint_dir)
            raise
        self.round_index = t
        self._finish_record(t, record, started, key="round_seconds")
        self.history.append(record)
        if self.checkpoint_dir is not None:
            self.save(self.checkpoint_dir)
            clear_begun_round(self.checkpoint_dir)
        return record

    def _finish_record(self, t: int, record: dict[str, Any], started: float, *, key: str) -> None:
        """Epsilon so far, the federated evaluation and timing; then log the record."""
        if self.budget is not None:
            record["epsilon"] = float(self.budget.spent(self.ledger))
        if self.evaluate_every and (t % self.evaluate_every == 0):
            record.update({f"test_{k}": v for k, v in self.evaluate("test").items()})
        record[key] = time.perf_counter() - started
        if self.logger is not None:
            self.logger.log(t, record)

    def train_clients(self, t: int, participants: Sequence[str], *, version: int) -> dict[str, dict[str, Any]]:
        """Send the global model to ``participants``; return each one's training report.

        A participant the channel got no answer from (a client process that died or missed its
        deadline) has a failed report: it is a dropout before its masked input.

        Raises:
            RoundFailedError: a malformed report.
        """
        model = msg.encode(msg.Kind.TRAIN, {"round": t, "version": version}, self.global_vector)
        replies = self.channel.exchange({cid: model for cid in participants})
        reports: dict[str, dict[str, Any]] = {}
        for cid in participants:
            reply = replies.get(cid)
            if reply is None:
                reports[cid] = {"client": cid, "round": t, "ok": False, "error": "no answer", "train_seconds": 0.0,
                                "steps": 0, "metrics": {}, "privacy_event": None}  # fmt: skip
                continue
            header = msg.decode(reply, expect=msg.Kind.TRAIN_REPORT).header
            if header.get("client") != cid or header.get("round") != t:
                raise RoundFailedError(
                    f"round {t}: {cid!r} answered with a report of {header.get('client')!r} for round {header.get('round')}"
                )
            reports[cid] = header
        return reports

    def protected_sum(
        self,
        t: int,
        ids: Sequence[str],
        *,
        staleness: Mapping[str, float] | None = None,
        participants: int | None = None,
        sample_rate: float = 1.0,
        sampling: str = "poisson",
    ) -> RoundAggregate:
        """Run one protection session with clients ``ids`` (who hold trained updates) and average.

        Each client prepares its own input (clip at the announced bound, staleness weight, example
        weight, quantile bit) and answers the session's messages; the server receives protocol
        bytes only. ``participants``, ``sample_rate`` and ``sampling`` describe the round for its
        ledger events (``participants`` defaults to ``len(ids)``).

        Raises:
            secagg.DropoutError: too few clients survived (nothing is revealed).
            secagg.ProtocolError: a message broke the protocol.
        """
        ids = sorted(ids)
        weights = dict(staleness or {})
        backend = self.pipeline.backend
        he = hasattr(backend, "key_holder_session")
        if he:  # this round's keys: the server gets the public context, each client its own from the key holder
            self.public_context = self.channel.send(KEY_HOLDER, msg.encode(msg.Kind.KEYS, {"round": t}))
        elif self.public_keys:  # signed masking: the identity directory the server checks signatures with
            self.public_context = cast(MaskedSum, backend).public_context(self.public_keys)
        dropouts = self.dropouts.draw(ids, self._rng(t, _STREAM_DROPOUT)) if self.dropouts else {}
        clip_bound = self.pipeline.broadcast_bound()
        requests = {
            cid: msg.encode(
                msg.Kind.PROTECT,
                {
                    "round": t,
                    "participants": ids,
                    "staleness_weight": weights.get(cid, 1.0),
                    "clip_bound": clip_bound,
                },
            )  # fmt: skip
            for cid in ids
        }
        for cid, reply in self.channel.exchange(requests).items():
            if reply is None:  # gone before its session began: silent from the first stage
                dropouts[cid] = Stage.ADVERTISE_KEYS
            else:
                msg.decode(reply, expect=msg.Kind.ACK)
        session = self.pipeline.backend.server_session(
            round_index=t, participants=ids, length=self.pipeline.vector_length(self.layout.size),
            public_context=self.public_context,
        )  # fmt: skip
        parties: dict[str, Respond] = {cid: functools.partial(self.channel.send, cid) for cid in ids}
        if he:
            parties[KEY_HOLDER] = functools.partial(self.channel.send, KEY_HOLDER)
        summed = drive_round(session, parties, dropouts=dropouts, deliver=self.channel.exchange)
        noise_rng = self.randomness.generator(round_index=t, party="server", purpose="central-noise")
        n = len(ids) if participants is None else participants
        return self.pipeline.finish(
            summed, round_index=t, rng=noise_rng, participants=n, sample_rate=sample_rate, sampling=sampling
        )

    def client_updates(self, client_ids: Sequence[str] | None = None) -> list[ClientResult]:
        """What the given clients (default: all) would hand to the protection pipeline next round.

        A simulation-only window into the client parties, for notebooks and tests: it runs their
        local training from the current global model and returns the raw results (update before
        clipping, example count, metrics). Changes nothing: local states are put back and no round,
        ledger event or checkpoint is recorded. No server-side code path calls it: the updates
        are exactly what masking or encryption exist to hide from the server.

        Raises:
            ConfigError: an id that is not one of the federation's clients.
        """
        if self.client_side is None:
            raise ConfigError(
                "client_updates needs in-process client parties; this federation's clients are remote or on Ray actors"
            )
        ids = list(self.client_ids if client_ids is None else client_ids)
        unknown = [c for c in ids if c not in self.clients]
        if unknown or not ids:
            raise ConfigError(f"client_ids must name clients of this federation, got unknown {unknown[:5]} of {len(ids)}")
        return self.client_side.inspect(self.round_index + 1, ids, self.global_vector)

    def _reveal_round(self, t: int, ids: list[str]) -> tuple[np.ndarray, int, int]:
        """Model selection or ensembles: the alive clients send their local models in the clear."""
        dropouts = self.dropouts.draw(ids, self._rng(t, _STREAM_DROPOUT)) if self.dropouts else {}
        alive = [c for c in ids if dropouts.get(c, Stage.UNMASK) > Stage.MASKED_INPUT]  # it sent its input
        if not alive:
            raise RoundFailedError(f"round {t}: every participant dropped out; nothing to select from")
        replies = self.channel.exchange({cid: msg.encode(msg.Kind.REVEAL, {"round": t}) for cid in alive})
        # recorded as soon as the models are here: a round that fails after this still revealed them
        self.reveals.append(
            Reveal(t, tuple(alive), what=f"local models ({self.strategy.name})", why_allowed=self._reveal_basis())
        )
        local_models = []
        for cid in alive:
            revealed = msg.decode(replies.get(cid) or b"", expect=msg.Kind.REVEALED)
            if revealed.payload.size != self.layout.size:
                raise RoundFailedError(
                    f"round {t}: {cid!r} revealed {revealed.payload.size} coordinates, the model has {self.layout.size}"
                )
            local_models.append(LocalModel(
                cid, self.global_vector + revealed.payload, float(revealed.header["num_examples"]), revealed.header["metrics"]
            ))  # fmt: skip
        new_vector = self.strategy.combine(self.global_vector, local_models)
        return new_vector, len(alive), len(ids) - len(alive)

    def _reveal_basis(self) -> str:
        if self.sample_privacy is not None:
            return "each revealed model is covered by sample-level DP-SGD"
        return "the user opted out of protection for this strategy (allow_reveal=True)"

    def _sampling(self) -> str:
        return "poisson" if self.sampler.poisson else "fixed_size"

    def min_survivors(self, participants: int) -> int:
        """The fewest clients whose inputs the protection mode lets a round be completed with.

        Budgets are checked against it: the noise a round adds is planned for the worst case the
        protocol allows, not for every participant surviving.
        """
        plan = getattr(self.pipeline.backend, "plan", None)
        return int(plan(participants).threshold) if plan is not None else participants

    def _planned_events(self, t: int, participants: list[str], rate: float) -> list[Any]:
        """The ledger events the round would record, for the budget check before it runs.

        Sample-level events assume every planned step is taken (early stopping only spends less);
        client-level events assume the fewest survivors the protocol allows.
        """
        events: list[Any] = []
        if isinstance(self.sample_privacy, dp.SampleLevelDP):
            clipping = dp.resolve_clipping(self.executor_model(), self.sample_privacy.clipping)
            for cid in participants:
                events.append(
                    planned_sample_event(
                        self.sample_privacy, self.train, client_id=cid, round_index=t,
                        num_examples=self.declared_sizes[cid], clipping=clipping,
                    )
                )  # fmt: skip
        if participants and not self.reveals_models:
            n = len(participants)
            events += self.pipeline.planned_events(
                round_index=t, participants=n, survivors=self.min_survivors(n), sample_rate=rate, sampling=self._sampling()
            )
        return events

    def executor_model(self) -> torch.nn.Module:
        """The model instance local training runs on (for inspecting its layers)."""
        workspace = getattr(self.executor, "workspace", None)
        return workspace.model if workspace is not None else self.model()

    def _rng(self, t: int, stream: int) -> np.random.Generator:
        """The simulation's own randomness (dropouts): from ``seed``, never a privacy mechanism's."""
        return np.random.default_rng(np.random.SeedSequence([self.seed, t, stream]))

    # ------------------------------------------------------------ costs and report
    def estimate_costs(self) -> CostEstimate:
        """Upload bytes, peak memory and time of one round, estimated before it runs.

        The upload comes from the protection backend's own messages on small zero vectors,
        extrapolated to the model (see :mod:`fedcore.rounds.costs`); memory and time are coarser
        models (see :class:`~fedcore.rounds.costs.CostEstimate`). Computed once at construction
        (:attr:`costs`) and logged before round 1.
        """
        n = len(self.client_ids)
        participants = max(1, round(self.sampler.rate(n) * n))
        length = self.pipeline.vector_length(self.layout.size)
        backend = self.pipeline.backend
        if self.reveals_models:  # the local model in the clear, nothing else
            client = float(len(msg.encode(msg.Kind.REVEALED, {"round": 1, "client": "c", "num_examples": 1.0, "metrics": {}})))
            client += 4 * self.layout.size
            holder, protect_seconds = 0.0, 0.0
        else:
            probe = probe_protection(backend, participants)
            client, holder = upload_per_client(probe, coordinates=length, degree=protection_degree(backend, participants))
            protect_seconds = probe.seconds_per_unit * math.ceil(length / probe.unit) * participants
        planned = self._planned_events(1, self.client_ids[:1], 1.0) if self.sample_privacy is not None else []
        event = dp.event_to_dict(planned[0]) if planned and isinstance(planned[0], dp.SampleLevelEvent) else None
        metrics = len(getattr(self.task, "metric_names", ())) or 3
        report, scores = message_bytes(privacy_event=event, metrics=metrics)
        own = report + (scores / self.evaluate_every if self.evaluate_every else 0.0)
        per_client = int(round(client + own))
        model = self.executor_model()
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        steps = self.train.dp_schedule(int(np.mean(list(self.declared_sizes.values()))))[0]
        step_seconds = self._step_seconds() * (3.0 if self.sample_privacy is not None else 1.0)
        return CostEstimate(
            mode=backend.mode,
            dimension=self.layout.size,
            coordinates=length,
            participants=participants,
            upload_bytes_per_client=per_client,
            key_holder_bytes=int(round(holder)),
            upload_bytes_per_round=int(round(per_client * participants + holder)),
            peak_memory_bytes=peak_memory(
                trained=trained,
                coordinates=length,
                participants=participants,
                upload_per_client=client,
                key_holder_bytes=holder,
                batch_size=self.train.batch_size,
                optimizer=self.train.optimizer,
                private=self.sample_privacy is not None,
                per_example_gradients=isinstance(self.sample_privacy, dp.SampleLevelDP)
                and dp.resolve_clipping(model, self.sample_privacy.clipping) == "default",
                homomorphic=hasattr(backend, "key_holder_session"),
            ),
            seconds_per_round=participants * steps * step_seconds + protect_seconds,
            rounds=self.rounds,
        )

    def _step_seconds(self) -> float:
        """A forward and backward pass on a few examples, timed and scaled to a batch (NaN if the loss raises).

        Runs on the executor's model in eval mode (no dropout, no running statistics moved) and
        clears the gradients it made, so the model is left as it was.
        """
        data = self._probe.data.train
        n = max(1, min(len(data), self.train.batch_size, _TIMED_EXAMPLES))  # type: ignore[arg-type]
        batch = self.task.collate([data[i] for i in range(n)])
        model = self.executor_model()
        training = model.training
        model.eval()
        try:
            with torch.random.fork_rng():
                started = time.perf_counter()
                self.task.loss(model, batch).mean().backward()
                return (time.perf_counter() - started) * self.train.batch_size / n
        except Exception:  # a client's failure, reported in its round; the time is then unknown
            return math.nan
        finally:
            model.zero_grad(set_to_none=True)
            model.train(training)

    def _announce_costs(self) -> None:
        costs = self.costs
        _LOG.info(costs.summary())
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
        if costs.upload_bytes_per_client > WARN_UPLOAD_BYTES or (memory and costs.peak_memory_bytes > memory / 2):
            warnings.warn(f"an expensive run: {costs.summary()}", CostWarning, stacklevel=3)

    def report(
        self,
        *,
        delta: float | None = None,
        accountant: str | None = None,
        unit_of_privacy: str | None = None,
        description: str | None = None,
        audit: Any = None,
        provenance: Mapping[str, Any] | None = None,
        title: str = "Privacy budget report",
        ledger: dp.Ledger | None = None,
        budget: dp.PrivacyBudget | None = None,
        tuning: dict[str, Any] | None = None,
    ) -> dp.PrivacyReport:
        """The privacy budget report of the run so far, read from the ledger.

        Mode and trust model come from the protection backend, the unit of privacy from the
        mechanisms in use, and the report lists what the run released outside any DP guarantee
        and whether its noise was derivable from the seed.

        Args:
            delta: the delta epsilons are stated at (default: ``sample_privacy.delta``, else the
                budget's).
            accountant: default: the budget's, else ``sample_privacy``'s, else PLD.
            unit_of_privacy: overrides the unit derived from the mechanisms.
            description: what the data and partition are (shown with the protection).
            provenance: hashes and identities to state (config, data, base model, shared parameters).
            audit: a ``dp.audit.AuditResult`` of this run's DP (``dp.audit.audit_dp_sgd`` on its ledger's
                events), stated in the report beside the claim it tested.
            ledger, budget, tuning: a private search (``fedcore.tune``) reports its selected run
                with the search's ledger and budget and a description of the search.

        Raises:
            ConfigError: no ledger, or no delta to state epsilons at.
        """
        ledger = self.ledger if ledger is None else ledger
        budget = self.budget if budget is None else budget
        if ledger is None:
            raise ConfigError("report() reads what was spent from the ledger: build the federation with ledger=dp.Ledger()")
        delta = delta if delta is not None else getattr(self.sample_privacy, "delta", None)
        delta = delta if delta is not None else getattr(budget, "delta", None)
        if delta is None:
            raise ConfigError("report() needs the delta to state epsilons at: pass report(delta=...)")
        if accountant is None:
            accountant = getattr(budget, "accountant", None) or getattr(self.sample_privacy, "accountant", None) or "pld"
        backend = self.pipeline.backend
        protection = self.pipeline.describe()
        if description is not None:
            protection["workload"] = description
        return dp.PrivacyReport(
            ledger,
            delta=delta,
            accountant=accountant,
            mode=backend.mode,
            trust_model=backend.trust_model,
            secure_aggregation=protection,
            dropouts={int(h["round"]): int(h.get("dropped", 0)) for h in self.history if not h.get("interrupted")},
            reveals=[
                dp.Reveal(round_index=r.round_index, what=f"{r.what}: {', '.join(r.client_ids)}", why=r.why_allowed)
                for r in self.reveals
            ],
            utility={int(h["round"]): {k[5:]: float(v) for k, v in h.items() if k.startswith("test_")} for h in self.history},
            audit=audit,
            budget=budget,
            unit_of_privacy=unit_of_privacy or self._unit_of_privacy(),
            non_private_releases=self._non_private_releases(),
            seed_derivable=self.randomness.reproducible,
            provenance=provenance,
            title=title,
            tuning=tuning,
        )

    def _check_users_across_silos(self, clients: Mapping[str, ClientData]) -> None:
        """User-level DP across silos holds only with one clipped gradient per user per round, in one silo.

        Raises:
            ConfigError: naming each setting that would let one user move the sum by more than
                the bound the noise is sized for, or its inclusion be accounted wrongly.
        """
        bound, clip = self.pipeline.user_bound, self.train.user_clip
        if bound is None and clip is None:
            return
        problems = []
        if bound != clip:
            problems.append(
                f"train.user_clip={clip!r} must equal the pipeline's user_bound={bound!r} (the bound the noise is sized for)"
            )
        if self.strategy.update_kind != "gradient":
            problems.append(
                f"strategy {self.strategy.name!r} sends {self.strategy.update_kind!r} updates; each silo's sum of per-user "
                "clipped gradients needs strategy.name = 'fedsgd' (update_kind 'gradient')"
            )
        if not isinstance(self.sampler, AllClients):
            problems.append(
                f"sampler {type(self.sampler).__name__} samples silos, which takes their users in or out together, not "
                "independently as the accountant assumes; user level needs sampling.kind = 'all' (AllClients)"
            )
        if self.sample_privacy is not None:
            problems.append("sample_privacy (DP-SGD inside the silos) cannot be combined with per-user clipped gradients")
        if self.client_deadline is not None:
            problems.append(
                f"client_deadline={self.client_deadline!r} makes a silo's dropout depend on its training time, so on its "
                "users' data; one user could take a whole silo's sum out of a round"
            )
        seen: dict[int, str] = {}
        for name in sorted(clients):
            users = getattr(clients[name].train, "users", None)
            if users is None:
                problems.append(f"client {name!r}'s training data does not say which users it holds (no .users)")
                continue
            for u in np.asarray(users).tolist():
                if u in seen:
                    problems.append(
                        f"user {u} is held by clients {seen[u]!r} and {name!r}: its gradient would enter the sum twice"
                    )
                    break
                seen[u] = name
        if problems:
            raise ConfigError("user-level DP across silos: " + "; ".join(problems))

    def _unit_of_privacy(self) -> str | None:
        if self.pipeline.user_bound is not None:
            return None  # the report names it from the ledger's events (unit "user")
        if self.pipeline.client_level_dp:
            return "a whole client (all of its data)"
        if self.sample_privacy is None:
            return None
        if getattr(self.sample_privacy, "unit", None) == "user":
            return "a user inside a silo (all of that user's examples)"
        return "one training example of a client (a record, where each example is built from that record alone)"

    def _non_private_releases(self) -> list[str]:
        """What the run released that no DP mechanism covers."""
        out = []
        if self.evaluate_every:
            out.append(
                "federated test metrics of every evaluated round, computed on the clients' held-out private data (the "
                "server receives each client's metrics and its number of evaluated examples)"
            )
        out.append("per-round counts of participants, contributors and dropouts, and bytes uploaded")
        out.append(
            "each client's local training metrics in its report of every round it trained (computed on its own data "
            "during local training, without noise)"
        )
        if self.sample_privacy is not None:
            out.append("each client's DP-SGD sampling rate and step count in its ledger events (they reveal its dataset size)")
        if self.reveals_models:
            out.append("individual local models revealed to the server for model selection or ensembles (listed under reveals)")
        if self.pipeline.weighting == "examples":
            out.append("the sum of the contributors' bounded example weights (the weight coordinate of the protected sum)")
        if self.pipeline.client_level_dp:
            out.append("each client's declared number of training examples (when it enrols) and its training time per round")
        local = getattr(self.task, "local_only", ())
        if local:
            what = ", ".join(local) if isinstance(local, (tuple, list)) else "the task's local_only"
            out.append(
                f"the clients' local-only parameters ({what}): never sent, trained on their "
                "owner's data without noise; they and what is computed from them (the owner's own scores and metrics) "
                "are protected only from the other parties"
            )
        return out

    # ------------------------------------------------------------ evaluation
    def evaluate(self, split: str = "test") -> dict[str, float]:
        """Federated evaluation: each client scores the global model, means weighted by examples.

        Each client's scores are a release to the server that no DP mechanism covers (the
        report lists them). A client whose metric is undefined (NaN: ROC AUC on a test split of
        one class) is left out of that metric's mean. A mean of per-client AUCs is not the AUC of
        the pooled predictions: for a model without local-only parameters, score ``self.model()``
        on pooled data instead.
        """
        if split not in HELD_OUT_SPLITS:
            raise ConfigError(f"split must be one of the clients' held-out splits {HELD_OUT_SPLITS}, got {split!r}")
        request = msg.encode(msg.Kind.EVALUATE, {"split": split}, self.global_vector)
        replies = self.channel.exchange({cid: request for cid in self.client_ids})
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        for cid in self.client_ids:
            reply = replies.get(cid)
            if reply is None:  # a client that did not answer is left out of the means
                continue
            scores = msg.decode(reply, expect=msg.Kind.SCORES).header
            n = int(scores["count"])
            for k, v in scores["metrics"].items():
                totals[k] = totals.get(k, 0.0) + float(v) * n
                counts[k] = counts.get(k, 0) + n
        return {k: totals[k] / counts[k] for k in sorted(totals) if counts[k]}

    def noised_score(self, *, metric: str, noise_multiplier: float, per: str, split: str = "validation") -> float:
        """A Gaussian-noised score of the global model, each client noising its own before it leaves.

        ``per="sum"``: each client sends the sum of a per-example ``metric`` in [0, 1] plus
        ``N(0, noise_multiplier^2)``; the result is the sum of those over the total example count
        (the counts are sent in the clear). ``per="mean"``: each client sends its mean plus the same
        noise; the result is their plain mean. Either way one unit of privacy (an example or a user
        with one held-out item; a whole client for ``"mean"``) moves each sent value by at most 1,
        so each client's value is a Gaussian mechanism of sensitivity 1 (``dp.TuningEvent``).
        """
        if per not in ("sum", "mean"):
            raise ConfigError(f"per must be 'sum' or 'mean', got {per!r}")
        if split not in HELD_OUT_SPLITS:
            raise ConfigError(f"split must be one of the clients' held-out splits {HELD_OUT_SPLITS}, got {split!r}")
        noise = {"metric": metric, "multiplier": float(noise_multiplier), "per": per, "round": self.round_index}
        request = msg.encode(msg.Kind.EVALUATE, {"split": split, "noise": noise}, self.global_vector)
        replies = self.channel.exchange({cid: request for cid in self.client_ids})
        noised, count = 0.0, 0
        for cid in self.client_ids:
            header = msg.decode(replies.get(cid) or b"", expect=msg.Kind.SCORES).header
            noised += float(header["noised"])
            count += int(header["count"]) if per == "sum" else 1
        if count == 0:
            raise ConfigError(f"no client holds {split!r} examples to score")
        return noised / count

    def model(self) -> torch.nn.Module:
        """A fresh model holding the global shared parameters (local-only ones at their initial values)."""
        torch.manual_seed(self.seed)
        model = self.task.build_model()
        self.layout.load_into(model, torch.from_numpy(self.global_vector))
        return model

    # ------------------------------------------------------------ checkpoints
    def save(self, folder: str | Path) -> Path:
        """Write the server party's checkpoint to ``folder``, and each client party's local state to its own file.

        The client parties' files go to :meth:`client_folder` (a stand-in for each client's disk):
        local-only parameters never enter the server's checkpoint.
        """
        folder = Path(folder)
        if self.client_side is not None:
            self.client_side.save_states(self.client_folder(folder))
        hosted = getattr(self.channel, "save_local_states", None)
        if hosted is not None:  # parties hosted elsewhere write their own files
            hosted(self.client_folder(folder))
        return save_checkpoint(
            folder,
            Checkpoint(
                round_index=self.round_index,
                seed=self.seed,
                global_vector=self.global_vector,
                strategy_state=self.strategy.state_dict(),
                history=self.history,
                ledger_json=self.ledger.to_json() if self.ledger is not None else None,
                extra={"strategy": self.strategy.name, "stop_reason": self.stop_reason, "protection": self._protection()},
            ),
        )

    @staticmethod
    def client_folder(folder: str | Path) -> Path:
        """Where the simulated client parties keep their local state beside a checkpoint ``folder``."""
        folder = Path(folder)
        return folder.with_name(folder.name + "-clients")

    def _protection(self) -> dict[str, Any]:
        """What a resumed run must not change: the pipeline's stages, the DP mechanism and the budget.

        A recalibrated noise multiplier may change: each round's event records its own.
        """
        sample = self.sample_privacy
        return json.loads(json.dumps({
            "pipeline": self.pipeline.fingerprint(),
            "sample_privacy": None if sample is None else [type(sample).__name__, getattr(sample, "max_grad_norm", None)],
            "budget": None if self.budget is None else repr(self.budget),
            "reproducible": self.randomness.reproducible,
        }, default=str))  # fmt: skip

    def restore(self, folder: str | Path) -> None:
        """Resume from a checkpoint written by a federation built with the same settings.

        A round that began after the checkpoint and did not finish (the server died in it) is
        charged at its planned worst case and its number is not used again.

        Raises:
            ConfigError: the checkpoint belongs to another seed, strategy, model size or
                protection (pipeline, DP settings, budget), or a file was changed.
        """
        ckpt = load_checkpoint(folder)
        if ckpt.seed != self.seed:
            raise ConfigError(f"checkpoint seed {ckpt.seed} differs from this federation's seed {self.seed}")
        if ckpt.extra.get("strategy") != self.strategy.name:
            raise ConfigError(f"checkpoint strategy {ckpt.extra.get('strategy')!r} differs from {self.strategy.name!r}")
        if ckpt.extra.get("protection") != self._protection():
            raise ConfigError(
                f"checkpoint protection {ckpt.extra.get('protection')!r} differs from this federation's "
                f"{self._protection()!r}: a resumed run must keep the protection and privacy settings it started with"
            )
        if ckpt.global_vector.shape != (self.layout.size,):
            raise ConfigError(f"checkpoint vector has shape {ckpt.global_vector.shape}, the model needs ({self.layout.size},)")
        hosted = getattr(self.channel, "load_local_states", None)
        if self.client_side is not None:
            unknown = saved_client_ids(self.client_folder(folder)) - set(self.clients)
            if unknown:
                raise ConfigError(f"checkpoint holds clients this federation lacks: {sorted(unknown)[:5]}")
            self.client_side.load_states(self.client_folder(folder))
        self.strategy.load_state_dict(ckpt.strategy_state)
        self.global_vector = ckpt.global_vector.astype(np.float32)
        if hosted is not None:  # parties hosted elsewhere read their own files
            hosted(self.client_folder(folder))
        self.history = list(ckpt.history)
        self.round_index = ckpt.round_index
        if self.ledger is not None and ckpt.ledger_json is not None:
            self.ledger = type(self.ledger).from_json(ckpt.ledger_json)
        begun = load_begun_round(folder)
        if begun is not None and begun.round_index > ckpt.round_index:  # the server died in that round
            events = [dp.event_from_dict(e) for e in begun.events]
            self._charge_unfinished(begun.round_index, events, folder=folder, error="the server stopped in this round")

    def revealed_nothing(self, exc: BaseException) -> bool:
        """Whether a round that failed with ``exc`` after its first update left showed the server nothing.

        Only masking or encryption with too few survivors (``secagg.DropoutError``): the server cannot
        rebuild the sum from fewer inputs than the threshold. Anything else after the first update left
        (a plaintext or revealed update, a refused message once enough unmasking answers may be in, a
        failure after the sum, an interruption) may have shown something.
        """
        return (
            self.pipeline.backend.mode != "plaintext"
            and isinstance(exc, RoundFailedError)
            and isinstance(exc.__cause__, DropoutError)
        )

    def _write_ahead(self, t: int, planned: Sequence[Any]) -> None:
        """Before round ``t``'s first update leaves a client: its planned events beside the checkpoint."""
        if self.checkpoint_dir is not None:
            save_begun_round(self.checkpoint_dir, BegunRound(t, [dp.event_to_dict(e) for e in planned]))

    def _charge_unfinished(self, t: int, events: Sequence[Any], *, folder: str | Path | None, error: str) -> None:
        """Round ``t`` did not finish after its updates may have left the clients: charge ``events``, use up ``t``.

        The round counts as run at its planned worst case (its clients may have released noised
        updates to the server); the model stays as it was and the next round gets a new number, whose
        fresh noise is charged as a round of its own. With ``folder``, the checkpoint is written at
        once and the write-ahead record removed, so a later crash does not charge the round twice.
        """
        if self.ledger is not None:
            for event in events:
                self.ledger.record(event)
        self.round_index = t
        record: dict[str, Any] = {"round": t, "interrupted": True, "charged_events": len(events), "error": error[:300]}
        if self.budget is not None:
            record["epsilon"] = float(self.budget.spent(self.ledger))
        self.history.append(record)
        if folder is not None:
            self.save(folder)
            clear_begun_round(folder)
