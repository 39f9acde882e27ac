"""Client-level clipping of flat update vectors: fixed, and adaptive by quantile tracking."""

from __future__ import annotations

import math

import numpy as np

from . import _checks as chk
from ._errors import DPTypeError, DPValueError
from ._events import QuantileEvent

__all__ = ["L2Clip", "AdaptiveClip", "l2_clip"]


def l2_clip(vec: np.ndarray, bound: float) -> tuple[np.ndarray, float]:
    """Scale ``vec`` so its L2 norm is at most ``bound``; return ``(clipped, norm_before)``.

    A vector already within the bound (zero included) comes back as an unchanged copy. The
    norm is computed in float64 and the result is checked after casting back to the input
    dtype, so ``||clipped|| <= bound`` holds in the dtype returned.
    """
    v64 = vec.astype(np.float64, copy=False)
    norm = float(np.linalg.norm(v64))
    if norm <= bound:
        return vec.copy(), norm
    factor = bound / norm
    for _ in range(64):
        out = (v64 * factor).astype(vec.dtype, copy=False)
        if float(np.linalg.norm(out.astype(np.float64))) <= bound:
            return out, norm
        factor = float(np.nextafter(factor, 0.0)) * (1.0 - 4 * float(np.finfo(vec.dtype).eps))
    return (v64 * factor * 0.5).astype(vec.dtype), norm  # pragma: no cover - never reached in practice


class L2Clip:
    """Fixed L2 clipping of a client's update (DP-FedAvg, McMahan et al. ICLR 2018).

    Runs on the client; the server only ever sees clipped (and later noised or masked) sums.

    Raises:
        DPValueError: ``bound`` not > 0; DPTypeError / DPValueError on a bad vector.
    """

    def __init__(self, bound: float) -> None:
        self._bound = chk.positive("bound", bound)

    @property
    def bound(self) -> float:
        """The L2 bound every clipped vector respects (the sensitivity noise is calibrated to)."""
        return self._bound

    def clip(self, vec: np.ndarray) -> tuple[np.ndarray, float]:
        """Return ``(clipped, norm_before)`` with ``||clipped||_2 <= bound``."""
        return l2_clip(chk.float_vector("vec", vec), self._bound)

    def __repr__(self) -> str:
        return f"L2Clip(bound={self._bound!r})"


class AdaptiveClip:
    """Adaptive clipping by private quantile tracking (Andrew et al. NeurIPS 2021, Alg. 1).

    Client side: ``clip(vec)`` clips to the current bound and ``below(norm)`` gives the bit
    ``b_i = 1[norm <= bound]`` to send along (summed like the update). Server side:
    ``update(bits_sum, ...)`` adds Gaussian noise to the centred count
    ``sum(b_i - 1/2)`` (sensitivity 1/2, standard deviation ``count_noise_multiplier / 2``),
    estimates the fraction of unclipped clients ``b = (noisy + survivors/2) / expected_clients``
    and moves the bound geometrically: ``C <- C * exp(-learning_rate * (b - target_quantile))``.
    The count's privacy cost is returned as its own ``QuantileEvent`` for the ledger. The
    server sees the noisy count only; the count noise is added centrally (the server is
    trusted with the raw count, as in the paper).

    Raises:
        DPValueError: a parameter out of range.
    """

    def __init__(
        self,
        *,
        initial_bound: float,
        target_quantile: float = 0.5,
        learning_rate: float = 0.2,
        count_noise_multiplier: float,
    ) -> None:
        self._bound = chk.positive("initial_bound", initial_bound)
        self.target_quantile = chk.open_unit("target_quantile", target_quantile)
        self.learning_rate = chk.positive("learning_rate", learning_rate)
        self.count_noise_multiplier = chk.positive("count_noise_multiplier", count_noise_multiplier)

    @property
    def bound(self) -> float:
        """The clip bound clients use this round."""
        return self._bound

    def clip(self, vec: np.ndarray) -> tuple[np.ndarray, float]:
        """Client: ``(clipped, norm_before)`` at the current bound."""
        return l2_clip(chk.float_vector("vec", vec), self._bound)

    def below(self, norm: float) -> float:
        """Client: the bit ``1.0`` if ``norm <= bound`` else ``0.0``."""
        return 1.0 if chk.non_negative("norm", norm) <= self._bound else 0.0

    def update(
        self,
        bits_sum: float,
        *,
        expected_clients: float,
        participants: int,
        survivors: int,
        round_index: int,
        rng: np.random.Generator,
        sample_rate: float = 1.0,
        sampling: str = "poisson",
    ) -> tuple[float, QuantileEvent]:
        """Server: update the bound from the summed bits of ``survivors`` clients.

        Returns:
            ``(new_bound, event)``; the object now uses ``new_bound``.

        Raises:
            DPValueError: ``bits_sum`` outside ``[0, survivors]`` or another bad parameter.
            DPTypeError: ``rng`` not a ``numpy.random.Generator``.
        """
        if not isinstance(rng, np.random.Generator):
            raise DPTypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        n = chk.integer("survivors", survivors, minimum=0)
        total = chk.non_negative("bits_sum", bits_sum)
        if total > n:
            raise DPValueError(f"bits_sum must be <= survivors={n}, got {bits_sum!r}")
        m = chk.positive("expected_clients", expected_clients)
        centred = total - n / 2.0
        noisy = centred + rng.normal(0.0, self.count_noise_multiplier / 2.0)
        fraction = (noisy + n / 2.0) / m
        before = self._bound
        after = before * math.exp(-self.learning_rate * (fraction - self.target_quantile))
        event = QuantileEvent(
            round_index=round_index,
            noise_multiplier=self.count_noise_multiplier,
            sample_rate=sample_rate,
            participants=participants,
            survivors=n,
            target_quantile=self.target_quantile,
            learning_rate=self.learning_rate,
            bound_before=before,
            bound_after=after,
            sampling=sampling,
        )
        self._bound = after
        return after, event

    def __repr__(self) -> str:
        return (
            f"AdaptiveClip(bound={self._bound!r}, target_quantile={self.target_quantile!r}, "
            f"learning_rate={self.learning_rate!r}, count_noise_multiplier={self.count_noise_multiplier!r})"
        )
