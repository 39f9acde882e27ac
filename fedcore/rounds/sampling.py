"""Which clients take part in a round. The server's generator is passed in (and checkpointed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from ..errors import ConfigError

__all__ = ["ClientSampler", "PoissonSampler", "FixedCountSampler", "AllClients"]


class ClientSampler(Protocol):
    """Chooses the participants of one round.

    Attributes:
        poisson: whether each client is included independently (what amplification by
            sampling assumes); fixed-size sampling is reported as an assumption.
    """

    @property
    def poisson(self) -> bool:
        """Whether each client is included independently."""

    def sample(self, client_ids: Sequence[str], rng: np.random.Generator) -> list[str]:
        """The clients taking part in one round, drawn with ``rng``."""

    def rate(self, num_clients: int) -> float:
        """The probability that a given client takes part in a round."""
        ...


@dataclass(frozen=True)
class PoissonSampler:
    """Each client takes part independently with probability ``q`` (may yield an empty round)."""

    q: float
    poisson: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.q <= 1.0:
            raise ConfigError(f"q must be in (0, 1], got {self.q!r}")

    def sample(self, client_ids: Sequence[str], rng: np.random.Generator) -> list[str]:
        """Each client independently with probability ``q`` (the round may be empty)."""
        chosen = rng.random(len(client_ids)) < self.q
        return [c for c, keep in zip(client_ids, chosen) if keep]

    def rate(self, num_clients: int) -> float:
        """``q``."""
        return self.q


@dataclass(frozen=True)
class FixedCountSampler:
    """Exactly ``count`` clients, uniformly without replacement."""

    count: int
    poisson: bool = False

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ConfigError(f"count must be >= 1, got {self.count!r}")

    def sample(self, client_ids: Sequence[str], rng: np.random.Generator) -> list[str]:
        """``count`` clients drawn without replacement; refuses a count above the clients available (ConfigError)."""
        if self.count > len(client_ids):
            raise ConfigError(f"count={self.count} exceeds the {len(client_ids)} available clients")
        picked = rng.choice(len(client_ids), size=self.count, replace=False)
        return [client_ids[i] for i in sorted(picked)]

    def rate(self, num_clients: int) -> float:
        """``count / num_clients``, capped at 1."""
        return min(1.0, self.count / num_clients)


@dataclass(frozen=True)
class AllClients:
    """Every client in every round (cross-silo)."""

    poisson: bool = True  # inclusion with probability 1 is trivially Poisson

    def sample(self, client_ids: Sequence[str], rng: np.random.Generator) -> list[str]:
        """Every client."""
        return list(client_ids)

    def rate(self, num_clients: int) -> float:
        """1: every client takes part in every round."""
        return 1.0
