"""A client: its own data, its local-only parameters, and the local work of a round."""

from __future__ import annotations

import hashlib
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import dp

from ..errors import ConfigError, RoundFailedError
from ..stages.layout import ParameterLayout
from ..workloads.task import ClientData, Task, move_to
from .training import SampleLevelPrivacy, TrainConfig, TrainResult, train_local

__all__ = ["Workspace", "Client", "ClientResult", "check_results", "round_seed"]


def round_seed(seed: int, round_index: int, client_id: str) -> int:
    """A 63-bit seed for one client's work in one round, independent of execution order."""
    tag = int.from_bytes(hashlib.sha256(client_id.encode()).digest()[:8], "little")
    state = np.random.SeedSequence([seed, round_index, tag]).generate_state(2, dtype=np.uint32)
    return int(state[0]) | (int(state[1] & 0x7FFFFFFF) << 32)


class Workspace:
    """One model instance and its layout, reused by every client an executor runs.

    Building the model once per executor (not per client) keeps memory flat with 943 clients.
    """

    def __init__(self, task: Task, *, device: str = "cpu") -> None:
        self.task = task
        self.model: nn.Module = task.build_model()
        self.layout = ParameterLayout(self.model, local_only=task.local_only)
        self.initial_local = self.layout.local_state(self.model)
        self.device = torch.device(device)
        self.model.to(self.device)

    def load(self, global_vector: torch.Tensor, local_state: dict[str, torch.Tensor]) -> None:
        """Write the global shared parameters and one client's local-only parameters."""
        self.layout.load_into(self.model, global_vector.to(self.device))
        if local_state:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for name, value in local_state.items():
                    params[name].copy_(value)


@dataclass(frozen=True)
class ClientResult:
    """What a client hands to the protection pipeline after local work.

    ``update`` never reaches the server in the clear unless the aggregation mode is plaintext
    or the strategy reveals local models with the user's consent.
    """

    client_id: str
    update: np.ndarray
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    privacy_event: Any = None
    train_seconds: float = 0.0
    error: str | None = None

    @classmethod
    def failed(cls, client_id: str, error: BaseException) -> "ClientResult":
        """A client whose local work raised: it sends nothing and counts as a dropout."""
        return cls(client_id, np.zeros(0, dtype=np.float32), 0, error=f"{type(error).__name__}: {error}")


def check_results(results: object, *, participants: list[str], dimension: int, round_index: int) -> None:
    """Refuse a round's results unless each participant sent exactly one well-formed result.

    The server cannot trust what an executor (or a remote client) hands back: an unknown or
    repeated id would add an input nobody sampled, a negative example count would subtract a
    client's update, a NaN would poison the model. Failed results (``error`` set) carry nothing.

    Raises:
        RoundFailedError: naming the round, the client and what is wrong.
    """
    where = f"round {round_index}"
    if not isinstance(results, list) or not all(isinstance(r, ClientResult) for r in results):
        raise RoundFailedError(f"{where}: the executor must return a list of ClientResult, got {results!r:.80}")
    expected, seen = set(participants), set()
    for r in results:
        cid = r.client_id
        if cid not in expected:
            raise RoundFailedError(f"{where}: a result names client {cid!r}, not among the round's participants")
        if cid in seen:
            raise RoundFailedError(f"{where}: client {cid!r} sent a result more than once")
        seen.add(cid)
        if r.error is not None:
            continue
        n = r.num_examples
        if isinstance(n, bool) or not isinstance(n, numbers.Real) or not (math.isfinite(float(n)) and float(n) >= 0):
            raise RoundFailedError(f"{where}: client {cid!r} claims num_examples={n!r}; a finite number >= 0 is allowed")
        vec = r.update
        if not isinstance(vec, np.ndarray) or vec.dtype == np.bool_ or vec.dtype.kind not in "iuf":
            kind = vec.dtype.name if isinstance(vec, np.ndarray) else type(vec).__name__
            raise RoundFailedError(f"{where}: update of client {cid!r} must be a real numpy vector, got {kind}")
        if vec.shape != (dimension,):
            raise RoundFailedError(
                f"{where}: update of client {cid!r} has length {vec.size} (shape {vec.shape}); "
                f"the model has {dimension} shared parameters"
            )
        if not np.all(np.isfinite(vec)):
            raise RoundFailedError(f"{where}: update of client {cid!r} holds NaN or Inf")
    missing = sorted(expected - seen)
    if missing:
        raise RoundFailedError(f"{where}: no result from participants {missing[:5]}{' ...' if len(missing) > 5 else ''}")


