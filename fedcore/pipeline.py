"""The update pipeline: clip, weight, protect, unprotect, noise, average.

Each stage is a small object with one job; :class:`UpdatePipeline` composes them, checks in
:meth:`UpdatePipeline.build` that they fit together (before any round runs), and turns the
round's client results into the :class:`~fedcore.strategies.Aggregate` a strategy sees.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from secagg import PlaintextSum, SecureSum, Stage, SumResult

from .client import ClientResult
from .errors import ConfigError, RoundFailedError
from .strategies import Aggregate

__all__ = ["Clipper", "CentralNoise", "UpdatePipeline", "RoundAggregate"]

WEIGHTINGS = ("examples", "uniform")


class Clipper(Protocol):
    """Client-side L2 clipping (``dp.L2Clip`` or ``dp.AdaptiveClip``)."""

    bound: float

    def clip(self, vector: np.ndarray) -> tuple[np.ndarray, float]:
        """The vector scaled into the L2 ball of radius ``bound``, and its norm before clipping."""


class CentralNoise(Protocol):
    """Server-side Gaussian noise on the unprotected sum (``dp.CentralGaussian``)."""

    noise_multiplier: float

    def add(self, total: np.ndarray, *, rng: np.random.Generator) -> np.ndarray:
        """``total`` plus Gaussian noise calibrated to the clip bound."""


@dataclass(frozen=True)
class RoundAggregate:
    """What the server learned in one round, and what it cost to learn it."""

    aggregate: Aggregate
    sum_result: SumResult
    norms: dict[str, float] = field(default_factory=dict)
    clipped: int = 0


class UpdatePipeline:
    """Client stages (clip, weight) and the server's protected sum, noise and average.

    Args:
        backend: the protection mode (``secagg.PlaintextSum``, ``MaskedSum``, ``CKKSSum``...).
        clip: optional client-level L2 clipping; required by every protected mode, since the
            encoders need a bound on each coordinate, and by client-level DP.
        weighting: ``"examples"`` (weight ``min(n_k, max_examples) / max_examples``, appended as
            one more coordinate so the sum of weights is learned under the same protection) or
            ``"uniform"`` (every client weighs one).
        max_examples: the weight bound for ``"examples"`` weighting; a client claiming more is
            capped at weight one.
        central_noise: optional Gaussian noise the server adds to the sum (client-level DP with a
            trusted server); needs ``clip`` and uniform weighting.
        expected_clients: the fixed denominator of the average under client-level DP
            (McMahan et al. 2018: sensitivity is bounded only with a fixed denominator).
    """

    def __init__(
        self,
        *,
        backend: SecureSum | None = None,
        clip: Clipper | None = None,
        weighting: str = "examples",
        max_examples: int | None = None,
        central_noise: CentralNoise | None = None,
    ) -> None:
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if max_examples is not None and max_examples < 1:
            raise ConfigError(f"max_examples must be >= 1, got {max_examples!r}")
        self.backend: SecureSum = backend if backend is not None else PlaintextSum()
        self.clip = clip
        self.weighting = weighting
        self.max_examples = max_examples
        self.central_noise = central_noise
        self.expected_clients: float | None = None
        self._built = False
        self._rows = np.empty((0, 0), dtype=np.float32)

    @property
    def client_level_dp(self) -> bool:
        """Whether noise calibrated to the clip bound protects each client's whole contribution."""
        return self.central_noise is not None or getattr(self.backend, "integer_noise", None) is not None

    def build(self, *, dimension: int, num_clients: int, expected_clients: float) -> None:
        """Check that the stages fit together for this model and federation.

        Raises:
            ConfigError: with what to change, if they do not.
        """
        if dimension < 1:
            raise ConfigError(f"dimension must be >= 1, got {dimension!r}")
        protected = self.backend.mode != "plaintext"
        if protected and self.clip is None:
            raise ConfigError(
                f"aggregation mode {self.backend.mode!r} needs a bound on every coordinate: set a clip "
                "(client-level L2 clipping) so each coordinate lies within the encoder's value_bound"
            )
        value_bound = getattr(self.backend, "value_bound", None)
        if protected and value_bound is not None and self.clip is not None and self.clip.bound > value_bound:
            raise ConfigError(
                f"clip bound {self.clip.bound!r} exceeds the {self.backend.mode} backend's "
                f"value_bound={value_bound!r}; raise value_bound or lower the clip"
            )
        max_clients = getattr(self.backend, "max_clients", None)
        if max_clients is not None and num_clients > max_clients and protected:
            # A round may still be smaller; sampling decides. Refuse only if it cannot be.
            if expected_clients > max_clients:
                raise ConfigError(
                    f"the backend allows at most max_clients={max_clients} per round, but "
                    f"{expected_clients:g} clients are expected per round"
                )
        if self.client_level_dp:
            if self.clip is None:
                raise ConfigError("client-level DP noise needs clip: noise is calibrated to the clip bound")
            if self.weighting != "uniform":
                raise ConfigError(
                    "client-level DP needs weighting='uniform': example-count weights would change the "
                    "sensitivity the noise is calibrated to"
                )
        if self.central_noise is not None and getattr(self.backend, "integer_noise", None) is not None:
            raise ConfigError("choose central noise or distributed (integer) noise, not both")
        if self.weighting == "examples" and self.max_examples is None:
            raise ConfigError("weighting='examples' needs max_examples (the weight bound)")
        self.expected_clients = float(expected_clients)
        self._built = True

    def run(
        self,
        results: Sequence[ClientResult],
        *,
        round_index: int,
        rng: np.random.Generator,
        dropouts: dict[str, Stage] | None = None,
    ) -> RoundAggregate:
        """Protect, sum and average one round's client results.

        Raises:
            ConfigError: :meth:`build` was not called.
            secagg.DropoutError: too few clients survived (nothing is revealed).
        """
        if not self._built:
            raise ConfigError("call UpdatePipeline.build(...) before running rounds")
        vectors: dict[str, np.ndarray] = {}
        norms: dict[str, float] = {}
        clipped = 0
        if self.weighting == "examples" and results:
            rows = self._weighted_rows(len(results), results[0].update.size + 1)
        for i, r in enumerate(results):
            vec = r.update.astype(np.float32, copy=False)
            if self.clip is not None:
                vec, norm = self.clip.clip(vec)
                norms[r.client_id] = float(norm)
                clipped += int(norm > self.clip.bound)
            if self.weighting == "examples":
                assert self.max_examples is not None
                weight = np.float32(min(r.num_examples, self.max_examples) / self.max_examples)
                weighted = rows[i]
                if vec.shape != (weighted.size - 1,):
                    raise ValueError(
                        f"update of client {r.client_id!r} has shape {vec.shape}, expected ({weighted.size - 1},) "
                        "like the first client's"
                    )
                np.multiply(vec, weight, out=weighted[:-1])
                weighted[-1] = weight
                vec = weighted
            vectors[r.client_id] = vec.astype(np.float32, copy=False)
        summed = self.backend.aggregate(vectors, round_index=round_index, rng=rng, dropouts=dropouts)
        total = summed.total
        if self.central_noise is not None:
            total = self.central_noise.add(total, rng=rng)
        contributors = len(summed.contributors)
        if contributors == 0:
            raise RoundFailedError(f"round {round_index}: no client's input reached the server ({len(results)} dropped)")
        if self.weighting == "examples":
            weight_sum = float(total[-1])
            if weight_sum <= 0:
                raise ConfigError(f"the contributors' weights sum to {weight_sum!r}; nothing to average")
            mean = total[:-1] / weight_sum
        else:
            denominator = self.expected_clients if self.client_level_dp else contributors
            mean = total / max(float(denominator or 1), 1.0)
        return RoundAggregate(Aggregate(mean=mean, contributors=contributors), summed, norms, clipped)

    def _weighted_rows(self, count: int, length: int) -> np.ndarray:
        """``count`` float32 rows of ``length`` for the weighted vectors, reused from round to round.

        Fresh memory for every round costs a page fault per 4 KiB on first touch, which on a
        100-client MF round took longer than the weighting itself. The rows are only read
        inside :meth:`run`: backends return new arrays, never views of their inputs.
        """
        if self._rows.shape[0] < count or self._rows.shape[1] != length:
            self._rows = np.empty((count, length), dtype=np.float32)
        return self._rows[:count]

    def describe(self) -> dict[str, Any]:
        """The stages' parameters (backend, clip, weighting, noise) for reports and summaries."""
        return {
            "backend": self.backend.describe(),
            "clip_bound": None if self.clip is None else self.clip.bound,
            "weighting": self.weighting,
            "max_examples": self.max_examples,
            "central_noise_multiplier": None if self.central_noise is None else self.central_noise.noise_multiplier,
        }
