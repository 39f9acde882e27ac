"""Server strategies: what the server does with the aggregated (or selected) result.

Aggregating strategies see only the weighted mean that the protection backend produced, never
an individual update. Revealing strategies (model selection, output ensembles) need individual
local models: the server runs them only when the user allowed the reveal, and the report lists it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Protocol

import numpy as np

from ..errors import ConfigError

__all__ = [
    "Aggregate",
    "LocalModel",
    "Strategy",
    "RevealingStrategy",
    "FedAvg",
    "FedSGD",
    "FedAdam",
    "FedYogi",
    "FedAdagrad",
    "ModelSelection",
    "OutputEnsemble",
]


@dataclass(frozen=True)
class Aggregate:
    """The weighted mean of the round's contributions, as the server learns it.

    Attributes:
        mean: float64 weighted mean of the contributions (model deltas or gradients).
        contributors: how many clients' inputs are in the mean.
    """

    mean: np.ndarray
    contributors: int


@dataclass(frozen=True)
class LocalModel:
    """One client's shared parameters after local training, revealed to the server."""

    client_id: str
    vector: np.ndarray
    weight: float
    validation: Mapping[str, float] = field(default_factory=dict)


class Strategy(Protocol):
    """Turns the global vector and the round's aggregate into the next global vector.

    Attributes:
        name: short name for configs and reports.
        update_kind: ``"delta"`` (local minus global after training) or ``"gradient"``.
    """

    name: str
    update_kind: str

    def apply(self, global_vector: np.ndarray, aggregate: Aggregate) -> np.ndarray:
        """The new global vector from the old one and the round's aggregate (the only input it sees)."""

    def state_dict(self) -> dict[str, np.ndarray]:
        """The server optimizer's state as arrays, for checkpoints."""

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore the state written by ``state_dict``."""


class RevealingStrategy(Protocol):
    """A strategy that needs each client's local model (model selection, output ensembles)."""

    name: str
    update_kind: str
    reveal_reason: str

    def combine(self, global_vector: np.ndarray, local_models: list[LocalModel]) -> np.ndarray:
        """The new global vector from the clients' local models (which the server therefore sees)."""

    def state_dict(self) -> dict[str, np.ndarray]:
        """The strategy's state as arrays, for checkpoints."""

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore the state written by ``state_dict``."""


def _positive(name: str, value: float) -> float:
    if not (np.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


class _Stateless:
    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        if state:
            raise ConfigError(f"{self.name} keeps no state, got keys {sorted(state)}")  # type: ignore[attr-defined]


class FedAvg(_Stateless):
    """Weighted model averaging (McMahan et al. 2017): ``x <- x + server_lr * mean(delta)``."""

    name = "fedavg"
    update_kind = "delta"

    def __init__(self, *, server_lr: float = 1.0) -> None:
        self.server_lr = _positive("server_lr", server_lr)

    def apply(self, global_vector: np.ndarray, aggregate: Aggregate) -> np.ndarray:
        """``global + server_lr * mean update`` (``server_lr = 1``: the weighted mean of the local models)."""
        return (global_vector + self.server_lr * aggregate.mean).astype(np.float32)


class FedSGD(_Stateless):
    """Gradient aggregation with a global learning rate: ``x <- x - lr * sum_k w_k g_k``.

    The weights ``w_k`` are normalised to sum to one, so the step is the weighted mean gradient.
    """

    name = "fedsgd"
    update_kind = "gradient"

    def __init__(self, *, lr: float) -> None:
        self.lr = _positive("lr", lr)

    def apply(self, global_vector: np.ndarray, aggregate: Aggregate) -> np.ndarray:
        """``global - lr * mean gradient``."""
        return (global_vector - self.lr * aggregate.mean).astype(np.float32)


class _AdaptiveServer:
    """FedAdam / FedYogi / FedAdagrad (Reddi et al., ICLR 2021, Algorithm 2).

    The pseudo-gradient is the mean delta; the first moment is an EMA with ``beta1``; the second
    moment follows the variant's rule; ``x <- x + lr * m / (sqrt(v) + tau)``.
    """

    name = "adaptive"
    update_kind = "delta"

    def __init__(self, *, lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        self.lr = _positive("lr", lr)
        self.tau = _positive("tau", tau)
        for label, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= beta < 1.0:
                raise ConfigError(f"{label} must be in [0, 1), got {beta!r}")
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self._m: np.ndarray | None = None
        self._v: np.ndarray | None = None

    def _second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def apply(self, global_vector: np.ndarray, aggregate: Aggregate) -> np.ndarray:
        delta = aggregate.mean
        if self._m is None or self._m.shape != delta.shape:
            self._m = np.zeros_like(delta, dtype=np.float64)
            self._v = np.full_like(delta, self.tau**2, dtype=np.float64)
        assert self._v is not None
        self._m = self.beta1 * self._m + (1.0 - self.beta1) * delta
        self._v = self._second_moment(self._v, delta * delta)
        step = self.lr * self._m / (np.sqrt(self._v) + self.tau)
        return (global_vector + step).astype(np.float32)

    def state_dict(self) -> dict[str, np.ndarray]:
        if self._m is None or self._v is None:
            return {}
        return {"m": self._m.copy(), "v": self._v.copy()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        if not state:
            self._m = self._v = None
            return
        if set(state) != {"m", "v"}:
            raise ConfigError(f"{self.name} state must hold keys ['m', 'v'], got {sorted(state)}")
        self._m = np.asarray(state["m"], dtype=np.float64).copy()
        self._v = np.asarray(state["v"], dtype=np.float64).copy()


class FedAdam(_AdaptiveServer):
    """Adam on the server: the mean update is the pseudo-gradient, ``v`` its squares' EMA (Reddi et al., ICLR 2021)."""

    name = "fedadam"

    def _second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1.0 - self.beta2) * delta_sq


