"""Attack simulations: malicious clients that poison their model update or their training data.

Model poisoning (:class:`SignFlip`, :class:`Scaling`, :class:`GaussianAttack`) rewrites the
update an attacker hands to the protection pipeline; :class:`PoisonedExecutor` wraps any
:class:`~fedcore.rounds.executors.Executor` and applies it to the attackers' results. Poisoning happens
where a compromised training script would act: after local training, before the library's clip
and protection stages (so client-side norm bounding still applies to it).

Data poisoning (:func:`label_flip`) hands the attackers' :class:`~fedcore.workloads.task.ClientData` a
training set whose labels are flipped, so their honest training code learns the wrong thing.

:class:`InjectedUpdates` makes some clients send a fixed vector instead of training (the
canaries of a privacy audit, or free riders).

Which clients attack is drawn once by :func:`choose_attackers` from a generator the caller
passes in; the randomness of each attack (Gaussian noise) derives from that generator, the
round and the client, so a run and its resumed twin see the same attacks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import ConfigError
from ..rounds.client import Client, ClientResult
from ..rounds.executors import Executor
from ..workloads.task import ClientData

__all__ = [
    "ModelPoisoning",
    "SignFlip",
    "Scaling",
    "GaussianAttack",
    "choose_attackers",
    "PoisonedExecutor",
    "InjectedUpdates",
    "LabelFlippedDataset",
    "flip_binary_labels",
    "flip_implicit_feedback",
    "label_flip",
]


def _check_rng(rng: object) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return rng


def _finite(name: str, value: object, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------- model poisoning


class ModelPoisoning(Protocol):
    """Rewrites one attacker's update (a flat float vector) in one round."""

    name: str

    def poison(self, update: np.ndarray, *, rng: np.random.Generator) -> np.ndarray:
        """The update the attacker sends instead of ``update``."""


@dataclass(frozen=True)
class SignFlip:
    """Send ``-scale * update``: push the model against the attacker's honest direction."""

    scale: float = 1.0
    name = "sign_flip"

    def __post_init__(self) -> None:
        _finite("scale", self.scale, positive=True)

    def poison(self, update: np.ndarray, *, rng: np.random.Generator) -> np.ndarray:
        """``-scale * update``."""
        return (-self.scale * update.astype(np.float64)).astype(np.float32)


@dataclass(frozen=True)
class Scaling:
    """Send ``factor * update``: a boosted update, as in model replacement (Bagdasaryan et al. 2020).

    A factor near the number of participants lets one attacker replace the FedAvg mean with its
    own model; a negative factor is a boosted sign flip.
    """

    factor: float = 10.0
    name = "scaling"

    def __post_init__(self) -> None:
        if _finite("factor", self.factor) == 0:
            raise ConfigError("factor must be non-zero (0 would be a dropout, not a scaling attack), got 0")

    def poison(self, update: np.ndarray, *, rng: np.random.Generator) -> np.ndarray:
        """``factor * update``."""
        return (self.factor * update.astype(np.float64)).astype(np.float32)


@dataclass(frozen=True)
class GaussianAttack:
    """Send ``N(0, std^2 I)`` noise instead of the update (Blanchard et al. 2017, Sec. 5)."""

    std: float = 1.0
    name = "gaussian"

    def __post_init__(self) -> None:
        _finite("std", self.std, positive=True)

    def poison(self, update: np.ndarray, *, rng: np.random.Generator) -> np.ndarray:
        """Fresh ``N(0, std^2)`` noise of the update's shape; the update itself is ignored."""
        return rng.normal(0.0, self.std, size=update.shape).astype(np.float32)