class Client:
    """A participant holding its data and its local-only parameters between rounds."""

    def __init__(self, client_id: str, data: ClientData) -> None:
        if not isinstance(client_id, str) or not client_id:
            raise ConfigError(f"client_id must be a non-empty str, got {client_id!r}")
        if not isinstance(data, ClientData):
            raise TypeError(f"data must be a ClientData, got {type(data).__name__}")
        self.client_id = client_id
        self.data = data
        self.local_state: dict[str, torch.Tensor] = {}

    def fit(
        self,
        workspace: Workspace,
        *,
        global_vector: torch.Tensor,
        config: TrainConfig,
        seed: int,
        round_index: int,
        update_kind: str = "delta",
        privacy: SampleLevelPrivacy | None = None,
    ) -> ClientResult:
        """Train from the global model; return the update (local - global, or the gradient)."""
        local = self.local_state or workspace.initial_local
        workspace.load(global_vector, local)
        _seed_torch(seed, workspace.device)
        generator = torch.Generator().manual_seed(seed)
        if update_kind == "gradient":
            if privacy is not None:
                raise ConfigError(
                    "update_kind 'gradient' (FedSGD) does not run DP-SGD locally; use fedavg with "
                    "sample-level DP, or client-level DP on the gradients"
                )
            started = time.perf_counter()
            if config.user_clip is None:
                update = _mean_gradient(workspace, self.data.train, config, generator)
            else:
                update = _clipped_user_gradient_sum(workspace, self.data.train, config)
                self.local_state = workspace.layout.local_state(workspace.model)
            return ClientResult(self.client_id, update, self.data.num_train, train_seconds=time.perf_counter() - started)
        if config.user_clip is not None:
            raise ConfigError(
                f"user_clip sums per-user clipped gradients, which only update_kind 'gradient' (FedSGD) sends; "
                f"got update_kind {update_kind!r}"
            )
        started = time.perf_counter()
        result: TrainResult = train_local(
            workspace.model,
            task=workspace.task,
            data=self.data,
            config=config,
            generator=generator,
            privacy=privacy,
            client_id=self.client_id,
            round_index=round_index,
        )
        train_seconds = time.perf_counter() - started
        local_vector = workspace.layout.flatten(workspace.model)
        self.local_state = workspace.layout.local_state(workspace.model)
        update = local_vector.sub_(global_vector.cpu()).numpy()  # flatten made a fresh vector
        return ClientResult(
            self.client_id,
            update,
            result.examples,
            metrics=result.metrics,
            steps=result.steps,
            privacy_event=result.privacy_event,
            train_seconds=train_seconds,
        )

    def evaluate(self, workspace: Workspace, *, global_vector: torch.Tensor, split: str = "test") -> tuple[dict[str, float], int]:
        """Metrics of the global model (with this client's local parameters) on one split."""
        dataset = self._split(split)
        if dataset is None:
            return {}, 0
        workspace.load(global_vector, self.local_state or workspace.initial_local)
        workspace.model.eval()
        with torch.no_grad():
            metrics = dict(workspace.task.evaluate(workspace.model, dataset))
        return metrics, len(dataset)  # type: ignore[arg-type]

    def predict(self, workspace: Workspace, *, vector: torch.Tensor, batch: Any) -> torch.Tensor:
        """Predictions of a model given by its shared vector, with this client's local parameters."""
        workspace.load(vector, self.local_state or workspace.initial_local)
        workspace.model.eval()
        with torch.no_grad():
            return workspace.task.predict(workspace.model, move_to(batch, workspace.device))

    def _split(self, split: str) -> Dataset | None:
        if split not in ("train", "validation", "test"):
            raise ConfigError(f"split must be 'train', 'validation' or 'test', got {split!r}")
        return getattr(self.data, split)


