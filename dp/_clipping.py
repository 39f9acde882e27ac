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

    Two halves, one per party:

    - client (``client_half``, a static method: the client needs only the bound the server
      broadcast): clip the update to ``bound`` and compute the bit ``b_i = 1[norm <= bound]``;
      the bit is summed with the update (plaintext or masked), never sent on its own.
    - server: ``noise_count`` adds ``N(0, count_stddev^2)`` to the sum of the bits (the
      server sees the raw sum, as in the paper); ``update`` estimates the unclipped fraction
      ``b = (noised_sum - survivors / 2) / expected_clients + 1/2`` and moves the bound
      geometrically, ``C <- C exp(-learning_rate (b - target_quantile))``, returning the
      ``QuantileEvent`` for the ledger.

    Privacy: ``noised_sum - survivors/2`` is the noised sum of the centred bits ``b_i - 1/2``,
    so adding or removing one client moves it by exactly 1/2 (``COUNT_SENSITIVITY``) and the
    estimate by ``1 / (2 expected_clients)``; the noise standard deviation is
    ``count_noise_multiplier * COUNT_SENSITIVITY``. The count is computed on the same sampled
    clients as the round's update noise, so the accountants join the two into one Gaussian
    with the effective noise multiplier ``(z_update^-2 + count_noise_multiplier^-2)^-1/2``
    (Sec. 3.1); ``update_noise_multiplier`` splits a calibrated effective multiplier.

    Raises:
        DPValueError: a parameter out of range.
    """

    #: Sensitivity of the centred count ``sum(b_i - 1/2)`` to adding or removing one client.
    COUNT_SENSITIVITY = 0.5

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
        """The clip bound clients use this round (broadcast with the model)."""
        return self._bound

    @property
    def count_stddev(self) -> float:
        """Standard deviation of the noise on the sum of the bits: ``count_noise_multiplier / 2``."""
        return self.count_noise_multiplier * self.COUNT_SENSITIVITY

    # ----------------------------------------------------------------------------- client half

    @staticmethod
    def client_half(vec: np.ndarray, *, bound: float) -> tuple[np.ndarray, int]:
        """Client: ``(clipped, bit)``: ``vec`` clipped to ``bound`` and ``1`` if it was within it, else ``0``."""
        clipped, norm = l2_clip(chk.float_vector("vec", vec), chk.positive("bound", bound))
        return clipped, int(norm <= bound)

    def clip(self, vec: np.ndarray) -> tuple[np.ndarray, float]:
        """Client (in-process shortcut): ``(clipped, norm_before)`` at the current bound."""
        return l2_clip(chk.float_vector("vec", vec), self._bound)

    def below(self, norm: float) -> int:
        """The bit ``1`` if ``norm <= bound`` else ``0`` (what ``client_half`` sends)."""
        return int(chk.non_negative("norm", norm) <= self._bound)

    # ----------------------------------------------------------------------------- server half

    def noise_count(self, bits_sum: float, *, rng: np.random.Generator) -> float:
        """Server: ``bits_sum + N(0, count_stddev^2)``, the only form of the count that may be used.

        Raises:
            DPTypeError: ``rng`` not a ``numpy.random.Generator``; DPValueError: ``bits_sum < 0``.
        """
        if not isinstance(rng, np.random.Generator):
            raise DPTypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
        return chk.non_negative("bits_sum", bits_sum) + float(rng.normal(0.0, self.count_stddev))

    def estimate(self, noised_sum: float, *, survivors: int, expected_clients: float) -> float:
        """The private unclipped fraction ``(noised_sum - survivors/2) / expected_clients + 1/2``."""
        n = chk.integer("survivors", survivors, minimum=0)
        m = chk.positive("expected_clients", expected_clients)
        return (chk.real("noised_sum", noised_sum) - n / 2.0) / m + 0.5

    def update(
        self,
        noised_sum: float,
        *,
        expected_clients: float,
        participants: int,
        survivors: int,
        round_index: int,
        sample_rate: float = 1.0,
        sampling: str = "poisson",
    ) -> tuple[float, QuantileEvent]:
        """Server: move the bound from the noised sum of ``survivors`` clients' bits.

        Args:
            noised_sum: ``noise_count(sum of bits)``; never the raw sum.
            expected_clients: the public denominator (expected clients per round, ``q * N``).
            participants, survivors: clients sampled, and clients whose bit is in the sum.
            round_index, sample_rate, sampling: as in the round's update-noise event.

        Returns:
            ``(new_bound, event)``; the object now uses ``new_bound``.
        """
        fraction = self.estimate(noised_sum, survivors=survivors, expected_clients=expected_clients)
        before = self._bound
        after = before * math.exp(-self.learning_rate * (fraction - self.target_quantile))
        event = self.plan(round_index=round_index, participants=participants, survivors=survivors,
                          sample_rate=sample_rate, sampling=sampling, bound_after=after)  # fmt: skip
        self._bound = after
        return after, event

    def plan(
        self,
        *,
        round_index: int,
        participants: int,
        survivors: int,
        sample_rate: float = 1.0,
        sampling: str = "poisson",
        bound_after: float | None = None,
    ) -> QuantileEvent:
        """The ``QuantileEvent`` of a round's count, for planning the budget before the round runs.

        Its cost does not depend on the survivors; the bound after the round is not known yet
        and is recorded as the bound before.
        """
        return QuantileEvent(
            round_index=round_index,
            noise_multiplier=self.count_noise_multiplier,
            sample_rate=sample_rate,
            participants=participants,
            survivors=survivors,
            target_quantile=self.target_quantile,
            learning_rate=self.learning_rate,
            bound_before=self._bound,
            bound_after=self._bound if bound_after is None else bound_after,
            sampling=sampling,
        )

    @staticmethod
    def update_noise_multiplier(*, effective_noise_multiplier: float, count_noise_multiplier: float) -> float:
        """The update noise multiplier that, joined with the count's, gives ``effective_noise_multiplier``.

        ``z_update = (z_eff^-2 - z_count^-2)^-1/2`` (Andrew et al. 2021, Sec. 3.1), rounded up so
        that the joint multiplier the accountant recomputes is never below ``z_eff``.

        Raises:
            DPValueError: ``count_noise_multiplier <= effective_noise_multiplier`` (the count alone
                would already cost more than the target).
        """
        z = chk.positive("effective_noise_multiplier", effective_noise_multiplier)
        zb = chk.positive("count_noise_multiplier", count_noise_multiplier)
        if zb <= z:
            raise DPValueError(
                f"count_noise_multiplier must be > effective_noise_multiplier={z!r} (the count alone would "
                f"cost the whole budget), got {count_noise_multiplier!r}; Andrew et al. suggest expected_clients / 20"
            )
        out = (z**-2 - zb**-2) ** -0.5
        while (out**-2 + zb**-2) ** -0.5 < z:
            out = float(np.nextafter(out, math.inf))
        return float(out)

    def __repr__(self) -> str:
        return (
            f"AdaptiveClip(bound={self._bound!r}, target_quantile={self.target_quantile!r}, "
            f"learning_rate={self.learning_rate!r}, count_noise_multiplier={self.count_noise_multiplier!r})"
        )