def choose_attackers(client_ids: Sequence[str], *, fraction: float, rng: np.random.Generator) -> tuple[str, ...]:
    """``ceil(fraction * n)`` distinct clients drawn uniformly: at least the fraction asked for.

    Raises:
        ConfigError: ``fraction`` outside ``[0, 1]`` or no client ids.
    """
    _check_rng(rng)
    ids = sorted(client_ids)
    if not ids:
        raise ConfigError("client_ids must name at least one client, got none")
    if len(set(ids)) != len(ids):
        raise ConfigError("client_ids must be distinct")
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"fraction must be a number in [0, 1], got {fraction!r}")
    count = min(len(ids), int(math.ceil(fraction * len(ids) - 1e-9)))
    picked = rng.choice(len(ids), size=count, replace=False) if count else np.zeros(0, dtype=np.int64)
    return tuple(ids[i] for i in sorted(picked))


def _tag(client_id: str) -> int:
    return int.from_bytes(hashlib.sha256(client_id.encode()).digest()[:8], "little")


class _Wrapper:
    """Delegates everything it does not override to the wrapped executor."""

    def __init__(self, inner: Executor) -> None:
        if not hasattr(inner, "fit") or not hasattr(inner, "evaluate"):
            raise TypeError(f"inner must be an Executor, got {type(inner).__name__}")
        self.inner = inner

    @property
    def name(self) -> str:
        return f"{type(self).__name__}({self.inner.name})"

    def __getattr__(self, attr: str) -> Any:  # workspace, predict, ... of the wrapped executor
        if attr == "inner":
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def evaluate(
        self, clients: Sequence[Client], *, global_vector: torch.Tensor, split: str
    ) -> list[tuple[dict[str, float], int]]:
        return self.inner.evaluate(clients, global_vector=global_vector, split=split)

    def predict(self, client: Client, *, vector: torch.Tensor, batch: Any) -> torch.Tensor:
        return self.inner.predict(client, vector=vector, batch=batch)


class PoisonedExecutor(_Wrapper):
    """Runs the wrapped executor, then rewrites the attackers' updates with ``attack``.

    Args:
        inner: the executor that runs local training.
        attackers: ids of the malicious clients (see :func:`choose_attackers`).
        attack: a :class:`ModelPoisoning` (sign flip, scaling, Gaussian).
        rng: generator from which the attack's own randomness derives.

    Attributes:
        poisoned: ``(round, client id)`` of every update rewritten so far.
    """

    def __init__(self, inner: Executor, *, attackers: Collection[str], attack: ModelPoisoning, rng: np.random.Generator) -> None:
        super().__init__(inner)
        if not hasattr(attack, "poison"):
            raise TypeError(f"attack must have a poison(update, *, rng) method, got {type(attack).__name__}")
        self.attackers = frozenset(attackers)
        self.attack = attack
        self._entropy = int(_check_rng(rng).integers(0, 2**63))
        self.poisoned: list[tuple[int, str]] = []

    def fit(self, clients: Sequence[Client], *, round_index: int, **kwargs: Any) -> list[ClientResult]:
        """Train like the wrapped executor, then replace each attacker's update by its poisoned one."""
        results = self.inner.fit(clients, round_index=round_index, **kwargs)
        out = []
        for r in results:
            if r.client_id in self.attackers and getattr(r, "error", None) is None:  # a failed client sends nothing
                gen = np.random.default_rng(np.random.SeedSequence([self._entropy, round_index, _tag(r.client_id)]))
                r = dataclasses.replace(r, update=self.attack.poison(np.asarray(r.update), rng=gen))
                self.poisoned.append((round_index, r.client_id))
            out.append(r)
        return out


