"""A small synthetic task for the federated core's unit tests."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedcore import ClientData


class ToyModel(nn.Module):
    """A linear classifier with a private per-client offset (local-only, like a user embedding)."""

    def __init__(self, features: int = 6) -> None:
        super().__init__()
        self.linear = nn.Linear(features, 1)
        self.private_offset = nn.Parameter(torch.zeros(1))
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1) + self.private_offset


class ToyTask:
    name = "toy"
    local_only = ("private_*",)
    primary_metric = "accuracy"
    higher_is_better = True

    def __init__(self, features: int = 6) -> None:
        self.features = features

    def build_model(self) -> nn.Module:
        return ToyModel(self.features)

    def loss(self, model, batch):
        x, y = batch
        return nn.functional.binary_cross_entropy_with_logits(model(x), y, reduction="none")

    def evaluate(self, model, data):
        x, y = data.tensors
        logits = model(x)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, y).item()
        return {"accuracy": float(((logits > 0).float() == y).float().mean()), "loss": loss}

    def predict(self, model, batch):
        x, _ = batch
        return torch.sigmoid(model(x))

    def collate(self, items):
        xs, ys = zip(*items)
        return torch.stack(xs), torch.stack(ys)


def toy_clients(num_clients: int = 4, per_client: int = 40, features: int = 6, seed: int = 0) -> dict[str, ClientData]:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=features)
    clients = {}
    for i in range(num_clients):
        n = per_client + 5 * i
        x = rng.normal(size=(n + 20, features)).astype(np.float32)
        y = ((x @ w + 0.3 * rng.normal(size=n + 20)) > 0).astype(np.float32)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        clients[f"client-{i}"] = ClientData(
            train=TensorDataset(xt[:n], yt[:n]),
            validation=TensorDataset(xt[n : n + 10], yt[n : n + 10]),
            test=TensorDataset(xt[n + 10 :], yt[n + 10 :]),
        )
    return clients


def run_pipeline(pipe, results, *, round_index, rng, dropouts=None):
    """A round through the pipeline's two halves: each client prepares, the backend sums, the server finishes."""
    prepared = {r.client_id: pipe.prepare(r.update, num_examples=r.num_examples) for r in results}
    summed = pipe.backend.aggregate(prepared, round_index=round_index, rng=rng, dropouts=dropouts)
    return pipe.finish(summed, round_index=round_index, rng=rng, participants=len(results))