class FedYogi(_AdaptiveServer):
    """Yogi on the server: like FedAdam with a sign-controlled, additive second moment (Reddi et al., ICLR 2021)."""

    name = "fedyogi"

    def _second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return v - (1.0 - self.beta2) * delta_sq * np.sign(v - delta_sq)


class FedAdagrad(_AdaptiveServer):
    """Adagrad on the server: ``v`` accumulates the squared mean updates (Reddi et al., ICLR 2021)."""

    name = "fedadagrad"

    def _second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return v + delta_sq


def _best_index(models: list[LocalModel], metric: str, higher_is_better: bool) -> int:
    scored = []
    for i, m in enumerate(models):
        if metric not in m.validation:
            raise ConfigError(
                f"model selection metric {metric!r} missing from client {m.client_id!r}'s validation metrics "
                f"{sorted(m.validation)}; give every client validation data"
            )
        scored.append((m.validation[metric], i))
    value, index = (max if higher_is_better else min)(scored)
    return index


class ModelSelection(_Stateless):
    """Keep the local model with the best validation metric; it is revealed to the server."""

    name = "selection"
    update_kind = "delta"
    reveal_reason = "model selection keeps one client's local model as the new global model"

    def __init__(self, *, metric: str, higher_is_better: bool = True) -> None:
        self.metric = metric
        self.higher_is_better = higher_is_better
        self.last_selected: str | None = None

    def combine(self, global_vector: np.ndarray, local_models: list[LocalModel]) -> np.ndarray:
        """The local model with the best validation metric becomes the global model."""
        best = local_models[_best_index(local_models, self.metric, self.higher_is_better)]
        self.last_selected = best.client_id
        return best.vector.astype(np.float32)


class OutputEnsemble(_Stateless):
    """Weighted average of the local models' predictions.

    The members of the last round are kept for :meth:`members`; the next global model (from
    which clients start) is the weighted average of the members' parameters.
    """

    name = "ensemble"
    update_kind = "delta"
    reveal_reason = "an output ensemble keeps every participant's local model to average predictions"

    def __init__(self) -> None:
        self._members: list[LocalModel] = []

    def combine(self, global_vector: np.ndarray, local_models: list[LocalModel]) -> np.ndarray:
        """Keep the local models as the ensemble's members; the next global model is their weighted average."""
        self._members = list(local_models)
        weights = np.array([m.weight for m in local_models], dtype=np.float64)
        stacked = np.stack([m.vector.astype(np.float64) for m in local_models])
        return (weights @ stacked / weights.sum()).astype(np.float32)

    def members(self) -> list[tuple[np.ndarray, float]]:
        """(vector, normalised weight) of each member of the current ensemble."""
        total = sum(m.weight for m in self._members)
        return [(m.vector, m.weight / total) for m in self._members]
