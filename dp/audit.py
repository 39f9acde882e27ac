"""Empirical privacy auditing with one training run: a lower bound on epsilon from canaries.

An audit asks whether a run's claimed (epsilon, delta) can be true. ``m`` canaries are drawn;
each is included in training independently with probability 1/2. After the run the auditor
scores every canary from the final model only, guesses "included" for the ``k+`` highest scores
and "excluded" for the ``k-`` lowest, abstains on the rest, and counts the correct guesses. If
the run were (epsilon, delta)-DP with respect to each canary, that count would be stochastically
dominated (up to a delta term) by a Binomial(r, e^eps / (1 + e^eps)) over the r guesses made;
the largest epsilon that the observed count rejects at the chosen confidence is the audited lower
bound (Steinke, Nasr, Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023: the
main theorem in its (epsilon, delta) form, with the p-value and epsilon search of the paper's
reference code, as also implemented by ``jax_privacy.auditing``; in the spirit of Jagielski,
Ullman, Oprea, "Auditing Differentially Private Machine Learning", NeurIPS 2020). A correct implementation keeps the bound below the claimed
epsilon (except with probability at most ``1 - confidence``); a bound above it means the code
or the accounting is broken, and is flagged loudly (:class:`PrivacyAuditWarning`).

For client-level DP in federated learning the canaries are clients (Andrew et al., "One-shot
Empirical Privacy Estimation for Federated Learning", ICLR 2024): each canary client sends a
fixed update ``clip_bound * u_i`` along its own direction ``u_i`` (orthonormal directions, so
canaries do not interfere), and its score is ``<final model - initial model, u_i>``. Who sees
what: the auditor knows the canaries, the inclusion bits and the final model; nothing else.

Several guess counts may be tried on the same scores; the significance is then split among them
(Bonferroni), so the bound stays valid whichever count wins. The counts must be fixed before the
inclusion bits are looked at (the defaults depend on ``m`` only).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from scipy import fft, optimize, special, stats

from . import _checks as chk
from ._accounting import epsilon as _accounted_epsilon
from ._errors import DPTypeError, DPValueError, PrivacyAuditWarning
from ._lazy import MIN_DEFERRED_COORDINATES
from ._ledger import Ledger
from ._noise import CentralGaussian

__all__ = [
    "AuditResult",
    "PrivacyAuditWarning",
    "Canaries",
    "one_run_p_value",
    "epsilon_lower_bound",
    "default_guess_counts",
    "audit_ceiling",
    "audit_dp_sgd",
    "audited_point",
    "TESTED_DELTAS",
    "audit_scores",
    "draw_canaries",
    "run_canary_audit",
    "audit_dp_fedavg",
]


@dataclass(frozen=True)
class AuditResult:
    """The outcome of one audit.

    Attributes:
        epsilon_lower_bound: with probability at least ``confidence``, the run is not
            (epsilon, delta)-DP for any epsilon below this value.
        confidence: confidence of the bound.
        delta: the delta of the claim tested.
        canaries: ``m``, the canaries drawn (about half included).
        guesses: ``r``, guesses made by the winning guess count (abstentions excluded).
        correct: ``v``, how many of them were right.
        positive_guesses: ``k+`` of the winning guess count.
        negative_guesses: ``k-`` of the winning guess count.
        candidates: how many guess counts were tried (the significance was split among them).
        claimed_epsilon: the accountant's epsilon for the run at ``delta``, if given.
        ceiling: the largest bound these guess counts could give (every guess right).
        level: ``"client"`` or ``"sample"`` canaries.
        method: what was audited, in words (stated in reports).
        extra: what the audit built (ledger, canaries), for inspection.
    """

    epsilon_lower_bound: float
    confidence: float
    delta: float
    canaries: int
    guesses: int
    correct: int
    positive_guesses: int
    negative_guesses: int
    candidates: int = 1
    claimed_epsilon: float | None = None
    ceiling: float | None = None
    level: str = "client"
    method: str = "one-run canary audit (Steinke, Nasr, Jagielski 2023)"
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def exceeds_claim(self) -> bool:
        """Whether the audited lower bound is above the claimed epsilon (a broken run)."""
        return self.claimed_epsilon is not None and self.epsilon_lower_bound > self.claimed_epsilon

    @property
    def conclusive(self) -> bool:
        """Whether this audit could have refuted the claim at all (claim below the ceiling)."""
        return self.claimed_epsilon is None or self.ceiling is None or self.claimed_epsilon < self.ceiling

    def summary(self) -> str:
        """One line for logs and reports; starts with ``PRIVACY AUDIT FAILED`` when the claim is refuted."""
        ceiling = "" if self.ceiling is None else f"; the most it could ever certify is {self.ceiling:.3f}"
        what = (
            f"audited epsilon lower bound {self.epsilon_lower_bound:.3f} at {self.confidence:.0%} confidence "
            f"(delta={self.delta:.3g}; {self.canaries} {self.level}-level canaries, {self.correct} of "
            f"{self.guesses} guesses correct{ceiling})"
        )
        if self.claimed_epsilon is None:
            return what
        if self.exceeds_claim:
            return (
                f"PRIVACY AUDIT FAILED: {what} exceeds the accountant's epsilon {self.claimed_epsilon:.3f}: "
                "the run leaks more than claimed, so its noise, clipping or accounting is broken"
            )
        if not self.conclusive:
            return (
                f"AUDIT INCONCLUSIVE: {what}; the accountant's epsilon {self.claimed_epsilon:.3f} is above what "
                "this audit can certify, so it could not have refuted the claim"
            )
        return f"{what}; below the accountant's epsilon {self.claimed_epsilon:.3f}, consistent with the claim"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (``PrivacyReport(audited_epsilon_lower_bound=...)`` takes the first)."""
        return {
            "audited_epsilon_lower_bound": self.epsilon_lower_bound,
            "confidence": self.confidence,
            "delta": self.delta,
            "canaries": self.canaries,
            "guesses": self.guesses,
            "correct": self.correct,
            "positive_guesses": self.positive_guesses,
            "negative_guesses": self.negative_guesses,
            "candidates": self.candidates,
            "claimed_epsilon": self.claimed_epsilon,
            "exceeds_claim": self.exceeds_claim,
            "ceiling": self.ceiling,
            "conclusive": self.conclusive,
            "level": self.level,
            "method": self.method,
        }


