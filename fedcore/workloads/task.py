"""The interface a workload gives the federation: a model, a per-sample loss, metrics.

A task knows nothing of federation: the same task trains centrally (one client holding all the
data) and federatedly, which is how every federated figure gets its centralized twin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.data import Dataset

__all__ = ["Task", "ClientData"]


@runtime_checkable
class Task(Protocol):
    """What the federation needs to know about a workload.

    Attributes:
        name: short name used in logs and reports.
        local_only: glob patterns of parameter names that never leave a client.
        primary_metric: the metric early stopping and model selection use by default.
        higher_is_better: whether larger ``primary_metric`` is better.
    """

    name: str
    local_only: tuple[str, ...]
    primary_metric: str
    higher_is_better: bool

    def build_model(self) -> nn.Module:
        """A fresh model; deterministic once the caller has seeded torch."""
        ...

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-sample losses of shape ``(batch_size,)`` (reduction is the caller's)."""
        ...

    def evaluate(self, model: nn.Module, data: Dataset) -> dict[str, float]:
        """Metrics of ``model`` on ``data`` as means over its examples."""
        ...

    def predict(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Scores or probabilities for ``batch`` (used by output ensembles)."""
        ...

    def collate(self, items: list[Any]) -> Any:
        """Turn a list of dataset items into a batch."""
        ...


@dataclass(frozen=True)
class ClientData:
    """One client's data, split once with a fixed seed; none of it ever leaves the client."""

    train: Dataset
    validation: Dataset | None = None
    test: Dataset | None = None

    def __post_init__(self) -> None:
        if len(self.train) == 0:  # type: ignore[arg-type]
            raise ValueError("ClientData.train must hold at least one example, got an empty dataset")

    @property
    def num_train(self) -> int:
        """Training examples the client holds."""
        return len(self.train)  # type: ignore[arg-type]


def move_to(batch: Any, device: torch.device | str) -> Any:
    """Move every tensor inside a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch
