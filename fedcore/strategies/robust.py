"""Byzantine-robust aggregation: coordinate-wise median, trimmed mean, Krum and Multi-Krum.

Each rule here is a *revealing* strategy: it needs every participant's individual update, so the
server sees each one in the clear. :class:`~fedcore.rounds.server.Federation` therefore runs them only
with ``allow_reveal=True`` (or sample-level DP covering the local models), records the reveal in
the report, and refuses them with masked or encrypted aggregation, whose whole point is that the
server never sees an individual update.

Norm bounding is the one defence that also works under masking: clients clip their update to an
L2 bound *before* protecting it (``UpdatePipeline(clip=dp.L2Clip(bound))`` with ``FedAvg``), so a
scaled-up update cannot weigh more than an honest one. Masking hides, it does not validate: the
bound holds only for clients that run the library's own clip stage (a client that patches its
own code escapes it; catching that needs range proofs, which this library does not implement).
Every rule below also takes ``norm_bound`` to clip each revealed update on the server first.

The rules ignore example-count weights on purpose: a malicious client could claim any number of
examples, so every participant counts once.

References: Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries:
Byzantine Tolerant Gradient Descent" (NeurIPS 2017: Krum, Multi-Krum); Yin, Chen, Ramchandran,
Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates" (ICML 2018:
coordinate-wise median and trimmed mean); Sun, Kairouz, Suresh, McMahan, "Can You Really Backdoor
Federated Learning?" (2019: norm bounding).
"""

from __future__ import annotations

import math
import numbers
from typing import Mapping

import numpy as np

from ..errors import ConfigError, RoundFailedError
from ._strategies import LocalModel

__all__ = ["CoordinateMedian", "TrimmedMean", "Krum", "MultiKrum", "norm_bound_updates"]


def _positive_or_none(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a finite number > 0 or None, got {value!r}")
    return float(value)


def norm_bound_updates(deltas: np.ndarray, bound: float) -> tuple[np.ndarray, int]:
    """Scale each row of ``deltas`` to L2 norm at most ``bound``; return ``(bounded, how_many_scaled)``.

    A row already within the bound (the zero row included) is left as it is.
    """
    norms = np.linalg.norm(deltas, axis=1)
    over = norms > bound
    factors = np.ones_like(norms)
    factors[over] = bound / norms[over]
    return deltas * factors[:, None], int(over.sum())


class _RobustRule:
    """Shared steps: reveal-check the inputs, drop non-finite updates, bound norms, step the model.

    Attributes (after each round):
        last_rejected: ids whose update held NaN or Inf, left out of the round.
        last_clipped: how many updates ``norm_bound`` scaled down.
    """

    name = "robust"
    update_kind = "delta"
    reveal_reason = "a robust aggregation rule"

    def __init__(self, *, norm_bound: float | None = None, server_lr: float = 1.0) -> None:
        self.norm_bound = _positive_or_none("norm_bound", norm_bound)
        lr = _positive_or_none("server_lr", server_lr)
        if lr is None:
            raise ConfigError("server_lr must be a finite number > 0, got None")
        self.server_lr = lr
        self.last_rejected: tuple[str, ...] = ()
        self.last_clipped = 0

    # -- the Strategy protocol ----------------------------------------------------------
    def combine(self, global_vector: np.ndarray, local_models: list[LocalModel]) -> np.ndarray:
        """The next global vector: ``global + server_lr * rule(updates)``.

        Raises:
            RoundFailedError: no local model, or every update holds NaN or Inf.
            ConfigError: the rule's settings are impossible for this many updates.
        """
        ids, deltas = self._deltas(global_vector, local_models)
        step = self._aggregate(ids, deltas)
        return (np.asarray(global_vector, dtype=np.float64) + self.server_lr * step).astype(np.float32)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        if state:
            raise ConfigError(f"{self.name} keeps no state, got keys {sorted(state)}")

    # -- shared steps --------------------------------------------------------------------
    def _deltas(self, global_vector: np.ndarray, local_models: list[LocalModel]) -> tuple[list[str], np.ndarray]:
        if not local_models:
            raise RoundFailedError(f"{self.name}: no local model to aggregate")
        base = np.asarray(global_vector, dtype=np.float64)
        ids: list[str] = []
        rows: list[np.ndarray] = []
        rejected: list[str] = []
        for m in local_models:
            vec = np.asarray(m.vector)
            if vec.shape != base.shape:
                raise RoundFailedError(
                    f"{self.name}: local model of client {m.client_id!r} has shape {vec.shape}, the global model has {base.shape}"
                )
            if not np.all(np.isfinite(vec)):
                rejected.append(m.client_id)
                continue
            ids.append(m.client_id)
            rows.append(vec.astype(np.float64) - base)
        self.last_rejected = tuple(rejected)
        if not rows:
            raise RoundFailedError(
                f"{self.name}: all {len(local_models)} updates hold NaN or Inf (clients {rejected[:5]}); nothing to aggregate"
            )
        deltas = np.stack(rows)
        self.last_clipped = 0
        if self.norm_bound is not None:
            deltas, self.last_clipped = norm_bound_updates(deltas, self.norm_bound)
        return ids, deltas

    def _aggregate(self, ids: list[str], deltas: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class CoordinateMedian(_RobustRule):
    """Coordinate-wise median of the updates (Yin et al. 2018).

    Tolerates fewer than half of the participants being arbitrary. Expect slower learning than
    FedAvg with few, heterogeneous clients, and no learning where updates are sparse (per-user
    embedding updates are mostly zero, so their median is zero).

    Args:
        norm_bound: optional L2 bound applied to each update before the median.
        server_lr: server step size on the aggregated update.
    """

    name = "median"
    reveal_reason = "the coordinate-wise median needs every client's individual update"

    def _aggregate(self, ids: list[str], deltas: np.ndarray) -> np.ndarray:
        return np.median(deltas, axis=0)


class TrimmedMean(_RobustRule):
    """Coordinate-wise trimmed mean (Yin et al. 2018).

    In each coordinate the ``floor(trim_fraction * n)`` largest and as many smallest values are
    dropped and the rest averaged; it tolerates up to that many arbitrary updates.

    Args:
        trim_fraction: fraction trimmed from each end, in ``[0, 0.5)``.
        norm_bound: optional L2 bound applied to each update first.
        server_lr: server step size.

    Raises:
        ConfigError: ``trim_fraction`` outside ``[0, 0.5)``; at aggregation, a round so small that
            nothing would be left after trimming.
    """

    name = "trimmed_mean"
    trim_fraction: float
    reveal_reason = "the coordinate-wise trimmed mean needs every client's individual update"

    def __init__(self, *, trim_fraction: float = 0.1, norm_bound: float | None = None, server_lr: float = 1.0) -> None:
        super().__init__(norm_bound=norm_bound, server_lr=server_lr)
        if isinstance(trim_fraction, bool) or not isinstance(trim_fraction, numbers.Real) or not 0.0 <= trim_fraction < 0.5:
            raise ConfigError(f"trim_fraction must be a number in [0, 0.5), got {trim_fraction!r}")
        self.trim_fraction = float(trim_fraction)

    def trimmed(self, n: int) -> int:
        """How many values are dropped from each end of a coordinate with ``n`` updates."""
        return int(math.floor(self.trim_fraction * n + 1e-9))

    def _aggregate(self, ids: list[str], deltas: np.ndarray) -> np.ndarray:
        n = deltas.shape[0]
        k = self.trimmed(n)
        if n - 2 * k < 1:  # unreachable for trim_fraction < 0.5, kept as a guard
            raise ConfigError(f"trim_fraction={self.trim_fraction!r} trims {k} from each end of {n} updates; none would remain")
        if k == 0:
            return deltas.mean(axis=0)
        return np.sort(deltas, axis=0)[k : n - k].mean(axis=0)


class Krum(_RobustRule):
    """Krum and Multi-Krum (Blanchard et al., NeurIPS 2017).

    Each update is scored by the sum of squared L2 distances to its ``n - f - 2`` nearest other
    updates; Krum keeps the update with the lowest score, Multi-Krum averages the ``multi``
    lowest. The guarantee needs ``n > 2f + 2`` participants for ``f`` Byzantine ones.

    Args:
        num_byzantine: ``f``, how many participants may be arbitrary.
        multi: how many selected updates are averaged (1 = Krum); at most ``n - f``.
        norm_bound: optional L2 bound applied to each update first.
        server_lr: server step size.

    Attributes:
        last_selected: ids of the updates kept in the last round.
        last_scores: id -> Krum score in the last round.

    Raises:
        ConfigError: a bad ``num_byzantine`` or ``multi``; at aggregation, a round with
            ``n <= 2f + 2`` updates or ``multi > n - f``, naming the numbers.
    """

    name = "krum"
    num_byzantine: int
    multi: int | None
    reveal_reason = "Krum compares every client's individual update with the others'"

    def __init__(self, *, num_byzantine: int, multi: int = 1, norm_bound: float | None = None, server_lr: float = 1.0) -> None:
        super().__init__(norm_bound=norm_bound, server_lr=server_lr)
        if isinstance(num_byzantine, bool) or not isinstance(num_byzantine, numbers.Integral) or num_byzantine < 0:
            raise ConfigError(f"num_byzantine must be an int >= 0, got {num_byzantine!r}")
        if multi is not None and (isinstance(multi, bool) or not isinstance(multi, numbers.Integral) or multi < 1):
            raise ConfigError(f"multi must be an int >= 1, got {multi!r}")
        self.num_byzantine = int(num_byzantine)
        self.multi = None if multi is None else int(multi)
        self.last_selected: tuple[str, ...] = ()
        self.last_scores: dict[str, float] = {}

    def min_clients(self) -> int:
        """The fewest updates a round needs: ``2f + 3``."""
        return 2 * self.num_byzantine + 3

    def _aggregate(self, ids: list[str], deltas: np.ndarray) -> np.ndarray:
        n, f = deltas.shape[0], self.num_byzantine
        if n <= 2 * f + 2:
            raise ConfigError(
                f"{self.name} with num_byzantine={f} needs n > 2*f + 2 = {2 * f + 2} updates per round, "
                f"got n={n}; lower num_byzantine or sample at least {2 * f + 3} clients per round"
            )
        multi = n - f if self.multi is None else self.multi
        if multi > n - f:
            raise ConfigError(
                f"{self.name}: multi={multi} exceeds n - num_byzantine = {n} - {f} = {n - f}; "
                "Multi-Krum must leave at least num_byzantine updates out"
            )
        sq = np.einsum("ij,ij->i", deltas, deltas)
        dist = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (deltas @ deltas.T), 0.0)
        np.fill_diagonal(dist, np.inf)
        nearest = n - f - 2
        scores = np.sort(dist, axis=1)[:, :nearest].sum(axis=1)
        order = np.argsort(scores, kind="stable")[:multi]
        self.last_scores = {cid: float(s) for cid, s in zip(ids, scores)}
        self.last_selected = tuple(ids[i] for i in sorted(order))
        return deltas[np.sort(order)].mean(axis=0)


class MultiKrum(Krum):
    """Multi-Krum: the mean of the ``multi`` best-scored updates (default ``n - f``)."""

    name = "multikrum"
    reveal_reason = "Multi-Krum compares every client's individual update with the others'"

    def __init__(
        self, *, num_byzantine: int, multi: int | None = None, norm_bound: float | None = None, server_lr: float = 1.0
    ) -> None:
        super().__init__(num_byzantine=num_byzantine, multi=multi, norm_bound=norm_bound, server_lr=server_lr)  # type: ignore[arg-type]