def _seed_torch(seed: int, device: torch.device) -> None:
    """Seed torch's global generators for this client's work (dropout, sampled negatives).

    ``torch.manual_seed`` also records a stack trace for lazy CUDA seeding, which costs
    milliseconds per client; seeding the CPU generator (and the used GPU) directly does not.
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


def _mean_gradient(workspace: Workspace, dataset: Dataset, config: TrainConfig, generator: torch.Generator) -> np.ndarray:
    model, task = workspace.model, workspace.task
    model.train()
    model.zero_grad(set_to_none=True)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, generator=generator, collate_fn=task.collate)
    total = len(dataset)  # type: ignore[arg-type]
    for batch in loader:
        per_sample = task.loss(model, move_to(batch, workspace.device))
        (per_sample.sum() / total).backward()
    params = dict(model.named_parameters())
    grads = []
    for s in workspace.layout.slots:
        grad = params[s.name].grad
        grads.append((grad if grad is not None else torch.zeros(s.shape)).reshape(-1).cpu())
    model.zero_grad(set_to_none=True)
    return torch.cat(grads).numpy().astype(np.float32)


def _clipped_user_gradient_sum(workspace: Workspace, dataset: Dataset, config: TrainConfig) -> np.ndarray:
    """``sum_u clip(grad L_u)`` over this client's users, in layout order; each user's own rows take an SGD step.

    Raises:
        ConfigError: data not grouped by user, or per-user clipped parameters that are not the
            shared ones (a local-only parameter outside the user tables would be clipped too).
    """
    model, task = workspace.model, workspace.task
    by_user = getattr(dataset, "by_user", None)
    if not callable(by_user):
        raise ConfigError(
            f"user_clip needs training data grouped by user (a dataset with by_user()), got {type(dataset).__name__}"
        )
    assert config.user_clip is not None  # the caller's branch
    bound = float(config.user_clip)
    user_parameters = tuple(getattr(task, "user_parameters", ()))
    tables = dict(model.named_modules())

    def loss_of(batch: Any) -> Callable[[nn.Module], torch.Tensor]:
        return lambda m: task.loss(m, batch)

    model.train()
    model.zero_grad(set_to_none=True)
    totals = {s.name: torch.zeros(s.shape) for s in workspace.layout.slots}
    users = by_user()
    fetch = getattr(users, "__getitems__", None)
    # Every chunk starts from the same RNG state, so a user's random draws (its negatives) are the
    # same whichever chunk holds it: removing one user changes no other user's gradient.
    state = torch.get_rng_state()
    for start in range(0, len(users), config.batch_size):
        torch.set_rng_state(state)
        indices = list(range(start, min(start + config.batch_size, len(users))))
        batch = task.collate(fetch(indices) if fetch is not None else [users[i] for i in indices])
        batch = move_to(batch, workspace.device)
        shared, own = dp.clipped_user_gradients(model, loss_of(batch), max_grad_norm=bound, user_parameters=user_parameters)
        if set(shared) != set(totals):
            raise ConfigError(
                f"user_clip clips the parameters {sorted(shared)} per user, but the shared ones are {sorted(totals)}: "
                "every local-only trainable parameter must be one of the task's user_parameters tables"
            )
        for name, grad in shared.items():
            totals[name] += grad.cpu()
        with torch.no_grad():
            for name, own_grad in own.items():
                if own_grad is not None:
                    weight = tables[name].weight
                    assert isinstance(weight, torch.Tensor)  # dp.clipped_user_gradients checked it is an embedding
                    weight.sub_(own_grad, alpha=config.lr)
    return torch.cat([totals[s.name].reshape(-1) for s in workspace.layout.slots]).numpy().astype(np.float32)
