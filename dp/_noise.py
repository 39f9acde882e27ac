"""Client-level noise: central Gaussian, and distributed Skellam / discrete Gaussian.

Central noise is added by the server to the decoded sum, so the server is trusted with
the un-noised sum. Distributed noise is added by every client to its encoded integer
vector before masking, so the server only ever sees a noised sum; it is sized so that the
sum over at least ``min_clients`` surviving clients carries the target noise. Both
distributed classes structurally satisfy ``secagg.IntegerNoise`` (``sample`` and
``sum_bound``) without importing ``secagg``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from . import _checks as chk
from ._errors import DPTypeError, DPValueError
from ._events import DiscreteGaussianEvent, GaussianEvent, SkellamEvent

__all__ = [
    "CentralGaussian",
    "SkellamNoise",
    "DiscreteGaussianNoise",
    "rounded_l2_sensitivity",
    "rounded_l1_sensitivity",
    "sample_discrete_gaussian",
]


def _rng(rng: object) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise DPTypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return rng


def rounded_l2_sensitivity(scaled_bound: float, *, dim: int, beta: float = 0.0) -> float:
    """L2 norm bound of a vector of L2 norm ``scaled_bound`` after rounding to integers.

    Kairouz, Liu, Steinke (ICML 2021), Thm. 1 / Prop. 22 (also Agarwal et al. 2021, Sec. 4):
    any rounding moves each coordinate by less than 1, so ``c + sqrt(d)`` always holds
    (``beta = 0``). With conditional randomized rounding at ``beta > 0`` (the encoder
    re-rounds until the bound holds), ``sqrt(c^2 + d/4 + sqrt(2 ln(1/beta)) (c + sqrt(d)/2))``
    holds too; the smaller of the two is returned.
    """
    c = float(scaled_bound)
    bound = c + math.sqrt(dim)
    if beta > 0:
        bound = min(bound, math.sqrt(c * c + dim / 4.0 + math.sqrt(2.0 * math.log(1.0 / beta)) * (c + math.sqrt(dim) / 2.0)))
    return bound


def rounded_l1_sensitivity(l2: float, *, dim: int) -> float:
    """L1 bound of an integer vector with L2 norm ``l2``: ``l2 * min(sqrt(d), l2)``.

    ``L1 <= sqrt(d) L2`` in general, and ``L1 <= L2^2`` for integer vectors (``|x| <= x^2``).
    """
    return float(l2) * min(math.sqrt(dim), float(l2))


def sample_discrete_gaussian(sigma: float, size: int, *, rng: np.random.Generator) -> np.ndarray:
    """``size`` draws of the discrete Gaussian ``N_Z(0, sigma^2)`` as int64.

    Rejection sampling from the discrete Laplace (Canonne, Kamath, Steinke NeurIPS 2020,
    Alg. 3), vectorised with numpy; acceptance probabilities are computed in floating point
    (the paper's exact rational arithmetic is not reproduced).
    """
    sigma = chk.positive("sigma", sigma)
    n = chk.integer("size", size, minimum=0)
    rng = _rng(rng)
    t = math.floor(sigma) + 1
    p = -math.expm1(-1.0 / t)  # success probability of the geometric: 1 - exp(-1/t)
    out = np.empty(n, dtype=np.int64)
    filled = 0
    while filled < n:
        want = n - filled
        batch = int(want * 1.6) + 16
        y = (rng.geometric(p, batch) - 1) - (rng.geometric(p, batch) - 1)
        dev = np.abs(y) - sigma * sigma / t
        keep = rng.random(batch) < np.exp(-(dev * dev) / (2.0 * sigma * sigma))
        acc = y[keep][:want]
        out[filled : filled + acc.size] = acc
        filled += acc.size
    return out


@dataclass(frozen=True, kw_only=True)
class CentralGaussian:
    """Gaussian noise the server adds to the decoded sum (DP-FedAvg, McMahan et al. 2018).

    The server sees the un-noised sum before adding noise (trusted server). ``clip_bound``
    is the L2 sensitivity of the sum: the clip bound times the largest aggregation weight.

    Attributes:
        noise_multiplier: noise standard deviation over ``clip_bound``.
        clip_bound: L2 sensitivity of the sum.
    """

    noise_multiplier: float
    clip_bound: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_multiplier", chk.positive("noise_multiplier", self.noise_multiplier))
        object.__setattr__(self, "clip_bound", chk.positive("clip_bound", self.clip_bound))

    @property
    def stddev(self) -> float:
        """Standard deviation of the noise added to each coordinate of the sum: ``noise_multiplier * clip_bound``."""
        return self.noise_multiplier * self.clip_bound

    def add(self, total: np.ndarray, *, rng: np.random.Generator) -> np.ndarray:
        """Return ``total + N(0, stddev^2 I)`` as float64 (``total`` is left unchanged)."""
        vec = chk.float_vector("total", total)
        return vec.astype(np.float64) + _rng(rng).normal(0.0, self.stddev, size=vec.shape)

    def event(
        self,
        *,
        round_index: int,
        participants: int,
        survivors: int,
        sample_rate: float = 1.0,
        sampling: str = "poisson",
        unit: str = "client",
    ) -> GaussianEvent:
        """The ledger event for one use of this noise (``survivors``: clients in the noised sum; ``unit``: what
        ``clip_bound`` bounds, a client's update or one user's gradient, as in ``GaussianEvent``)."""
        return GaussianEvent(
            round_index=round_index,
            noise_multiplier=self.noise_multiplier,
            clip_bound=self.clip_bound,
            sample_rate=sample_rate,
            participants=participants,
            survivors=survivors,
            sampling=sampling,
            unit=unit,
        )

    def plan(
        self,
        *,
        round_index: int,
        participants: int,
        min_survivors: int,
        sample_rate: float = 1.0,
        sampling: str = "poisson",
        unit: str = "client",
    ) -> GaussianEvent:
        """The event to check the budget with before a round: the worst case the protocol allows.

        Central noise does not shrink with dropouts, so the cost is that of ``event``; the
        event records ``min_survivors`` so the plan states the case it was made for.
        """
        _check_plan(participants, min_survivors)
        return self.event(round_index=round_index, participants=participants, survivors=min_survivors,
                          sample_rate=sample_rate, sampling=sampling, unit=unit)  # fmt: skip


def _check_plan(participants: int, min_survivors: int) -> None:
    n = chk.integer("participants", participants, minimum=1)
    m = chk.integer("min_survivors", min_survivors, minimum=1)
    if m > n:
        raise DPValueError(f"min_survivors must be <= participants={n}, got {min_survivors!r}")


@dataclass(frozen=True, kw_only=True)
class _DistributedNoise:
    noise_multiplier: float
    clip_bound: float
    dim: int
    min_clients: int
    beta: float = 0.0
    overflow_probability: float = 1e-12

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_multiplier", chk.positive("noise_multiplier", self.noise_multiplier))
        object.__setattr__(self, "clip_bound", chk.positive("clip_bound", self.clip_bound))
        object.__setattr__(self, "dim", chk.integer("dim", self.dim, minimum=1))
        object.__setattr__(self, "min_clients", chk.integer("min_clients", self.min_clients, minimum=1))
        beta = chk.real("beta", self.beta)
        if not 0 <= beta < 1:
            raise DPValueError(f"beta must be in [0, 1), got {self.beta!r}")
        object.__setattr__(self, "beta", beta)
        object.__setattr__(self, "overflow_probability", chk.open_unit("overflow_probability", self.overflow_probability))

    def l2_sensitivity(self, *, scale: float) -> float:
        """L2 sensitivity of one client's rounded vector, in integer units."""
        s = chk.positive("scale", scale)
        return rounded_l2_sensitivity(s * self.clip_bound, dim=self.dim, beta=self.beta)

    def l1_sensitivity(self, *, scale: float) -> float:
        """L1 sensitivity of one client's rounded vector, in integer units."""
        return rounded_l1_sensitivity(self.l2_sensitivity(scale=scale), dim=self.dim)

    def _check_sample(self, size: int, scale: float, rng: object) -> tuple[int, float, np.random.Generator]:
        n = chk.integer("size", size, minimum=1)
        if n != self.dim:
            raise DPValueError(f"size must equal dim={self.dim} (the noise is sized for it), got {size!r}")
        return n, chk.positive("scale", scale), _rng(rng)

    def _check_round(self, participants: int, survivors: int) -> None:
        chk.integer("participants", participants, minimum=1)
        chk.integer("survivors", survivors, minimum=1)

    def event(
        self,
        *,
        round_index: int,
        scale: float,
        participants: int,
        survivors: int,
        sample_rate: float = 1.0,
        sampling: str = "poisson",
        unit: str = "client",
    ) -> SkellamEvent | DiscreteGaussianEvent:  # pragma: no cover - defined by each subclass
        raise NotImplementedError

    def plan(
        self,
        *,
        round_index: int,
        scale: float,
        participants: int,
        min_survivors: int,
        sample_rate: float = 1.0,
        sampling: str = "poisson",
        unit: str = "client",
    ) -> Any:
        """The event to check the budget with before a round: only ``min_survivors`` clients' noise in the sum.

        Each survivor adds its share of the noise, so the fewest survivors the protocol allows
        (the masking threshold) leave the least noise and cost the most; the event recorded
        after the round, with the real survivors, never costs more than this plan.
        """
        _check_plan(participants, min_survivors)
        return self.event(round_index=round_index, scale=scale, participants=participants, survivors=min_survivors,
                          sample_rate=sample_rate, sampling=sampling, unit=unit)  # fmt: skip

    def calibrated(
        self,
        *,
        target_epsilon: float,
        delta: float,
        rounds: int,
        scale: float | Callable[[Any], float],
        sample_rate: float = 1.0,
        sampling: str = "poisson",
        min_survivors: int | None = None,
        accountant: str = "pld",
        rel_tolerance: float = 1e-3,
    ) -> Any:
        """A copy with the smallest ``noise_multiplier`` whose ``rounds`` worst-case rounds fit ``target_epsilon``.

        Charged exactly as the ledger charges it: the event of ``plan`` (``min_survivors``
        survivors, default ``min_clients``) under the Skellam / discrete Gaussian bound, through
        the same accountant; so the run never spends more than the target. ``scale`` is the
        encoder's scale, or a function of the candidate noise returning it (the encoder sizes
        its headroom from the noise, and the bound depends on the scale).

        Raises:
            DPValueError: bad parameters, or a target no noise multiplier up to 1e6 meets.
        """
        from ._accounting import _epsilon_groups, _groups
        from ._calibration import calibrate_noise_multiplier, smallest_noise_multiplier

        target = chk.positive("target_epsilon", target_epsilon)
        d = chk.open_unit("delta", delta)
        n = chk.integer("rounds", rounds, minimum=1)
        q = chk.probability("sample_rate", sample_rate)
        survivors = self.min_clients if min_survivors is None else chk.integer("min_survivors", min_survivors, minimum=1)
        if not callable(scale):
            chk.positive("scale", scale)

        def noise(z: float) -> Any:
            return dataclasses.replace(self, noise_multiplier=z)

        def eps(z: float) -> float:
            candidate = noise(z)
            s = scale(candidate) if callable(scale) else scale
            ev = candidate.plan(round_index=0, scale=s, participants=survivors, min_survivors=survivors,
                                sample_rate=q, sampling=sampling)  # fmt: skip
            return _epsilon_groups(_groups([ev], repeat=n), d, accountant)

        guess = calibrate_noise_multiplier(target_epsilon=target, delta=d, steps=n, sample_rate=q, rel_tolerance=0.01)
        z = smallest_noise_multiplier(eps, target_epsilon=target, rel_tolerance=rel_tolerance, guess=guess,
                                      what=f"{type(self).__name__} over {n} rounds at sample_rate={q!r}")  # fmt: skip
        return noise(z)


@dataclass(frozen=True, kw_only=True)
class SkellamNoise(_DistributedNoise):
    """Distributed Skellam noise (Agarwal, Kairouz, Liu NeurIPS 2021).

    Each client adds ``Sk(mu) = Poisson(mu/2) - Poisson(mu/2)`` per coordinate to its encoded
    integer vector before masking, with ``mu = (noise_multiplier * D2)^2 / min_clients`` where
    ``D2`` is the rounded L2 sensitivity in integer units. Skellam is closed under sums, so
    with ``s >= min_clients`` survivors the sum carries ``Sk(s mu)``: at least the target noise.
    The server sees only the masked, noised sum.

    Attributes:
        noise_multiplier: target noise multiplier of the sum, for ``min_clients`` survivors.
        clip_bound: L2 sensitivity of one client's (weighted) vector, in float units.
        dim: number of coordinates each client noises.
        min_clients: fewest survivors the target must hold for (``n - tolerated dropouts``).
        beta: conditional-rounding parameter the encoder guarantees (0: none assumed).
        overflow_probability: per-coordinate probability that ``sum_bound`` is exceeded.
    """

    def per_client_variance(self, *, scale: float) -> float:
        """Skellam variance each client adds, in integer units, so that ``min_clients`` survivors reach the noise multiplier."""
        return (self.noise_multiplier * self.l2_sensitivity(scale=scale)) ** 2 / self.min_clients

    def sample(self, size: int, *, scale: float, rng: np.random.Generator) -> np.ndarray:
        """One client's noise: int64 in units of ``1/scale``."""
        n, s, g = self._check_sample(size, scale, rng)
        lam = self.per_client_variance(scale=s) / 2.0
        return g.poisson(lam, n).astype(np.int64) - g.poisson(lam, n).astype(np.int64)

    def sum_bound(self, *, scale: float, num_clients: int) -> float:
        """Bernstein bound on ``|summed noise|`` per coordinate, exceeded w.p. ``overflow_probability``."""
        n = chk.integer("num_clients", num_clients, minimum=1)
        var = n * self.per_client_variance(scale=scale)
        log_term = math.log(2.0 / self.overflow_probability)
        return log_term / 3.0 + math.sqrt((log_term / 3.0) ** 2 + 2.0 * var * log_term)

    def event(
        self,
        *,
        round_index: int,
        scale: float,
        participants: int,
        survivors: int,
        sample_rate: float = 1.0,
        sampling: str = "poisson",
        unit: str = "client",
    ) -> SkellamEvent:
        """The ledger event: the noise present in the sum of ``survivors`` clients' noise (``unit`` as in ``GaussianEvent``)."""
        self._check_round(participants, survivors)
        return SkellamEvent(
            round_index=round_index,
            scale=scale,
            clip_bound=self.clip_bound,
            dim=self.dim,
            l2_sensitivity=self.l2_sensitivity(scale=scale),
            l1_sensitivity=self.l1_sensitivity(scale=scale),
            per_client_variance=self.per_client_variance(scale=scale),
            min_clients=self.min_clients,
            target_noise_multiplier=self.noise_multiplier,
            sample_rate=sample_rate,
            participants=participants,
            survivors=survivors,
            sampling=sampling,
            unit=unit,
        )


@dataclass(frozen=True, kw_only=True)
class DiscreteGaussianNoise(_DistributedNoise):
    """Distributed discrete Gaussian noise (Kairouz, Liu, Steinke ICML 2021).

    Each client adds ``N_Z(0, sigma^2)`` per coordinate with
    ``sigma = noise_multiplier * D2 / sqrt(min_clients)`` (integer units). The sum of
    discrete Gaussians is close to, not exactly, discrete Gaussian; the accountant uses the
    paper's bound with the number of survivors. Attributes as in ``SkellamNoise``.
    """

    def local_stddev(self, *, scale: float) -> float:
        """Scale of each client's discrete Gaussian, in integer units, sized for ``min_clients`` survivors."""
        return self.noise_multiplier * self.l2_sensitivity(scale=scale) / math.sqrt(self.min_clients)

    def sample(self, size: int, *, scale: float, rng: np.random.Generator) -> np.ndarray:
        """One client's noise: int64 in units of ``1/scale``."""
        n, s, g = self._check_sample(size, scale, rng)
        return sample_discrete_gaussian(self.local_stddev(scale=s), n, rng=g)

    def sum_bound(self, *, scale: float, num_clients: int) -> float:
        """Sub-Gaussian bound on ``|summed noise|`` per coordinate (CKS20: N_Z is sigma^2-subgaussian)."""
        n = chk.integer("num_clients", num_clients, minimum=1)
        sigma = self.local_stddev(scale=scale)
        return sigma * math.sqrt(2.0 * n * math.log(2.0 / self.overflow_probability))

    def event(
        self,
        *,
        round_index: int,
        scale: float,
        participants: int,
        survivors: int,
        sample_rate: float = 1.0,
        sampling: str = "poisson",
        unit: str = "client",
    ) -> DiscreteGaussianEvent:
        """The ledger event: the noise present in the sum of ``survivors`` clients' noise (``unit`` as in ``GaussianEvent``)."""
        self._check_round(participants, survivors)
        return DiscreteGaussianEvent(
            round_index=round_index,
            scale=scale,
            clip_bound=self.clip_bound,
            dim=self.dim,
            l2_sensitivity=self.l2_sensitivity(scale=scale),
            l1_sensitivity=self.l1_sensitivity(scale=scale),
            local_stddev=self.local_stddev(scale=scale),
            min_clients=self.min_clients,
            target_noise_multiplier=self.noise_multiplier,
            sample_rate=sample_rate,
            participants=participants,
            survivors=survivors,
            sampling=sampling,
            unit=unit,
        )
