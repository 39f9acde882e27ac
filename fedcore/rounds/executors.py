"""Where client work runs. The in-process executor is the default and deterministic under a seed."""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch

from ..workloads.task import Task
from .client import Client, ClientResult, Workspace
from .training import SampleLevelPrivacy, TrainConfig

__all__ = ["Executor", "InProcessExecutor"]


class Executor(Protocol):
    """Runs the local work of a round's clients and returns their results in the given order.

    A client whose local work raises yields ``ClientResult.failed(...)``; the server treats it
    as a dropout before its masked input.
    """

    name: str

    def fit(
        self,
        clients: Sequence[Client],
        *,
        global_vector: torch.Tensor,
        config: TrainConfig,
        seeds: Sequence[int],
        round_index: int,
        update_kind: str,
        privacy: SampleLevelPrivacy | None,
    ) -> list[ClientResult]:
        """Train ``clients`` from ``global_vector`` with one seed each; one result per client, in order.

        A client whose local work raises is returned as ``ClientResult.failed`` (a dropout),
        not raised.
        """

    def evaluate(
        self, clients: Sequence[Client], *, global_vector: torch.Tensor, split: str
    ) -> list[tuple[dict[str, float], int]]:
        """Each client's metrics of the global model on its ``split`` and the number of examples scored."""

    def predict(self, client: Client, *, vector: torch.Tensor, batch: Any) -> torch.Tensor:
        """The client's model output for ``batch``, with its local-only parameters and ``vector``."""


class InProcessExecutor:
    """Runs clients one after another in this process, sharing one model workspace."""

    name = "in-process"

    def __init__(self, task: Task, *, device: str = "cpu") -> None:
        self.workspace = Workspace(task, device=device)

    def fit(
        self,
        clients: Sequence[Client],
        *,
        global_vector: torch.Tensor,
        config: TrainConfig,
        seeds: Sequence[int],
        round_index: int,
        update_kind: str,
        privacy: SampleLevelPrivacy | None,
        progress: Any = None,
    ) -> list[ClientResult]:
        """Train clients one after another in this process (deterministic under the seeds)."""
        results = []
        for client, seed in zip(clients, seeds):
            try:
                result = client.fit(
                    self.workspace,
                    global_vector=global_vector,
                    config=config,
                    seed=seed,
                    round_index=round_index,
                    update_kind=update_kind,
                    privacy=privacy,
                )
            except Exception as exc:  # a failing client is a dropout, not a failed round
                result = ClientResult.failed(client.client_id, exc)
            results.append(result)
            if progress is not None:
                progress.update(1)
        return results

    def evaluate(
        self, clients: Sequence[Client], *, global_vector: torch.Tensor, split: str
    ) -> list[tuple[dict[str, float], int]]:
        """Evaluate clients one after another in this process."""
        return [c.evaluate(self.workspace, global_vector=global_vector, split=split) for c in clients]

    def predict(self, client: Client, *, vector: torch.Tensor, batch: Any) -> torch.Tensor:
        """Predict in this process with the shared workspace model."""
        return client.predict(self.workspace, vector=vector, batch=batch)
