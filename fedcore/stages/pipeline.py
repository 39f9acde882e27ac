"""The update pipeline: clip, weight, protect, unprotect, noise, average.

Each stage is a small object with one job; :class:`UpdatePipeline` composes them, checks in
:meth:`UpdatePipeline.build` that they fit together (before any round runs), and turns the
round's client results into the :class:`~fedcore.strategies.Aggregate` a strategy sees.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol, cast

import numpy as np

import dp
from secagg import MaskedSum, PlaintextSum, SecureSum, SumResult

from ..errors import ConfigError, RoundFailedError
from ..strategies._strategies import Aggregate

__all__ = ["Clipper", "UpdatePipeline", "RoundAggregate"]

WEIGHTINGS = ("examples", "uniform")


class Clipper(Protocol):
    """Client-side L2 clipping (``dp.L2Clip`` or ``dp.AdaptiveClip``): the bound clients clip to."""

    @property
    def bound(self) -> float:
        """The L2 bound of this round."""


@dataclass(frozen=True)
class RoundAggregate:
    """What the server learned in one round, and what it cost to learn it."""

    aggregate: Aggregate
    sum_result: SumResult
    events: tuple[Any, ...] = ()


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
        user_bound: user-level DP across silos: each client sends the sum of its users' gradients,
            each clipped to this bound (``TrainConfig.user_clip``), so the noise's sensitivity is
            ``user_bound`` and its events say ``unit="user"``; ``clip`` then bounds a client's
            whole sum for the encoder (projection is 1-Lipschitz, so one user still moves it by
            at most ``user_bound``). Needs client-level noise.
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
        central_noise: dp.CentralGaussian | None = None,
        user_bound: float | None = None,
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
        if user_bound is not None and not (
            isinstance(user_bound, (int, float)) and not isinstance(user_bound, bool) and user_bound > 0
        ):
            raise ConfigError(f"user_bound must be a number > 0 or None, got {user_bound!r}")
        self.user_bound = None if user_bound is None else float(user_bound)
        self.expected_clients: float | None = None
        self._built = False

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
        if self.user_bound is not None:
            if not self.client_level_dp:
                raise ConfigError("user_bound is the sensitivity of client-level noise, but no central or integer noise is set")
            if self.adaptive:
                raise ConfigError("user_bound fixes each user's bound; adaptive clipping would move the client's instead")
            integer = getattr(self.backend, "integer_noise", None)
            if integer is not None and integer.beta != 0:
                raise ConfigError(
                    f"user_bound with integer_noise.beta={integer.beta!r}: one user's share of a rounded sum is bounded "
                    "only for unconditional stochastic rounding (beta=0)"
                )
        if self.client_level_dp:
            if self.clip is None and self.user_bound is None:
                raise ConfigError("client-level DP noise needs clip: noise is calibrated to the clip bound")
            if self.weighting != "uniform":
                raise ConfigError(
                    "client-level DP needs weighting='uniform': example-count weights would change the "
                    "sensitivity the noise is calibrated to"
                )
        integer_noise = getattr(self.backend, "integer_noise", None)
        if self.central_noise is not None and integer_noise is not None:
            raise ConfigError("choose central noise or distributed (integer) noise, not both")
        if self.weighting == "examples" and self.max_examples is None:
            raise ConfigError("weighting='examples' needs max_examples (the weight bound)")
        self._check_noise_spec(self.vector_length(dimension), integer_noise)
        if self.adaptive and integer_noise is not None:
            raise ConfigError(
                "adaptive clipping moves the clip bound each round, but distributed integer noise is sized for a fixed "
                f"integer_noise.clip_bound={integer_noise.clip_bound!r}; use a fixed dp.L2Clip, or central noise"
            )
        if protected and expected_clients < 2:
            raise ConfigError(
                f"aggregation mode {self.backend.mode!r} with {expected_clients:g} client(s) per round protects "
                "nothing: the sum of one client is its update; use at least 2 clients per round or 'plaintext'"
            )
        self.expected_clients = float(expected_clients)
        self._built = True

    def _check_noise_spec(self, length: int, integer_noise: Any) -> None:
        """A noise stage takes its sensitivity from the clip stage and its size from the vector.

        Raises:
            ConfigError: naming both settings when they disagree.
        """
        clip_bound = self.sensitivity
        what = "the clip stage's bound" if self.user_bound is None else "user_bound"
        for name, noise in (("central_noise", self.central_noise), ("integer_noise", integer_noise)):
            if noise is None:
                continue
            if clip_bound is not None and float(noise.clip_bound) != clip_bound:
                raise ConfigError(
                    f"{name}.clip_bound={noise.clip_bound!r} differs from {what} {clip_bound!r}: "
                    "the noise would be calibrated to a sensitivity the clip does not enforce; give both the same bound"
                )
        if integer_noise is not None and int(integer_noise.dim) != length:
            raise ConfigError(
                f"integer_noise.dim={integer_noise.dim!r} but clients send {length} coordinates "
                "(the shared parameters, plus one for the weight with example weighting); set dim to that"
            )

    @property
    def sensitivity(self) -> float | None:
        """The L2 bound the noise is calibrated to: one user's (``user_bound``), else the clip stage's."""
        if self.user_bound is not None:
            return self.user_bound
        return None if self.clip is None else float(self.clip.bound)

    def vector_length(self, dimension: int) -> int:
        """Coordinates a client sends for a model of ``dimension`` shared parameters."""
        return dimension + (self.weighting == "examples") + self.adaptive

    @property
    def adaptive(self) -> bool:
        """Whether the clip bound tracks a quantile of the update norms (``dp.AdaptiveClip``)."""
        return isinstance(self.clip, dp.AdaptiveClip)

    def broadcast_bound(self) -> float | None:
        """The clip bound the server announces with this round's PROTECT (capped by the encoder's range)."""
        if self.clip is None:
            return None
        bound = float(self.clip.bound)
        value_bound = getattr(self.backend, "value_bound", None)
        return min(bound, float(value_bound)) if value_bound is not None else bound

    def prepare(
        self, update: np.ndarray, *, num_examples: float, staleness_weight: float = 1.0, clip_bound: float | None = None
    ) -> np.ndarray:
        """The client half: clip, scale by the staleness weight, weight by examples, append the quantile bit.

        Runs in the client party; the result goes only into the client's protection session.
        ``clip_bound`` is the bound the server announced (adaptive clipping moves it each round).

        Layout: ``[update * weight, weight (examples weighting), bit (adaptive clipping)]``.

        Raises:
            ConfigError: :meth:`build` was not called, or a staleness weight outside (0, 1].
        """
        if not self._built:
            raise ConfigError("call UpdatePipeline.build(...) before running rounds")
        if not 0.0 < staleness_weight <= 1.0:
            raise ConfigError(f"staleness_weight must lie in (0, 1], got {staleness_weight!r}")
        vec = np.asarray(update, dtype=np.float32)
        bit = 1
        if self.clip is not None:
            bound = float(self.clip.bound)
            if clip_bound is not None:  # a fixed clip never grows at the server's word; an adaptive one follows it
                bound = float(clip_bound) if self.adaptive else min(bound, float(clip_bound))
            vec, bit = dp.AdaptiveClip.client_half(vec, bound=bound)
            vec = vec.astype(np.float32, copy=False)
        if staleness_weight != 1.0:
            vec = vec * np.float32(staleness_weight)  # |fl(s x)| <= |x| for s <= 1: still within the clip bound
        extra = (self.weighting == "examples") + self.adaptive
        out = np.empty(vec.size + extra, dtype=np.float32)
        weight = np.float32(1.0)
        if self.weighting == "examples":
            assert self.max_examples is not None
            weight = np.float32(min(num_examples, self.max_examples) / self.max_examples)
            out[vec.size] = weight
        np.multiply(vec, weight, out=out[: vec.size])
        if self.adaptive:
            out[-1] = bit
        return out

    def finish(
        self,
        summed: SumResult,
        *,
        round_index: int,
        rng: np.random.Generator,
        participants: int,
        sample_rate: float = 1.0,
        sampling: str = "poisson",
    ) -> RoundAggregate:
        """The server half: the quantile step, central noise on the unprotected sum, the average.

        Returns the aggregate and the ledger events of the round's client-level mechanisms
        (update noise, and the noised count of adaptive clipping).

        Raises:
            RoundFailedError: no client's input reached the server.
            ConfigError: the contributors' weights sum to zero or less.
        """
        total = np.asarray(summed.total, dtype=np.float64)
        contributors = len(summed.contributors)
        if contributors == 0:
            raise RoundFailedError(f"round {round_index}: no client's input reached the server")
        bound = self.broadcast_bound()
        events: list[Any] = self.noise_events(
            round_index=round_index, participants=participants, survivors=contributors,
            sample_rate=sample_rate, sampling=sampling,
        )  # fmt: skip
        if self.adaptive:
            clip = self.clip
            assert isinstance(clip, dp.AdaptiveClip)
            noised = clip.noise_count(max(float(total[-1]), 0.0), rng=rng)
            _, quantile = clip.update(
                noised, expected_clients=float(self.expected_clients or contributors), participants=participants,
                survivors=contributors, round_index=round_index, sample_rate=sample_rate, sampling=sampling,
            )  # fmt: skip
            events.append(quantile)
            total = total[:-1]
        if self.central_noise is not None:
            noise = replace(self.central_noise, clip_bound=bound) if self.adaptive and bound is not None else self.central_noise
            total = noise.add(total, rng=rng)
        if self.weighting == "examples":
            weight_sum = float(total[-1])
            if weight_sum <= 0:
                raise ConfigError(f"the contributors' weights sum to {weight_sum!r}; nothing to average")
            mean = total[:-1] / weight_sum
        else:
            denominator = self.expected_clients if self.client_level_dp else contributors
            mean = total / max(float(denominator or 1), 1.0)
        return RoundAggregate(Aggregate(mean=mean, contributors=contributors), summed, tuple(events))

    def noise_events(
        self, *, round_index: int, participants: int, survivors: int, sample_rate: float, sampling: str
    ) -> list[Any]:
        """The ledger event of the client-level update noise for one protected sum (none without it)."""
        unit = "client" if self.user_bound is None else "user"
        if self.central_noise is not None:
            noise = self.central_noise
            bound = self.broadcast_bound()
            if self.adaptive and bound is not None:
                noise = replace(noise, clip_bound=bound)
            return [noise.event(
                round_index=round_index, participants=participants, survivors=survivors, sample_rate=sample_rate,
                sampling=sampling, unit=unit,
            )]  # fmt: skip
        integer_noise = getattr(self.backend, "integer_noise", None)
        if integer_noise is not None:
            encoder = cast(MaskedSum, self.backend).encoder  # the backend that adds integer noise encodes
            return [integer_noise.event(
                round_index=round_index, scale=encoder.scale, participants=participants,
                survivors=survivors, sample_rate=sample_rate, sampling=sampling, unit=unit,
            )]  # fmt: skip
        return []

    def planned_events(
        self, *, round_index: int, participants: int, survivors: int, sample_rate: float, sampling: str
    ) -> list[Any]:
        """The events a round would record with ``survivors`` survivors (the budget's worst case)."""
        events = self.noise_events(
            round_index=round_index, participants=participants, survivors=survivors, sample_rate=sample_rate,
            sampling=sampling,
        )  # fmt: skip
        if self.adaptive:
            clip = self.clip
            assert isinstance(clip, dp.AdaptiveClip)
            events.append(clip.plan(
                round_index=round_index, participants=participants, survivors=survivors, sample_rate=sample_rate,
                sampling=sampling,
            ))  # fmt: skip
        return events

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must keep: stage types, bounds and the protection mode."""
        backend = self.backend
        return {
            "backend": f"{type(backend).__name__}:{backend.mode}",
            "value_bound": getattr(backend, "value_bound", None),
            "signed_keys": getattr(backend, "signed_keys", None),
            "integer_noise": repr(getattr(backend, "integer_noise", None)),
            "clip": None if self.clip is None else type(self.clip).__name__,
            "weighting": self.weighting,
            "max_examples": self.max_examples,
            "central_noise": repr(self.central_noise),
            "user_bound": self.user_bound,
        }

    def describe(self) -> dict[str, Any]:
        """The stages' parameters (backend, clip, weighting, noise) for reports and summaries."""
        return {
            "backend": self.backend.describe(),
            "clip_bound": None if self.clip is None else self.clip.bound,
            "weighting": self.weighting,
            "max_examples": self.max_examples,
            "central_noise_multiplier": None if self.central_noise is None else self.central_noise.noise_multiplier,
            "user_bound": self.user_bound,
        }
