"""The server side of synchronous rounds: sampling, protection, strategy, ledger, checkpoints."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

import dp
from secagg import SecAggError, Stage

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .client import Client, ClientResult, check_results, round_seed
from .errors import ConfigError, RoundFailedError
from .executors import Executor, InProcessExecutor
from .layout import ParameterLayout
from .observability import MetricsLogger, progress
from .pipeline import UpdatePipeline
from .sampling import AllClients, ClientSampler
from .strategies import LocalModel
from .task import ClientData, Task
from .training import SampleLevelPrivacy, TrainConfig

__all__ = ["Federation", "DropoutSimulator", "Reveal"]

_STREAM_SAMPLE, _STREAM_PIPELINE, _STREAM_DROPOUT = 1, 2, 3


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


class Federation:
    """A federated experiment: clients, the update pipeline, a strategy, and their history.

    The server holds the global vector, the strategy's state, the privacy ledger and the
    history; clients hold their data and local-only parameters. Every random choice derives
    from ``seed`` and the round index, so a run is deterministic and a resumed run reaches the
    same model bit for bit. With ``seed=None`` the seed is drawn from the OS (as a real
    deployment should, so that noise is unpredictable).

    Args:
        task: the workload.
        clients: client id -> its data.
        strategy: a ``Strategy`` (FedAvg, FedAdam...) or a revealing one (ModelSelection...).
        train: local training settings.
        pipeline: clip, weighting, protection backend, central noise (default: plaintext,
            example-count weights bounded by the largest client).
        sampler: which clients take part each round (default: all).
        sample_privacy: sample-level DP-SGD for local training (``dp.SampleLevelDP``).
        ledger: privacy ledger receiving every mechanism use (``dp.Ledger``).
        budget: optional ``dp.PrivacyBudget`` checked before each round.
        executor: where client work runs (default: in process).
        dropouts: optional dropout simulation.
        allow_reveal: the user's explicit consent to revealing individual models, needed by
            model selection and output ensembles unless sample-level DP covers them.
        logger: receives metrics per round.
        client_deadline: seconds of local work after which a client's result is discarded and
            the client counts as dropped (a client that raises counts as dropped too).
        checkpoint_dir: if set, a checkpoint is written after every round.
        evaluate_every: rounds between federated evaluations on the clients' test splits.
        quiet: no progress bars.
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
        executor: Executor | None = None,
        dropouts: DropoutSimulator | None = None,
        allow_reveal: bool = False,
        logger: MetricsLogger | None = None,
        client_deadline: float | None = None,
        checkpoint_dir: str | Path | None = None,
        evaluate_every: int = 1,
        seed: int | None = 0,
        quiet: bool = False,
    ) -> None:
        if not clients:
            raise ConfigError("clients must hold at least one client, got none")
        if evaluate_every < 0:
            raise ConfigError(f"evaluate_every must be >= 0 (0 = never), got {evaluate_every!r}")
        self.task = task
        self.clients = {cid: Client(cid, data) for cid, data in clients.items()}
        self.client_ids = sorted(self.clients)
        self.strategy = strategy
        self.train = train
        self.sampler: ClientSampler = sampler or AllClients()
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
        self.quiet = quiet
        torch.manual_seed(self.seed)
        initial_model = task.build_model()
        self.layout = ParameterLayout(initial_model, local_only=task.local_only)
        self.global_vector = self.layout.flatten(initial_model).numpy()
        self.executor: Executor = executor or InProcessExecutor(task, device=train.device)
        getattr(self.executor, "workspace", None)  # build a lazy workspace now, at a fixed point of torch's RNG
        if pipeline is None:
            largest = max(c.data.num_train for c in self.clients.values())
            pipeline = UpdatePipeline(max_examples=largest)
        self.pipeline = pipeline
        self.reveals: list[Reveal] = []
        self.history: list[dict[str, Any]] = []
        self.round_index = 0
        self.stop_reason: str | None = None
        self._revealing = hasattr(strategy, "combine")
        if self._revealing and not (allow_reveal or sample_privacy is not None):
            raise ConfigError(
                f"strategy {strategy.name!r} reveals individual local models to the server "
                f"({strategy.reveal_reason}); allow it with allow_reveal=True or cover the models with "
                "sample-level DP (sample_privacy=...)"
            )
        if self._revealing and pipeline.backend.mode != "plaintext":
            raise ConfigError(
                f"strategy {strategy.name!r} needs individual local models, which {pipeline.backend.mode!r} "
                "aggregation exists to hide; use aggregation 'plaintext' with it"
            )
        expected = self.sampler.rate(len(self.clients)) * len(self.clients)
        pipeline.build(dimension=self.layout.size, num_clients=len(self.clients), expected_clients=expected)
        if sample_privacy is not None:
            self._check_sample_privacy(initial_model)

    def _check_sample_privacy(self, model: torch.nn.Module) -> None:
        """Attach DP-SGD once to a fresh model, so that a setting it refuses fails here.

        Otherwise every client would raise the same error in round 1 and count as a dropout.
        """
        assert self.sample_privacy is not None
        data = self.clients[self.client_ids[0]].data.train
        optimizer = self.train.make_optimizer([p for p in model.parameters() if p.requires_grad])
        loader = torch.utils.data.DataLoader(data, batch_size=self.train.batch_size, collate_fn=self.task.collate)
        with torch.random.fork_rng():
            try:
                self.sample_privacy.attach(model, optimizer, loader).detach()
            except dp.DPError as exc:
                raise ConfigError(f"sample-level DP cannot train this model with these settings: {exc}") from exc

    # ------------------------------------------------------------------ rounds
    def run(self, rounds: int, *, on_budget: str = "stop") -> list[dict[str, Any]]:
        """Run until ``rounds`` rounds are done in total (a resumed run continues).

        Args:
            rounds: total number of rounds.
            on_budget: ``"stop"`` ends training cleanly when the next round would exceed the
                privacy budget (the reason is kept in ``stop_reason``); ``"raise"`` re-raises.
        """
        if on_budget not in ("stop", "raise"):
            raise ConfigError(f"on_budget must be 'stop' or 'raise', got {on_budget!r}")
        bar = progress(total=rounds, desc="rounds", quiet=self.quiet)
        bar.update(self.round_index)
        try:
            while self.round_index < rounds:
                try:
                    self.run_round()
                except dp.BudgetExceededError as exc:
                    if on_budget == "stop" and isinstance(exc, dp.BudgetExceededError):
                        self.stop_reason = str(exc)
                        break
                    raise
                bar.update(1)
                last = self.history[-1]
                bar.set_postfix({k: f"{v:.4f}" for k, v in last.items() if k.startswith("test_") and isinstance(v, float)})
        finally:
            bar.close()
        return self.history

    def run_round(self) -> dict[str, Any]:
        """Run one synchronous round; on failure the server state is left as it was.

        Raises:
            RoundFailedError: the protected sum failed (too few survivors, a bad message).
            dp.BudgetExceededError: the round would exceed the privacy budget (nothing ran).
        """
        t = self.round_index + 1
        started = time.perf_counter()
        participants = self.sampler.sample(self.client_ids, self._rng(t, _STREAM_SAMPLE))
        rate = self.sampler.rate(len(self.clients))
        planned = self._planned_events(t, participants, rate)
        if self.budget is not None and self.ledger is not None:
            self.budget.check(self.ledger, planned)

        record: dict[str, Any] = {"round": t, "participants": len(participants)}
        global_tensor = torch.from_numpy(self.global_vector)
        strategy_before = self.strategy.state_dict()
        try:
            if participants:
                results = self._fit(t, participants, global_tensor)
                check_results(results, participants=participants, dimension=self.global_vector.size, round_index=t)
                new_vector, extra = self._combine(t, results)
                record.update(extra)
                record["train_examples"] = float(sum(r.num_examples for r in results))
                record["client_train_seconds"] = float(sum(r.train_seconds for r in results))
                events = [r.privacy_event for r in results if r.privacy_event is not None]
            else:
                new_vector, events = self.global_vector, []
                record.update(contributors=0, dropped=0)
            if participants:
                events += self._client_level_events(
                    t, rate, participants=len(participants), survivors=int(record["contributors"])
                )
        except SecAggError as exc:
            self.strategy.load_state_dict(strategy_before)
            raise RoundFailedError(f"round {t} failed and changed nothing: {exc}") from exc
        except BaseException:
            self.strategy.load_state_dict(strategy_before)
            raise

        # commit: nothing below can leave a half-applied round
        self.global_vector = np.ascontiguousarray(new_vector, dtype=np.float32)
        if self.ledger is not None:
            for event in events:
                self.ledger.record(event)
        self.round_index = t
        if self.budget is not None and self.ledger is not None:
            record["epsilon"] = float(self.budget.spent(self.ledger))
        if self.evaluate_every and (t % self.evaluate_every == 0):
            record.update({f"test_{k}": v for k, v in self.evaluate("test").items()})
        record["round_seconds"] = time.perf_counter() - started
        self.history.append(record)
        if self.logger is not None:
            self.logger.log(t, record)
        if self.checkpoint_dir is not None:
            self.save(self.checkpoint_dir)
        return record

    def client_updates(self, client_ids: Sequence[str] | None = None) -> list[ClientResult]:
        """What the given clients (default: all) would hand to the protection pipeline next round.

        Runs their local training from the current global model with the next round's seeds and
        returns the raw results (update before clipping, example count, metrics), for inspection
        in a notebook or a test. Changes nothing: local states are put back and no round,
        ledger event or checkpoint is recorded. Only a simulation can do this: the updates are
        exactly what masking or encryption exist to hide from the server.

        Raises:
            ConfigError: an id that is not one of the federation's clients.
        """
        ids = list(self.client_ids if client_ids is None else client_ids)
        unknown = [c for c in ids if c not in self.clients]
        if unknown or not ids:
            raise ConfigError(f"client_ids must name clients of this federation, got unknown {unknown[:5]} of {len(ids)}")
        before = {c: self.clients[c].local_state for c in ids}
        try:
            return self._fit(self.round_index + 1, ids, torch.from_numpy(self.global_vector))
        finally:
            for c, state in before.items():
                self.clients[c].local_state = state

    def _fit(self, t: int, participants: list[str], global_tensor: torch.Tensor) -> list[ClientResult]:
        seeds = [round_seed(self.seed, t, c) for c in participants]
        clients = [self.clients[c] for c in participants]
        bar = progress(total=len(clients), desc=f"round {t} clients", quiet=self.quiet or len(clients) < 20, leave=False)
        try:
            kwargs: dict[str, Any] = {}
            if isinstance(self.executor, InProcessExecutor):
                kwargs["progress"] = bar
            return self.executor.fit(
                clients,
                global_vector=global_tensor,
                config=self.train,
                seeds=seeds,
                round_index=t,
                update_kind=self.strategy.update_kind,
                privacy=self.sample_privacy,
                **kwargs,
            )
        finally:
            bar.close()

    def _combine(self, t: int, results: list[ClientResult]) -> tuple[np.ndarray, dict[str, Any]]:
        dropouts = self.dropouts.draw([r.client_id for r in results], self._rng(t, _STREAM_DROPOUT)) if self.dropouts else {}
        late = {r.client_id for r in results if self.client_deadline is not None and r.train_seconds > self.client_deadline}
        for r in results:  # raised or missed the deadline: it never sent its input
            if r.error is not None or r.client_id in late:
                dropouts[r.client_id] = Stage.MASKED_INPUT
        failures = [f"{r.client_id}: {r.error}" for r in results if r.error is not None]
        if len(dropouts) == len(results) and failures:
            raise RoundFailedError(f"round {t}: every participant failed or dropped; first failure: {failures[0]}")
        # a failed client has no vector; give the protocol a placeholder it will never count
        dimension = next(r.update.size for r in results if r.error is None)
        results = [
            r if r.error is None else ClientResult(r.client_id, np.zeros(dimension, np.float32), 1) for r in results
        ]
        if self._revealing:
            alive = [r for r in results if dropouts.get(r.client_id, Stage.UNMASK) > Stage.MASKED_INPUT]
            if not alive:
                raise RoundFailedError(f"round {t}: every participant dropped out; nothing to select from")
            local_models = [
                LocalModel(r.client_id, self.global_vector + r.update, float(r.num_examples), r.metrics) for r in alive
            ]
            new_vector = self.strategy.combine(self.global_vector, local_models)
            self.reveals.append(
                Reveal(t, tuple(r.client_id for r in alive), what=f"local models ({self.strategy.name})", why_allowed=self._reveal_basis())
            )
            return new_vector, {"contributors": len(alive), "dropped": len(dropouts), "failed": len(failures)}
        out = self.pipeline.run(results, round_index=t, rng=self._rng(t, _STREAM_PIPELINE), dropouts=dropouts)
        new_vector = self.strategy.apply(self.global_vector, out.aggregate)
        summary = {
            "contributors": out.aggregate.contributors,
            "dropped": len(out.sum_result.dropped),
            "failed": len(failures),
            "bytes_up": float(sum(out.sum_result.bytes_up.values())),
            "clipped_fraction": out.clipped / max(len(results), 1) if self.pipeline.clip is not None else 0.0,
        }
        if out.norms:
            summary["update_norm_median"] = float(np.median(list(out.norms.values())))
        return new_vector, summary

    def _reveal_basis(self) -> str:
        if self.sample_privacy is not None:
            return "each revealed model is covered by sample-level DP-SGD"
        return "the user opted out of protection for this strategy (allow_reveal=True)"

    def _planned_events(self, t: int, participants: list[str], rate: float) -> list[Any]:
        """The ledger events the round would record, for the budget check before it runs.

        Sample-level events assume every planned step is taken (early stopping only spends less).
        """
        events: list[Any] = []
        if isinstance(self.sample_privacy, dp.SampleLevelDP):
            clipping = dp.resolve_clipping(self.executor_model(), self.sample_privacy.clipping)
            for cid in participants:
                batches = math.ceil(self.clients[cid].data.num_train / self.train.batch_size)
                steps = self.train.epochs * batches
                if self.train.max_steps is not None:
                    steps = min(steps, self.train.max_steps)
                events.append(
                    dp.SampleLevelEvent(
                        client_id=cid,
                        round_index=t,
                        noise_multiplier=self.sample_privacy.noise_multiplier,
                        max_grad_norm=self.sample_privacy.max_grad_norm,
                        sample_rate=1.0 / batches,
                        steps=steps,
                        clipping=clipping,
                        sampling="poisson" if self.sample_privacy.poisson_sampling else "fixed_size",
                    )
                )
        if participants:
            events += self._client_level_events(t, rate, participants=len(participants), survivors=len(participants))
        return events

    def _client_level_events(self, t: int, rate: float, *, participants: int, survivors: int) -> list[Any]:
        sampling = "poisson" if self.sampler.poisson else "fixed_size"
        if self.pipeline.central_noise is not None:
            return [self.pipeline.central_noise.event(
                round_index=t, participants=participants, survivors=survivors, sample_rate=rate, sampling=sampling
            )]  # fmt: skip
        noise = getattr(self.pipeline.backend, "integer_noise", None)
        if noise is not None:
            return [noise.event(
                round_index=t, scale=self.pipeline.backend.encoder.scale, participants=participants,
                survivors=survivors, sample_rate=rate, sampling=sampling,
            )]  # fmt: skip
        return []

    def executor_model(self) -> torch.nn.Module:
        """The model instance local training runs on (for inspecting its layers)."""
        workspace = getattr(self.executor, "workspace", None)
        return workspace.model if workspace is not None else self.model()

    def _rng(self, t: int, stream: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([self.seed, t, stream]))

    # ------------------------------------------------------------ evaluation
    def evaluate(self, split: str = "test") -> dict[str, float]:
        """Federated evaluation: each client scores the global model, means weighted by examples.

        A client whose metric is undefined (NaN: ROC AUC on a test split of one class) is left out
        of that metric's mean. A mean of per-client AUCs is not the AUC of the pooled predictions:
        for a model without local-only parameters, score ``self.model()`` on pooled data instead.
        """
        scores = self.executor.evaluate(
            [self.clients[c] for c in self.client_ids], global_vector=torch.from_numpy(self.global_vector), split=split
        )
        totals: dict[str, float] = {}
        counts: dict[str, int] = {}
        for metrics, n in scores:
            for k, v in metrics.items():
                if not math.isfinite(float(v)):
                    continue
                totals[k] = totals.get(k, 0.0) + float(v) * n
                counts[k] = counts.get(k, 0) + n
        return {k: totals[k] / counts[k] for k in sorted(totals) if counts[k]}

    def model(self) -> torch.nn.Module:
        """A fresh model holding the global shared parameters (local-only ones at their initial values)."""
        torch.manual_seed(self.seed)
        model = self.task.build_model()
        self.layout.load_into(model, torch.from_numpy(self.global_vector))
        return model

    # ------------------------------------------------------------ checkpoints
    def save(self, folder: str | Path) -> Path:
        """Write a checkpoint of the whole simulation (server state and simulated clients)."""
        client_states = {
            cid: {name: t.detach().cpu().numpy() for name, t in c.local_state.items()}
            for cid, c in self.clients.items()
            if c.local_state
        }
        return save_checkpoint(
            folder,
            Checkpoint(
                round_index=self.round_index,
                seed=self.seed,
                global_vector=self.global_vector,
                strategy_state=self.strategy.state_dict(),
                client_states=client_states,
                history=self.history,
                ledger_json=self.ledger.to_json() if self.ledger is not None else None,
                extra={"strategy": self.strategy.name, "stop_reason": self.stop_reason},
            ),
        )

    def restore(self, folder: str | Path) -> None:
        """Resume from a checkpoint written by a federation built with the same settings.

        Raises:
            ConfigError: the checkpoint belongs to another seed, strategy or model size.
        """
        ckpt = load_checkpoint(folder)
        if ckpt.seed != self.seed:
            raise ConfigError(f"checkpoint seed {ckpt.seed} differs from this federation's seed {self.seed}")
        if ckpt.extra.get("strategy") != self.strategy.name:
            raise ConfigError(f"checkpoint strategy {ckpt.extra.get('strategy')!r} differs from {self.strategy.name!r}")
        if ckpt.global_vector.shape != (self.layout.size,):
            raise ConfigError(f"checkpoint vector has shape {ckpt.global_vector.shape}, the model needs ({self.layout.size},)")
        unknown = set(ckpt.client_states) - set(self.clients)
        if unknown:
            raise ConfigError(f"checkpoint holds clients this federation lacks: {sorted(unknown)[:5]}")
        self.strategy.load_state_dict(ckpt.strategy_state)
        self.global_vector = ckpt.global_vector.astype(np.float32)
        for cid, params in ckpt.client_states.items():
            self.clients[cid].local_state = {k: torch.from_numpy(v.copy()) for k, v in params.items()}
        self.history = list(ckpt.history)
        self.round_index = ckpt.round_index
        if self.ledger is not None and ckpt.ledger_json is not None:
            self.ledger = type(self.ledger).from_json(ckpt.ledger_json)