class InjectedUpdates(_Wrapper):
    """Clients named in ``updates`` skip training and send their fixed vector every round.

    Used for the canary clients of a privacy audit (``dp.audit``): each sends the same crafted
    update whenever it takes part. The others train through the wrapped executor.

    Raises:
        ConfigError: an injected vector that is not a finite 1-D float vector.
    """

    updates: dict[str, np.ndarray]
    num_examples: int

    def __init__(self, inner: Executor, *, updates: Mapping[str, np.ndarray], num_examples: int = 1) -> None:
        super().__init__(inner)
        fixed: dict[str, np.ndarray] = {}
        for cid, vec in updates.items():
            arr = np.asarray(vec)
            if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind != "f" or not np.all(np.isfinite(arr)):
                raise ConfigError(f"injected update of {cid!r} must be a finite, non-empty 1-D float vector")
            fixed[cid] = arr.astype(np.float32)
        if isinstance(num_examples, bool) or not isinstance(num_examples, numbers.Integral) or num_examples < 1:
            raise ConfigError(f"num_examples must be an int >= 1, got {num_examples!r}")
        self.updates = fixed
        self.num_examples = int(num_examples)

    def fit(self, clients: Sequence[Client], *, round_index: int, seeds: Sequence[int], **kwargs: Any) -> list[ClientResult]:
        """Train like the wrapped executor; the injected clients send their fixed updates instead."""
        train = [(c, s) for c, s in zip(clients, seeds) if c.client_id not in self.updates]
        trained = iter(
            self.inner.fit([c for c, _ in train], round_index=round_index, seeds=[s for _, s in train], **kwargs) if train else []
        )
        out = []
        for c in clients:
            if c.client_id in self.updates:
                out.append(ClientResult(c.client_id, self.updates[c.client_id].copy(), self.num_examples))
            else:
                out.append(next(trained))
        return out


# ----------------------------------------------------------------------------- data poisoning


def flip_binary_labels(item: Any) -> Any:
    """``(x, y) -> (x, 1 - y)`` for labels in {0, 1} (a single example or a batch)."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise ConfigError(f"flip_binary_labels expects (features, label) pairs, got {type(item).__name__}")
    x, y = item
    return (x, 1 - y)


def flip_implicit_feedback(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Implicit feedback (MovieLens): the observed item becomes a negative and a sampled one the positive.

    Each training example is (user, observed item, sampled never-rated items). The flip swaps the
    observed item with the first sampled negative, so the attacker's honest loss pushes the items
    its users watched *down* and random unwatched items *up*: the implicit-feedback analogue of
    flipping a binary label. Works on one example or on a batch.
    """
    if not isinstance(batch, Mapping) or "item" not in batch or "negatives" not in batch:
        keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ConfigError(f"flip_implicit_feedback expects a batch with 'item' and 'negatives', got {keys}")
    item, negatives = batch["item"], batch["negatives"]
    out = dict(batch)
    out["item"] = negatives[..., 0].clone()
    out["negatives"] = torch.cat([item.reshape(*item.shape, 1), negatives[..., 1:]], dim=-1)
    return out


class LabelFlippedDataset(Dataset):
    """A view of ``dataset`` whose examples (or pre-made batches) pass through ``flip``."""

    def __init__(self, dataset: Dataset, flip: Callable[[Any], Any]) -> None:
        if not callable(flip):
            raise TypeError(f"flip must be callable, got {type(flip).__name__}")
        self.dataset = dataset
        self.flip = flip

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.flip(self.dataset[index])

    def __getitems__(self, indices: list[int]) -> Any:
        inner = getattr(self.dataset, "__getitems__", None)
        if inner is None:
            return [self.flip(self.dataset[i]) for i in indices]
        out = inner(indices)
        if hasattr(out, "batch"):  # a batch drawn at once (fedcore.workloads.recsys InteractionDataset)
            out.batch = self.flip(out.batch)
            return out
        return [self.flip(item) for item in out]


def label_flip(
    clients: Mapping[str, ClientData], *, attackers: Collection[str], flip: Callable[[Any], Any]
) -> dict[str, ClientData]:
    """A copy of ``clients`` in which each attacker trains on label-flipped data.

    Only the training split is poisoned; validation and test stay honest, so evaluation measures
    the damage done to everyone.

    Raises:
        ConfigError: an attacker id that is not among the clients.
    """
    unknown = sorted(set(attackers) - set(clients))
    if unknown:
        raise ConfigError(f"attackers {unknown[:5]} are not among the clients")
    out = {}
    for cid, data in clients.items():
        if cid in attackers:
            data = ClientData(train=LabelFlippedDataset(data.train, flip), validation=data.validation, test=data.test)
        out[cid] = data
    return out
