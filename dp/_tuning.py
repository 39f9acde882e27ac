"""Private hyperparameter tuning: the RDP of the best of a random number of private trials.

Papernot & Steinke, "Hyperparameter Tuning with Renyi Differential Privacy" (ICLR 2022,
arXiv:2110.03620v2). Run a mechanism ``Q`` (one whole training run and its score) ``K`` times,
independently, with ``K`` drawn from a distribution fixed in advance and hidden, and release
only the best run. If ``Q`` is ``(lambda, eps(lambda))``-RDP at every order, the released best
run is ``(lambda, eps'(lambda))``-RDP with:

- ``K`` truncated negative binomial ``D_{eta,gamma}`` (Theorem 2; ``eta = 1`` is the geometric
  distribution, ``eta = 0`` the logarithmic one), for every ``lambda_hat >= 1``::

      eps'(lambda) = eps(lambda) + (1 + eta) * ((1 - 1/lambda_hat) * eps(lambda_hat) + log(1/gamma) / lambda_hat)
                     + log(E[K]) / (lambda - 1)

  (``lambda_hat`` is minimised over the orders and ``lambda_hat = 1``, where the middle term is
  ``(1 + eta) log(1/gamma)``), with ``E[K] = eta (1 - gamma) / (gamma (1 - gamma^eta))`` (``eta > 0``)
  or ``(1/gamma - 1) / log(1/gamma)`` (``eta = 0``);
- ``K`` Poisson with mean ``mu`` (Theorem 6), with ``Q`` ``(eps_hat, delta_hat)``-DP where
  ``eps_hat = log(1 + 1/(lambda - 1))``::

      eps'(lambda) = eps(lambda) + mu * delta_hat + log(mu) / (lambda - 1)

  ``delta_hat`` is the per-trial ``delta`` at ``eps_hat`` from the per-trial RDP curve, by the
  conversion the RDP accountant uses (Balle et al. 2020, Thm. 21), solved for delta.

A bound at one order also bounds every smaller order (RDP grows with the order), which is
applied last. The same formulas are in ``dp_accounting``'s RDP accountant
(``RepeatAndSelectDpEvent``), which the tests compare with.

Only the best trial is covered: releasing any other trial's score or model, or the number of
trials ``K``, is outside the guarantee.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import _checks as chk
from ._errors import DPValueError

__all__ = ["TRIAL_DISTRIBUTIONS", "TrialDistribution", "tuning_rdp"]

#: Distributions of the number of trials the theorems cover.
TRIAL_DISTRIBUTIONS = ("truncated_negative_binomial", "poisson")


def _tnb_mean(eta: float, gamma: float) -> float:
    if gamma == 1.0:
        return 1.0
    if eta == 0.0:
        return (1.0 / gamma - 1.0) / math.log(1.0 / gamma)
    return eta * (1.0 - gamma) / (gamma * -math.expm1(eta * math.log(gamma)))


def _tnb_gamma(eta: float, mean: float) -> float:
    """The ``gamma`` whose truncated negative binomial has mean ``mean`` (bisection; the mean falls as gamma grows)."""
    if mean == 1.0:
        return 1.0
    if eta == 1.0:
        return 1.0 / mean
    lo, hi = 1e-300, 1.0
    for _ in range(2000):
        mid = (lo + hi) / 2 if hi / lo < 4 else math.sqrt(lo * hi)
        if _tnb_mean(eta, mid) > mean:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    return hi


@dataclass(frozen=True, kw_only=True)
class TrialDistribution:
    """How many trials a private search runs: drawn once, before the first trial, and kept hidden.

    Build with ``geometric(mean=...)``, ``truncated_negative_binomial(eta=..., mean=...)`` or
    ``poisson(mean=...)``. ``gamma = 1`` (mean 1) is the deterministic single trial.

    Attributes:
        kind: ``"truncated_negative_binomial"`` or ``"poisson"``.
        eta: shape of the truncated negative binomial (``>= 0``; 1 is geometric, 0 logarithmic).
        gamma: its parameter in ``(0, 1]``.
        mu: mean of the Poisson distribution (``>= 1``).
    """

    kind: str
    eta: float | None = None
    gamma: float | None = None
    mu: float | None = None

    def __post_init__(self) -> None:
        chk.one_of("kind", self.kind, TRIAL_DISTRIBUTIONS)
        if self.kind == "poisson":
            if self.eta is not None or self.gamma is not None:
                raise DPValueError(f"a poisson distribution takes mu only, got eta={self.eta!r}, gamma={self.gamma!r}")
            mu = chk.real("mu", self.mu)
            if mu < 1:
                raise DPValueError(f"mu (the mean number of trials) must be >= 1, got {self.mu!r}")
            object.__setattr__(self, "mu", mu)
            return
        if self.mu is not None:
            raise DPValueError(f"a truncated negative binomial takes eta and gamma, not mu, got mu={self.mu!r}")
        eta = chk.non_negative("eta", self.eta)
        gamma = chk.probability("gamma", self.gamma)
        object.__setattr__(self, "eta", eta)
        object.__setattr__(self, "gamma", gamma)

    @classmethod
    def geometric(cls, *, mean: float) -> "TrialDistribution":
        """``P[K = k] = gamma (1 - gamma)^(k-1)``, ``gamma = 1/mean`` (``eta = 1``)."""
        return cls.truncated_negative_binomial(eta=1.0, mean=mean)

    @classmethod
    def truncated_negative_binomial(cls, *, eta: float, mean: float) -> "TrialDistribution":
        """``D_{eta,gamma}`` of Papernot & Steinke Sec. 2, with ``gamma`` solved from the mean (``>= 1``)."""
        e = chk.non_negative("eta", eta)
        m = chk.real("mean", mean)
        if m < 1:
            raise DPValueError(f"mean (the expected number of trials) must be >= 1, got {mean!r}")
        return cls(kind="truncated_negative_binomial", eta=e, gamma=_tnb_gamma(e, m))

    @classmethod
    def poisson(cls, *, mean: float) -> "TrialDistribution":
        """``K ~ Poisson(mean)``; ``K = 0`` (no trial, nothing released) happens with probability ``e^-mean``."""
        return cls(kind="poisson", mu=mean)

    @property
    def mean(self) -> float:
        """``E[K]``."""
        if self.kind == "poisson":
            return float(self.mu)  # type: ignore[arg-type]
        return _tnb_mean(float(self.eta), float(self.gamma))  # type: ignore[arg-type]

    def describe(self) -> str:
        """In words, with its parameters and mean."""
        if self.kind == "poisson":
            return f"Poisson with mean mu={self.mu:g}"
        name = {1.0: "geometric (truncated negative binomial, eta=1)", 0.0: "logarithmic (truncated negative binomial, eta=0)"}
        label = name.get(float(self.eta), f"truncated negative binomial, eta={self.eta:g}")  # type: ignore[arg-type]
        return f"{label}, gamma={self.gamma:.6g}, mean {self.mean:.4g}"

    def sample(self, rng: np.random.Generator) -> int:
        """One draw of ``K`` (pass a generator seeded from the OS unless simulating)."""
        if self.kind == "poisson":
            return int(rng.poisson(float(self.mu)))  # type: ignore[arg-type]
        eta, gamma = float(self.eta), float(self.gamma)  # type: ignore[arg-type]
        if gamma == 1.0:
            return 1
        if eta == 0.0:
            return int(rng.logseries(1.0 - gamma))  # P[k] = (1-gamma)^k / (k log(1/gamma))
        while True:  # negative binomial NB(eta, gamma) conditioned on K >= 1
            k = int(rng.negative_binomial(eta, gamma))
            if k >= 1:
                return k


def tuning_rdp(orders: Sequence[float], rdp: Sequence[float], distribution: TrialDistribution) -> np.ndarray:
    """RDP at ``orders`` of the best of ``K ~ distribution`` runs of a mechanism with RDP ``rdp``.

    ``rdp[i]`` is one trial's RDP at ``orders[i]`` (all orders > 1). Theorems 2 and 6 of
    Papernot & Steinke (ICLR 2022); see the module docstring.
    """
    a = np.asarray(orders, dtype=np.float64)
    eps = np.asarray(rdp, dtype=np.float64)
    if a.shape != eps.shape or a.ndim != 1 or a.size == 0:
        raise DPValueError(f"orders and rdp must be 1-D of the same length, got {a.shape} and {eps.shape}")
    if np.any(a <= 1):
        raise DPValueError(f"every order must be > 1, got {float(a.min())!r}")
    d = distribution
    if d.kind == "poisson":
        mu = float(d.mu)  # type: ignore[arg-type]
        out = eps + mu * _delta_at(a, eps, np.log1p(1.0 / (a - 1.0))) + math.log(mu) / (a - 1.0)
    else:
        eta, gamma = float(d.eta), float(d.gamma)  # type: ignore[arg-type]
        log_inv_gamma = -math.log(gamma)
        with np.errstate(invalid="ignore"):
            candidates = (1.0 - 1.0 / a) * eps + log_inv_gamma / a
        best = min(float(np.nanmin(candidates)), log_inv_gamma)  # lambda_hat = 1 gives log(1/gamma)
        out = eps + (1.0 + eta) * best + math.log(d.mean) / (a - 1.0)
    # RDP is non-decreasing in the order: a bound at a larger order holds at a smaller one
    return np.minimum.accumulate(out[::-1])[::-1] if np.all(np.diff(a) > 0) else _monotone(a, out)


def _delta_at(a: np.ndarray, eps: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """One trial's delta at each epsilon in ``targets`` from its RDP curve (Balle et al. AISTATS 2020, Thm. 21, inverted).

    ``log delta = min over orders of (a - 1)(eps(a) - target + log(1 - 1/a)) - log a``, at most 1: the
    conversion the RDP accountant uses (Opacus), solved for delta.
    """
    with np.errstate(invalid="ignore", over="ignore"):
        log_delta = (a - 1.0)[None, :] * (eps[None, :] - targets[:, None] + np.log1p(-1.0 / a)[None, :]) - np.log(a)[None, :]
    return np.exp(np.minimum(np.nanmin(log_delta, axis=1), 0.0))


def _monotone(a: np.ndarray, out: np.ndarray) -> np.ndarray:
    return np.array([out[a >= x].min() for x in a])