# ----------------------------------------------------------------------------- the bound


def _counts(canaries: object, guesses: object, correct: object) -> tuple[int, int, int]:
    m = chk.integer("canaries", canaries, minimum=1)
    r = chk.integer("guesses", guesses, minimum=0)
    v = chk.integer("correct", correct, minimum=0)
    if r > m:
        raise DPValueError(f"guesses must be <= canaries={m}, got {r}")
    if v > r:
        raise DPValueError(f"correct must be <= guesses={r}, got {v}")
    return m, r, v


def _delta(delta: object) -> float:
    d = chk.real("delta", delta)
    if not 0.0 <= d < 1.0:
        raise DPValueError(f"delta must be in [0, 1), got {delta!r}")
    return d


def _p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    if v == 0:
        return 1.0
    q = float(special.expit(eps))  # accuracy of eps-DP randomized response
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if delta == 0.0:
        return min(beta, 1.0)
    i = np.arange(1, v + 1)
    within = stats.binom.sf(v - i - 1, r, q) - beta  # P[v > Binomial(r, q) >= v - i]
    alpha = float(np.max(within / i, initial=0.0))
    return min(beta + alpha * delta * 2 * m, 1.0)


def one_run_p_value(*, canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Probability of at least ``correct`` right guesses out of ``guesses`` if the run were (epsilon, delta)-DP.

    Steinke, Nasr, Jagielski 2023, (epsilon, delta) form: ``P[W >= v] <= beta + 2 m delta alpha`` with
    ``beta = P[Bin(r, q) >= v]``, ``q = e^eps / (1 + e^eps)`` and
    ``alpha = max_{1 <= i <= v} P[v > Bin(r, q) >= v - i] / i``.

    Raises:
        DPValueError / DPTypeError: counts out of range, ``epsilon < 0`` or ``delta`` outside [0, 1).
    """
    m, r, v = _counts(canaries, guesses, correct)
    eps = chk.non_negative("epsilon", epsilon)
    return _p_value(m, r, v, eps, _delta(delta))


def epsilon_lower_bound(*, canaries: int, guesses: int, correct: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that ``correct`` right guesses out of ``guesses`` rule out at ``confidence``.

    Returns 0.0 when the guesses rule out no epsilon (for example, no better than chance).

    Raises:
        DPValueError / DPTypeError: counts out of range, ``confidence`` outside (0, 1), bad ``delta``.
    """
    m, r, v = _counts(canaries, guesses, correct)
    conf = chk.open_unit("confidence", confidence)
    return _bound(m, r, v, _delta(delta), 1.0 - conf)


def _bound(m: int, r: int, v: int, delta: float, significance: float) -> float:
    def gap(eps: float) -> float:  # > 0 while the claim "(eps, delta)-DP" is rejected
        return significance - _p_value(m, r, v, eps, delta)

    if gap(0.0) <= 0:
        return 0.0
    lo, hi = 0.0, 1.0
    while gap(hi) > 0:
        lo, hi = hi, hi * 2.0
        if hi > 1e4:  # pragma: no cover - p-values reach 1 long before
            return lo
    return float(optimize.brentq(gap, lo, hi, xtol=1e-6))


def audit_ceiling(
    *, canaries: int, delta: float, confidence: float = 0.95, guess_counts: Sequence[tuple[int, int]] | None = None
) -> float:
    """The largest epsilon an audit with ``canaries`` canaries could ever certify: every guess right.

    A claim at or above it cannot be refuted by the audit whatever the run does, so reports state
    it beside the audited bound. More canaries give more evidence, but the bound's ``2 m delta``
    term grows with ``m`` and pulls it back down: at ``delta = 1e-5`` with one guess count of about
    half the canaries each way it is 5.65 for 1,000 canaries, 8.11 for 100,000 and 7.94 for
    1,000,000; at ``delta = 1e-6``, 10.12 for 100,000.
    """
    m = chk.integer("canaries", canaries, minimum=1)
    d = _delta(delta)
    conf = chk.open_unit("confidence", confidence)
    counts = _guess_counts(m, guess_counts)
    significance = (1.0 - conf) / len(counts)
    return _ceiling(m, counts, d, significance)


def _ceiling(m: int, counts: Sequence[tuple[int, int]], delta: float, significance: float) -> float:
    return max(_bound(m, a + b, a + b, delta, significance) for a, b in counts)


def _guess_counts(m: int, guess_counts: Sequence[tuple[int, int]] | None) -> tuple[tuple[int, int], ...]:
    counts = default_guess_counts(m) if guess_counts is None else tuple(guess_counts)
    if not counts:
        raise DPValueError("guess_counts must hold at least one (k_plus, k_minus) pair, got none")
    for pair in counts:
        if (
            not isinstance(pair, tuple) or len(pair) != 2
            or any(isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0 for k in pair)
            or not 1 <= pair[0] + pair[1] <= m
        ):  # fmt: skip
            raise DPValueError(
                f"each guess count must be a pair of ints (k_plus, k_minus) >= 0 with 1 <= k_plus + k_minus <= {m}, got {pair!r}"
            )
    return counts


def default_guess_counts(num_canaries: int) -> tuple[tuple[int, int], ...]:
    """Guess counts ``(k+, k-)`` tried by default: 5%, 10%, 25%, 50% and all of the canaries, guessed
    either all "included" (top scores) or half each way (top and bottom scores).

    They depend on ``num_canaries`` only, never on the inclusion bits, as validity requires.
    """
    m = chk.integer("num_canaries", num_canaries, minimum=1)
    out: list[tuple[int, int]] = []
    for fraction in (0.05, 0.1, 0.25, 0.5, 1.0):
        k = max(1, int(round(fraction * m)))
        for pair in ((k, 0), (k - k // 2, k // 2)):
            if pair not in out:
                out.append(pair)
    return tuple(out)


def audit_scores(
    scores: np.ndarray | Sequence[float],
    included: np.ndarray | Sequence[bool],
    *,
    delta: float,
    confidence: float = 0.95,
    guess_counts: Sequence[tuple[int, int]] | None = None,
    claimed_epsilon: float | None = None,
    level: str = "client",
) -> AuditResult:
    """Audit from canary scores (higher = more likely included) and the true inclusion bits.

    For each guess count ``(k+, k-)`` the ``k+`` highest-scored canaries are guessed included
    and the ``k-`` lowest excluded; the bound is computed at significance
    ``(1 - confidence) / len(guess_counts)`` and the largest is returned. If ``claimed_epsilon``
    is given and the bound exceeds it, a :class:`PrivacyAuditWarning` is issued.

    Raises:
        DPValueError / DPTypeError: scores that are not finite, bits of another length or not
            boolean, guess counts that do not fit ``m``, bad ``delta`` or ``confidence``.
    """
    s = np.asarray(scores, dtype=np.float64) if not isinstance(scores, np.ndarray) else scores.astype(np.float64)
    chk.float_vector("scores", s)
    bits = np.asarray(included)
    if bits.shape != s.shape:
        raise DPValueError(f"included must have the shape of scores {s.shape}, got {bits.shape}")
    if bits.dtype != np.bool_:
        if not np.all(np.isin(bits, (0, 1))):
            raise DPTypeError(f"included must hold booleans (or 0/1), got dtype {bits.dtype}")
        bits = bits.astype(bool)
    m = s.size
    d = _delta(delta)
    conf = chk.open_unit("confidence", confidence)
    chk.one_of("level", level, ("client", "sample"))
    counts = _guess_counts(m, guess_counts)
    claimed = None if claimed_epsilon is None else chk.non_negative("claimed_epsilon", claimed_epsilon)
    significance = (1.0 - conf) / len(counts)
    order = np.argsort(-s, kind="stable")
    best: tuple[float, int, int, int, int] | None = None
    for k_plus, k_minus in counts:
        right = int(bits[order[:k_plus]].sum()) + int((~bits[order[m - k_minus :]]).sum() if k_minus else 0)
        r = k_plus + k_minus
        eps = _bound(m, r, right, d, significance)
        if best is None or eps > best[0]:
            best = (eps, r, right, k_plus, k_minus)
    assert best is not None
    result = AuditResult(
        epsilon_lower_bound=best[0], confidence=conf, delta=d, canaries=m, guesses=best[1], correct=best[2],
        positive_guesses=best[3], negative_guesses=best[4], candidates=len(counts), claimed_epsilon=claimed,
        ceiling=_ceiling(m, counts, d, significance), level=level,
    )  # fmt: skip
    if result.exceeds_claim:
        warnings.warn(result.summary(), PrivacyAuditWarning, stacklevel=2)
    return result


# ----------------------------------------------------------------------------- canaries


@dataclass(frozen=True)
class Canaries:
    """Canary clients of a client-level audit: orthonormal directions and who was included.

    Canary ``i`` has the direction ``u_i = T e_{j_i}``: a distinct coordinate ``j_i`` pushed
    through a random orthogonal transform ``T`` (random signs, an orthonormal DCT, random
    signs, a random permutation), so the directions are exactly orthonormal yet spread over
    every coordinate, and neither they nor the scores need an ``m x d`` matrix or BLAS.

    Attributes:
        ids: one id per canary (``"canary-0000"``...), in order.
        coordinates: ``(m,)`` the distinct ``j_i``.
        included: ``(m,)`` bool, each drawn independently with probability 1/2.
        clip_bound: canary ``i`` sends ``clip_bound * u_i`` (L2 norm exactly the clip bound).
        dimension: ``d``, the length of the model vector.
    """

    ids: tuple[str, ...]
    coordinates: np.ndarray
    included: np.ndarray
    clip_bound: float
    dimension: int
    _signs_in: np.ndarray = field(repr=False)
    _signs_out: np.ndarray = field(repr=False)
    _permutation: np.ndarray = field(repr=False)

    def _forward(self, x: np.ndarray) -> np.ndarray:
        y = self._signs_out * fft.idct(self._signs_in * x, norm="ortho")
        return y[self._permutation]

    def _inverse(self, y: np.ndarray) -> np.ndarray:
        z = np.empty_like(y)
        z[self._permutation] = y
        return self._signs_in * fft.dct(self._signs_out * z, norm="ortho")

    def direction(self, index: int) -> np.ndarray:
        """``u_i`` as a float64 unit vector."""
        i = chk.integer("index", index, minimum=0)
        if i >= len(self.ids):
            raise DPValueError(f"index must be < {len(self.ids)} (the number of canaries), got {index!r}")
        e = np.zeros(self.dimension)
        e[self.coordinates[i]] = 1.0
        return self._forward(e)

    def updates(self) -> dict[str, np.ndarray]:
        """id -> float32 update ``clip_bound * u_i`` of every *included* canary (the others never take part)."""
        return {
            cid: (self.clip_bound * self.direction(i)).astype(np.float32)
            for i, (cid, keep) in enumerate(zip(self.ids, self.included))
            if keep
        }

    def scores(self, model_delta: np.ndarray) -> np.ndarray:
        """``<model_delta, u_i>`` per canary: how far training moved the model along each canary.

        Raises:
            DPValueError / DPTypeError: ``model_delta`` not a finite float vector of length ``d``.
        """
        vec = chk.float_vector("model_delta", np.asarray(model_delta))
        if vec.size != self.dimension:
            raise DPValueError(f"model_delta must have length {self.dimension} (the canaries' dimension), got {vec.size}")
        return self._inverse(vec.astype(np.float64))[self.coordinates]

    def orthogonalize(self, vector: np.ndarray) -> np.ndarray:
        """``vector`` with its components along every canary direction removed (float64)."""
        z = self._inverse(np.asarray(vector, dtype=np.float64))
        z[self.coordinates] = 0.0
        return self._forward(z)


def draw_canaries(
    *, num_canaries: int, dimension: int, clip_bound: float, rng: np.random.Generator, prefix: str = "canary"
) -> Canaries:
    """Draw ``num_canaries`` orthonormal directions in ``R^dimension`` and the inclusion bits.

    Raises:
        DPValueError: ``num_canaries > dimension`` (orthonormal canaries would not fit) or bad values.
    """
    m = chk.integer("num_canaries", num_canaries, minimum=1)
    d = chk.integer("dimension", dimension, minimum=1)
    if m > d:
        raise DPValueError(f"num_canaries must be <= dimension={d} so that canary directions are orthonormal, got {m}")
    c = chk.positive("clip_bound", clip_bound)
    if not isinstance(rng, np.random.Generator):
        raise DPTypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if not isinstance(prefix, str) or not prefix:
        raise DPValueError(f"prefix must be a non-empty str, got {prefix!r}")
    coordinates = np.sort(rng.choice(d, size=m, replace=False))
    signs_in = rng.choice(np.array([-1.0, 1.0]), size=d)
    signs_out = rng.choice(np.array([-1.0, 1.0]), size=d)
    permutation = rng.permutation(d)
    included = rng.random(m) < 0.5
    width = max(4, len(str(m - 1)))
    ids = tuple(f"{prefix}-{i:0{width}d}" for i in range(m))
    return Canaries(
        ids=ids, coordinates=coordinates, included=included, clip_bound=c, dimension=d,
        _signs_in=signs_in, _signs_out=signs_out, _permutation=permutation,
    )  # fmt: skip


def run_canary_audit(
    train: Callable[[dict[str, np.ndarray]], np.ndarray],
    *,
    canaries: Canaries,
    delta: float,
    claimed_epsilon: float | Callable[[], float] | None = None,
    confidence: float = 0.95,
    guess_counts: Sequence[tuple[int, int]] | None = None,
    level: str = "client",
) -> AuditResult:
    """Run one training with the included canaries and audit it.

    Args:
        train: runs the whole training with the given extra canary clients (id -> fixed update,
            sent whenever that client takes part) and returns the final shared model minus the
            initial one. With fedcore: add a client per id and wrap the executor in
            ``fedcore.strategies.attacks.InjectedUpdates``.
        canaries: from :func:`draw_canaries`.
        delta: the delta of the claim.
        claimed_epsilon: the accountant's epsilon, or a callable evaluated after training (the
            ledger is filled by then), for example ``lambda: dp.epsilon(ledger, delta=delta)``.
        confidence: confidence of the bound.
        guess_counts: see :func:`audit_scores`.
        level: ``"client"`` (canary clients) or ``"sample"`` (canary records or gradients in DP-SGD).
    """
    if not callable(train):
        raise DPTypeError(f"train must be callable, got {type(train).__name__}")
    if not isinstance(canaries, Canaries):
        raise DPTypeError(f"canaries must be a Canaries, got {type(canaries).__name__}")
    final_delta = train(canaries.updates())
    claimed = claimed_epsilon() if callable(claimed_epsilon) else claimed_epsilon
    return audit_scores(
        canaries.scores(np.asarray(final_delta)), canaries.included, delta=delta, confidence=confidence,
        guess_counts=guess_counts, claimed_epsilon=claimed, level=level,
    )  # fmt: skip


#: The deltas a DP-SGD audit may test the accountant's privacy curve at (fixed, so the choice
#: depends on the claim and the canary count only, never on the inclusion bits).
TESTED_DELTAS = (1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10)


def audited_point(
    claimed: Callable[[float], float], *, num_canaries: int, confidence: float = 0.95,
    guess_counts: Sequence[tuple[int, int]] | None = None, deltas: Sequence[float] = TESTED_DELTAS,
) -> tuple[float, float, float]:  # fmt: skip
    """The point ``(delta, epsilon(delta), ceiling)`` of a privacy curve an audit tests best.

    An accountant claims a whole curve, ``(epsilon(delta), delta)``-DP for every ``delta``. At the
    report's ``delta = 1e-5`` the one-run ceiling is barely above an epsilon-8 claim even with
    100,000 canaries (8.11; see :func:`audit_ceiling`). A smaller ``delta`` raises the ceiling
    faster than the curve's epsilon: the point with the largest margin ``ceiling - epsilon`` is the
    one a broken run would fail. ``claimed`` maps a delta to the accountant's epsilon.
    """
    m = chk.integer("num_canaries", num_canaries, minimum=1)
    conf = chk.open_unit("confidence", confidence)
    counts = _guess_counts(m, guess_counts)
    significance = (1.0 - conf) / len(counts)
    if not deltas:
        raise DPValueError("deltas must hold at least one delta, got none")
    points = []
    for d in map(_delta, deltas):
        ceiling, eps = _ceiling(m, counts, d, significance), float(claimed(d))
        points.append((ceiling - eps, d, eps, ceiling))
    _, d, eps, ceiling = max(points)
    return d, eps, ceiling


def audit_dp_sgd(
    events: Sequence[Any],
    *,
    num_canaries: int = 100_000,
    honest_records: int = 200,
    seed: int = 0,
    lazy_noise: bool = False,
    confidence: float = 0.95,
    deltas: Sequence[float] = TESTED_DELTAS,
    accountant: str = "pld",
) -> AuditResult:
    """Audit the library's own DP-SGD (``SampleLevelDP``) at a run's settings, with gradient canaries.

    ``events`` are one client's ``SampleLevelEvent``s (a run's history of that client): each is
    replayed with its noise multiplier, clip bound, sampling rate and steps through
    ``PrivateTraining`` with Poisson sampling and the library's own per-sample clipping
    (``clipping="embedding"``), eager or lazy noise, and SGD. A run that clipped with Opacus's hooks
    ("default", "ghost"), used fixed-size batches or user-grouped batches is thus checked for its
    mechanism and accountant at its settings, not for its own code path or model. The model is an
    ``nn.Embedding`` of ``num_canaries + 1`` rows of one coordinate: canary record ``i`` reads row
    ``i`` only and pushes it up with a gradient of 100 times the clip bound (clipping must cut it),
    and ``honest_records`` records read the last row. Each canary record is in the data set with
    probability 1/2; its score is how far its row moved. This is the white-box canary of Steinke,
    Nasr, Jagielski 2023 (Sec. 7), with the canaries' directions the coordinate axes. Under
    user-level DP the unit is a user (its sampling rate is per user): a canary stands for one user.

    The claim tested is the curve of ``accountant`` (the run's) for the same events at the delta of
    :func:`audited_point` (from ``deltas``), where the audit has the most power; the result's
    ``delta`` and ``claimed_epsilon`` are that point. A grossly broken run is flagged
    (:class:`PrivacyAuditWarning`): at the main job's settings, noise switched off or cut fourfold,
    or clipping not applied; noise cut two- or threefold (true epsilon far above the claim) gives
    bounds of 3.1 and 5.9, below the claim of 8.8, so a milder break can pass.

    The scores are valid for the bound although the padding records (which make the loader have
    exactly ``1 / sample_rate`` batches) and the averaging denominator depend on how many canaries
    were included: padding reads only the last row, which is never scored, and the denominator
    scales every row alike, which no ranking of the scores sees.

    Raises:
        DPTypeError / DPValueError: no events, events that are not sample-level, or a sampling
            rate that is not 1 over a whole number of batches.
    """
    from ._accounting import sample_level_epsilons
    from ._events import SampleLevelEvent
    from ._opacus import SampleLevelDP

    if not isinstance(events, Sequence) or not events:
        raise DPValueError(f"events must be a non-empty sequence of SampleLevelEvent, got {events!r}")
    batches = []
    for i, e in enumerate(events):
        if not isinstance(e, SampleLevelEvent):
            raise DPTypeError(f"events[{i}] must be a SampleLevelEvent, got {type(e).__name__}")
        per_epoch = round(1.0 / e.sample_rate)
        if abs(per_epoch * e.sample_rate - 1.0) > 1e-9:
            raise DPValueError(f"events[{i}].sample_rate must be 1 / (batches per epoch) to be replayed, got {e.sample_rate!r}")
        batches.append(per_epoch)
    m = chk.integer("num_canaries", num_canaries, minimum=100)
    honest = chk.integer("honest_records", honest_records, minimum=0)
    chk.integer("seed", seed, minimum=0)
    if not isinstance(lazy_noise, bool):
        raise DPTypeError(f"lazy_noise must be a bool, got {lazy_noise!r}")
    ledger = Ledger()
    for e in events:
        ledger.record(dataclasses.replace(e, client_id="audited"))
    # the upper and lower halves guessed in and out, less four standard deviations of the number
    # included, so that a run that leaks everything gets every guess right
    k = max(1, m // 2 - 2 * math.isqrt(m))
    guess_counts = ((k, k),)
    delta, claimed, _ = audited_point(
        lambda d: sample_level_epsilons(ledger, delta=d, accountant=accountant)["audited"], num_canaries=m, confidence=confidence,
        guess_counts=guess_counts, deltas=deltas,
    )  # fmt: skip

    generator = torch.Generator().manual_seed(seed)
    included = torch.rand(m, generator=generator) < 0.5
    rows = torch.cat([torch.nonzero(included).flatten(), torch.full((honest,), m)])
    model = torch.nn.Embedding(m + 1, 1)
    torch.nn.init.zeros_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    for e, per_epoch in zip(events, batches):
        pad = -len(rows) % per_epoch  # so that the loader has exactly 1 / sample_rate batches
        data = _Rows(torch.cat([rows, torch.full((pad,), m)]))
        loader: torch.utils.data.DataLoader = torch.utils.data.DataLoader(
            data, batch_size=len(data) // per_epoch, collate_fn=_Rows.collate
        )
        config = SampleLevelDP(noise_multiplier=e.noise_multiplier, max_grad_norm=e.max_grad_norm,
                               clipping="embedding", lazy_noise=lazy_noise)  # fmt: skip
        training = config.attach(model, optimizer, loader, generator=generator)
        try:
            while training.steps < e.steps:
                for (batch,) in training.data_loader:
                    training.step(-100.0 * e.max_grad_norm * model(batch).flatten())
                    if training.steps == e.steps:
                        break
        finally:
            training.detach()
    scores = model.weight.detach()[:m, 0].double().numpy()
    result = audit_scores(
        scores, included.numpy(), delta=delta, confidence=confidence, guess_counts=guess_counts,
        claimed_epsilon=claimed, level="sample",
    )  # fmt: skip
    noise = "lazy" if lazy_noise and m + 1 >= MIN_DEFERRED_COORDINATES else "eager"
    ran = sorted({f"clipping {e.clipping!r}, {e.sampling} sampling of {e.unit}s" for e in events})
    method = (
        f"{result.method}: the library's DP-SGD step (Opacus's Poisson loader, the library's per-sample clipping, "
        f"{noise} noise) replayed at the run's noise multiplier, clip bound, sampling rate and steps with gradient "
        f"canaries (the run itself: {'; '.join(ran)}); it checks the mechanism and the {accountant} accountant at "
        "those settings, not the run's own model or code path"
    )
    return dataclasses.replace(result, method=method, extra={"ledger": ledger, "tested_deltas": tuple(deltas)})


class _Rows(torch.utils.data.Dataset):
    """The row each record reads, fetched a batch at a time (a per-item dataset costs seconds a step)."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Any]:
        return (self.rows[index],)

    def __getitems__(self, indices: list[int]) -> Any:
        return self.rows[indices]

    @staticmethod
    def collate(batch: Any) -> tuple[Any]:
        return (batch,)


def audit_dp_fedavg(
    *,
    noise_multiplier: float,
    rounds: int,
    rng: np.random.Generator,
    clip_bound: float = 1.0,
    num_canaries: int = 1000,
    dimension: int = 4000,
    num_clients: int = 50,
    delta: float = 1e-5,
    add_noise: bool = True,
    confidence: float = 0.95,
) -> AuditResult:
    """Audit a small simulated DP-FedAvg run (central Gaussian noise, every client every round).

    Honest clients send clipped updates around a common direction; canary clients are included
    with probability 1/2. The server sums, adds ``CentralGaussian`` noise and averages over the
    fixed expected count. The ledger always records the claimed noise; ``add_noise=False`` skips
    the noise while the accountant is told it was added (the broken run an audit must catch).
    ``extra`` of the result holds the ledger and the canaries.
    """
    sigma = chk.positive("noise_multiplier", noise_multiplier)
    t_max = chk.integer("rounds", rounds, minimum=1)
    n = chk.integer("num_clients", num_clients, minimum=0)
    if not isinstance(add_noise, bool):
        raise DPTypeError(f"add_noise must be a bool, got {add_noise!r}")
    canaries = draw_canaries(num_canaries=num_canaries, dimension=dimension, clip_bound=clip_bound, rng=rng)
    mechanism = CentralGaussian(noise_multiplier=sigma, clip_bound=canaries.clip_bound)
    ledger = Ledger()
    d = canaries.dimension
    common = canaries.orthogonalize(rng.standard_normal(d))  # the task's direction, away from the canaries
    common /= np.linalg.norm(common)
    denominator = n + len(canaries.ids) / 2.0

    def train(canary_updates: dict[str, np.ndarray]) -> np.ndarray:
        model = np.zeros(d)
        participants = n + len(canary_updates)
        for t in range(1, t_max + 1):
            total = np.zeros(d)
            for _ in range(n):
                honest = canaries.clip_bound * (common + rng.standard_normal(d) / math.sqrt(d))
                total += honest * min(1.0, canaries.clip_bound / float(np.linalg.norm(honest)))
            for vec in canary_updates.values():
                total += vec
            if add_noise:
                total = mechanism.add(total, rng=rng)
            ledger.record(mechanism.event(round_index=t, participants=max(participants, 1), survivors=max(participants, 1)))
            model += total / max(denominator, 1.0)
        return model

    result = run_canary_audit(
        train, canaries=canaries, delta=delta, confidence=confidence,
        claimed_epsilon=lambda: _accounted_epsilon(ledger, delta=delta),
    )  # fmt: skip
    return AuditResult(**{**result.__dict__, "extra": {"ledger": ledger, "canaries": canaries, "noise_added": add_noise}})
