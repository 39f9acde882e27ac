"""Calibration: the smallest noise multiplier whose accounted epsilon stays within a target.

The epsilon a calibration meets is computed by the very function the ledger, the budget and
the report use later (same accountant, same grouping of events), so a calibrated run is never
charged more than its target. Speed comes from a cheap guess, not from a looser check: a
coarse PLD pass (or the RDP curve itself for distributed noise) finds the neighbourhood of the
answer, then a few evaluations of the exact accountant bracket it to ``rel_tolerance``.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

from . import _checks as chk
from ._accounting import _PLD_COARSE_INTERVAL, ACCOUNTANTS, _epsilon_groups, _pld_at, _used, pld_epsilon
from ._errors import AccountingError, DPValueError

__all__ = ["calibrate_noise_multiplier", "calibrate_for_runs", "smallest_noise_multiplier"]

_MAX_NOISE_MULTIPLIER = 1e6
_MIN_NOISE_MULTIPLIER = 1e-4


def _safe(f: Callable[[float], float]) -> Callable[[float], float]:
    def g(z: float) -> float:
        try:
            return f(z)
        except AccountingError:  # PRV refuses histories whose epsilon is in the hundreds
            return math.inf

    return g


def _root_guess(g: Callable[[float], float], target: float) -> float:
    """Where the decreasing ``g`` crosses ``target`` (geometric bisection on a cheap ``g``, 2% wide)."""
    lo, hi = 0.5, 1.0
    while g(hi) > target:
        lo, hi = hi, hi * 2
        if hi > _MAX_NOISE_MULTIPLIER:
            return hi
    while g(lo) <= target:
        lo, hi = lo / 2, lo
        if lo < _MIN_NOISE_MULTIPLIER:
            return hi
    while hi / lo > 1.02:
        mid = math.sqrt(lo * hi)
        if g(mid) <= target:
            hi = mid
        else:
            lo = mid
    return math.sqrt(lo * hi)


def smallest_noise_multiplier(
    epsilon_of: Callable[[float], float],
    *,
    target_epsilon: float,
    rel_tolerance: float = 1e-3,
    guess: float = 1.0,
    what: str = "the history",
) -> float:
    """Smallest noise multiplier ``z`` (within ``rel_tolerance``) with ``epsilon_of(z) <= target_epsilon``.

    ``epsilon_of`` must decrease with ``z``; the ``z`` returned is one at which it was evaluated
    and found within the target, so the result never overshoots whatever ``epsilon_of`` is.
    Secant steps in log-log space from ``guess`` find a bracket; the answer ``hi`` comes with a
    ``lo`` that overshoots and ``hi - lo <= rel_tolerance * hi``.

    Raises:
        DPValueError: no ``z`` up to 1e6 meets the target.
    """
    target = chk.positive("target_epsilon", target_epsilon)
    tol = chk.open_unit("rel_tolerance", rel_tolerance)
    f = _safe(epsilon_of)
    step = math.log1p(tol)
    seen: dict[float, float] = {}

    def ev(x: float) -> float:  # log-space: x = log z
        if x not in seen:
            seen[x] = f(math.exp(x))
        return seen[x]

    def bracket() -> tuple[float | None, float | None]:
        ok = [x for x, e in seen.items() if e <= target]
        bad = [x for x, e in seen.items() if e > target]
        return (min(ok) if ok else None), (max(bad) if bad else None)

    x = math.log(chk.positive("guess", guess))
    ev(x)
    walk = 0.5
    for _ in range(60):
        hi, lo = bracket()
        if hi is not None and lo is not None and hi - lo <= step:
            return float(math.exp(hi))
        if hi is not None and hi < math.log(_MIN_NOISE_MULTIPLIER):
            return float(math.exp(hi))  # epsilon this large is reached with almost no noise
        if lo is not None and lo > math.log(_MAX_NOISE_MULTIPLIER):
            raise DPValueError(
                f"target_epsilon={target!r} cannot be met for {what} by any noise multiplier <= "
                f"{_MAX_NOISE_MULTIPLIER:g}; raise target_epsilon or delta, or lower the number of steps"
            )
        # secant estimate of the crossing from the two points nearest to it
        near = sorted(seen, key=lambda p: abs(math.log(max(seen[p], 1e-300)) - math.log(target)))[:2]
        est = None
        if len(near) == 2 and all(math.isfinite(seen[p]) and seen[p] > 0 for p in near):
            (x1, x2), (y1, y2) = near, (math.log(seen[near[0]]), math.log(seen[near[1]]))
            if y1 != y2:
                est = x1 + (math.log(target) - y1) * (x2 - x1) / (y2 - y1)
        if hi is not None and lo is not None:
            if est is None or not lo < est < hi:
                est = (lo + hi) / 2
            a, b = max(lo, est - 0.45 * step), min(hi, est + 0.45 * step)
            if b - a < 0.5 * step:  # the estimate hugs an end of the bracket: halve instead
                a = b = (lo + hi) / 2
            for p in {a, b}:
                if lo < p < hi:
                    ev(p)
            if {a, b} <= {lo, hi}:  # pragma: no cover - defensive, the bracket always shrinks
                ev((lo + hi) / 2)
            continue
        # no bracket yet: walk (secant, or doubling) past the crossing
        x0 = hi if hi is not None else lo
        assert x0 is not None  # seen holds the guess at least, so hi or lo is set
        if est is None or est == x0:  # no usable slope: steps that double until the crossing is passed
            walk *= 2.0
            est = x0 - walk * step if hi is not None else x0 + walk * step
        overshoot = 0.45 * step if hi is None else -0.45 * step
        est = min(max(est + overshoot, x0 - math.log(16.0)), x0 + math.log(16.0))
        ev(est)
    hi, lo = bracket()  # pragma: no cover - 60 steps always converge for a monotone epsilon_of
    if hi is None:  # pragma: no cover
        raise DPValueError(f"calibration did not converge for {what}")
    return float(math.exp(hi))  # pragma: no cover


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    steps: int,
    sample_rate: float,
    accountant: str = "pld",
    rel_tolerance: float = 1e-3,
) -> float:
    """Noise multiplier of a Poisson-subsampled Gaussian run ``steps`` times, within the target.

    Uses the same accountant the ledger later charges (default PLD); the value returned is one
    whose epsilon was computed and found ``<= target_epsilon``, so it never overshoots, and it
    is within ``rel_tolerance`` (relative) of the smallest such value. For DP-FedAvg, ``steps``
    is the number of rounds and ``sample_rate`` the client sampling rate; for DP-SGD, the number
    of optimizer steps and the record sampling rate. With adaptive clipping, calibrate the
    effective noise multiplier and split it with ``AdaptiveClip.update_noise_multiplier``.

    Raises:
        DPValueError: a parameter out of range, or a target no noise up to 1e6 can meet.
    """
    target = chk.positive("target_epsilon", target_epsilon)
    d = chk.open_unit("delta", delta)
    n = chk.integer("steps", steps, minimum=1)
    q = chk.probability("sample_rate", sample_rate)
    acc = chk.one_of("accountant", accountant, ACCOUNTANTS)
    tol = chk.open_unit("rel_tolerance", rel_tolerance)

    def groups(z: float) -> dict:
        return {("gaussian", float(z), q): n}

    coarse = _safe(lambda z: pld_epsilon(groups(z), d, relative=3e-3))
    guess = _root_guess(coarse, target)
    return smallest_noise_multiplier(
        lambda z: _epsilon_groups(groups(z), d, _used(groups(z), acc)),
        target_epsilon=target,
        rel_tolerance=tol,
        guess=guess,
        what=f"delta={d!r}, steps={n}, sample_rate={q!r} (accountant {acc!r})",
    )


def calibrate_for_runs(
    *,
    target_epsilon: float,
    delta: float,
    runs: Mapping[str, tuple[int, float]],
    accountant: str = "pld",
    rel_tolerance: float = 1e-3,
) -> tuple[float, str]:
    """One noise multiplier that keeps each of several DP-SGD runs within the target.

    Each run ``(steps, sample_rate)`` is one client's whole training. Epsilon falls as the noise
    grows, so the largest of the runs' own calibrations keeps every run within
    ``target_epsilon``, and the run that needed it (usually the client with the fewest
    examples, hence the highest sampling rate) meets the target within ``rel_tolerance``.
    The runs are ranked by a cheap calibration (a coarse pessimistic PLD pass); the likely worst is calibrated with the
    accountant, and every other run is then checked at that multiplier (by a coarse PLD pass
    when it lies clearly below the target, else by the accountant itself) and calibrated too
    only if it exceeds the target, so no run overshoots whatever the ranking.

    Returns:
        The noise multiplier and the key of the run that determined it.

    Raises:
        DPValueError: no runs, a parameter out of range, or a target no noise can meet.
    """
    target = chk.positive("target_epsilon", target_epsilon)
    d = chk.open_unit("delta", delta)
    acc = chk.one_of("accountant", accountant, ACCOUNTANTS)
    if not runs:
        raise DPValueError("runs must hold at least one (steps, sample_rate) run, got none")
    shapes: dict[tuple[int, float], str] = {}
    for key in sorted(runs):
        steps, rate = runs[key]
        shape = (chk.integer(f"runs[{key!r}] steps", steps, minimum=1), chk.probability(f"runs[{key!r}] sample_rate", rate))
        shapes.setdefault(shape, key)

    def epsilon_at(z: float, shape: tuple[int, float], name: str) -> float:
        groups = {("gaussian", float(z), shape[1]): shape[0]}
        return _epsilon_groups(groups, d, _used(groups, name))

    def coarse(z: float, shape: tuple[int, float]) -> float:
        return _pld_at({("gaussian", float(z), shape[1]): shape[0]}, d, _PLD_COARSE_INTERVAL)

    def guess(shape: tuple[int, float]) -> float:
        return _root_guess(_safe(lambda z: coarse(z, shape)), target)

    def within(z: float, shape: tuple[int, float]) -> bool:
        # A coarse pessimistic PLD pass (0.1 s) settles runs far from the target; the exact one the rest.
        if acc == "pld" and _safe(lambda x: coarse(x, shape))(z) <= 0.99 * target:
            return True
        return _safe(lambda x: epsilon_at(x, shape, acc))(z) <= target

    best: tuple[float, str] | None = None
    for shape in sorted(shapes, key=guess, reverse=True) if len(shapes) > 1 else shapes:
        if best is not None and within(best[0], shape):
            continue
        z = calibrate_noise_multiplier(
            target_epsilon=target, delta=d, steps=shape[0], sample_rate=shape[1], accountant=acc, rel_tolerance=rel_tolerance
        )
        if best is None or z > best[0]:
            best = (z, shapes[shape])
    assert best is not None
    return best
