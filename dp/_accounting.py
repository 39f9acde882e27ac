"""Accountants: turn ledger events into (epsilon, delta).

- ``"pld"`` (the default headline): the privacy loss distribution accountant of
  ``dp_accounting`` (Koskela et al. 2020; Doroshenko, Ghazi, Kamath, Kumar, Manurangsi,
  PETS 2022, "connect the dots"), with pessimistic rounding, so the figure is an upper bound
  on the true epsilon of the composition, not an estimate. It covers every Gaussian mechanism
  (central Gaussian, the adaptive-clipping count, DP-SGD), Poisson-subsampled or not. Its
  discretization interval is chosen per history (``1e-4`` of a coarse first pass), which
  keeps the discretization error below about 0.01% of epsilon. A history holding Skellam or
  discrete Gaussian events is accounted with ``"rdp"`` instead (their PLD is not
  implemented); ``accountant_used`` says so and reports state it.
- ``"rdp"``: Renyi DP, the cross-check. Gaussian mechanisms use Opacus's subsampled-Gaussian
  RDP (Mironov, Talwar, Zhang 2019) via ``opacus.accountants.analysis.rdp``; Skellam uses the
  bound of Agarwal, Kairouz, Liu (NeurIPS 2021, Cor. 3.6); the distributed discrete Gaussian
  uses Kairouz, Liu, Steinke (ICML 2021, Thm. 1 / Prop. 14). For those two, client sampling
  with ``q < 1`` is handled by the general Poisson-subsampling bound of Zhu & Wang (ICML 2019,
  Thm. 5) at integer orders (a fractional order uses the next integer order, valid since RDP
  grows with the order). Conversion to (epsilon, delta) is Opacus's (Balle et al. AISTATS
  2020, Thm. 21).
- ``"prv"``: Opacus's PRV accountant (Gopi, Lee, Wutschitz NeurIPS 2021); Gaussian
  mechanisms only. Reports the upper end of its numerical error interval.
- ``"tightest"``: the smallest of the valid upper bounds above that apply to the history
  (PRV is skipped when RDP already exceeds epsilon 50).

Adaptive clipping: the noisy count of a round (``QuantileEvent``) is computed on the same
sampled clients as that round's update noise, so the two are one mechanism, not two
independent ones (composing them as independent would under-report under sampling). The
accountants join them as Andrew et al. (NeurIPS 2021, Sec. 3.1) do: one Gaussian with the
effective noise multiplier ``(z_update^-2 + z_count^-2)^-1/2`` (for Skellam / discrete
Gaussian updates, the RDP of the pair at ``q = 1`` is summed before subsampling).

All accountants assume Poisson sampling and add/remove adjacency. Events recorded with
``sampling="fixed_size"`` are accounted as if Poisson with the same rate (an approximation;
the privacy report states it).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import special

from . import _checks as chk
from ._errors import AccountingError, DPTypeError, DPValueError
from ._events import (
    DiscreteGaussianEvent,
    Event,
    GaussianEvent,
    QuantileEvent,
    SampleLevelEvent,
    SkellamEvent,
    TuningEvent,
    is_event,
)
from ._ledger import Ledger
from ._tuning import TrialDistribution, tuning_rdp

__all__ = [
    "ACCOUNTANTS",
    "RDP_ORDERS",
    "epsilon",
    "sample_level_epsilons",
    "epsilon_by_accountant",
    "accountant_used",
    "effective_noise_multiplier",
    "prv_bounds",
    "pld_epsilon",
    "skellam_rdp",
    "discrete_gaussian_rdp",
    "poisson_subsampled_rdp",
    "rdp_curve",
]

ACCOUNTANTS = ("pld", "rdp", "prv", "tightest")

# Opacus's default orders, extended to larger orders so that small epsilons stay reachable.
_OPACUS_ALPHAS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
RDP_ORDERS: tuple[float, ...] = _OPACUS_ALPHAS + (64, 80, 96, 128, 160, 192, 256)
_INT_ORDERS = np.array(sorted({int(math.ceil(a)) for a in RDP_ORDERS}), dtype=np.int64)

# A group of identical mechanism runs: (key, multiplicity). Keys are hashable tuples:
# ("gaussian", z, q), ("skellam", d1, d2, mu, q, extra), ("discrete_gaussian", d1, d2, sigma,
# n, dim, q, extra), where ``extra`` is sum(z_count^-2) of adaptive-clipping counts joined to
# the round (0.0 when none).
_Key = tuple
_UPDATES = (GaussianEvent, SkellamEvent, DiscreteGaussianEvent)


def _events_of(ledger_or_events: Ledger | Iterable[Event]) -> tuple[Event, ...]:
    if isinstance(ledger_or_events, Ledger):
        return ledger_or_events.events
    if isinstance(ledger_or_events, (str, bytes)) or not isinstance(ledger_or_events, Iterable):
        raise DPTypeError(f"ledger_or_events must be a Ledger or an iterable of events, got {type(ledger_or_events).__name__}")
    events = tuple(ledger_or_events)
    for e in events:
        if not is_event(e):
            raise DPTypeError(f"every item must be a dp event, got {type(e).__name__}")
    return events


def effective_noise_multiplier(*multipliers: float) -> float:
    """One Gaussian equivalent to several on the same sample: ``(sum z_k^-2)^-1/2`` (Andrew et al. 2021, Sec. 3.1)."""
    if not multipliers:
        raise DPValueError("effective_noise_multiplier needs at least one noise multiplier, got none")
    return float(sum(chk.positive("noise_multiplier", z) ** -2 for z in multipliers) ** -0.5)


def _key(event: Event, extra: float = 0.0) -> tuple[_Key, int]:
    """What an accountant needs from one event, and how many times it ran.

    ``extra``: ``sum(z^-2)`` of the adaptive-clipping counts joined to this event's round.
    """
    if isinstance(event, (GaussianEvent, QuantileEvent)):
        z = event.noise_multiplier if not extra else (event.noise_multiplier**-2 + extra) ** -0.5
        return ("gaussian", float(z), event.sample_rate), event.count
    if isinstance(event, SampleLevelEvent):
        return ("gaussian", event.noise_multiplier, event.sample_rate), event.steps
    if isinstance(event, TuningEvent):
        d = event.distribution
        trial = frozenset(_groups(event.trial).items())
        return ("tuning", (d.kind, d.eta, d.gamma, d.mu), trial, event.score_noise_multiplier), 1
    if isinstance(event, SkellamEvent):
        return (
            ("skellam", event.l1_sensitivity, event.l2_sensitivity, event.variance, event.sample_rate, float(extra)),
            event.count,
        )
    if isinstance(event, DiscreteGaussianEvent):
        return (
            (
                "discrete_gaussian",
                event.l1_sensitivity,
                event.l2_sensitivity,
                event.local_stddev,
                event.survivors,
                event.dim,
                event.sample_rate,
                float(extra),
            ),
            event.count,
        )
    raise DPTypeError(f"not a dp event: {type(event).__name__}")


def _joined(events: Sequence[Event]) -> list[tuple[Event, float]]:
    """Each event with the ``sum(z^-2)`` of the adaptive-clipping counts it is one mechanism with.

    A round's counts join that round's one update-noise event (same clients, same sampling);
    counts of a round without one are joined with each other. Raises ``AccountingError`` when
    the pairing is ambiguous or the sampling rates disagree.
    """
    counts: dict[int, list[QuantileEvent]] = {}
    for e in events:
        if isinstance(e, QuantileEvent):
            if e.count != 1:
                raise AccountingError(
                    f"a QuantileEvent is one round's count and must have count=1, got count={e.count} in round {e.round_index}"
                )
            counts.setdefault(e.round_index, []).append(e)
    if not counts:
        return [(e, 0.0) for e in events]
    out: list[tuple[Event, float]] = []
    done: set[int] = set()
    for e in events:
        if isinstance(e, QuantileEvent):
            continue
        r = e.round_index
        if isinstance(e, _UPDATES) and e.level == "client" and r in counts:
            if r in done:
                raise AccountingError(
                    f"round {r} holds more than one client-level update-noise event and an adaptive-clipping "
                    f"count; which one the count was computed with is ambiguous"
                )
            rates = {q.sample_rate for q in counts[r]}
            if rates != {e.sample_rate} or e.count != 1:
                raise AccountingError(
                    f"round {r}: the adaptive-clipping count (sample_rate {sorted(rates)}) must share the update "
                    f"noise's clients (sample_rate {e.sample_rate}, count {e.count}, expected count 1)"
                )
            done.add(r)
            out.append((e, sum(q.noise_multiplier**-2 for q in counts[r])))
        else:
            out.append((e, 0.0))
    for r, qs in counts.items():
        if r in done:
            continue
        if len({q.sample_rate for q in qs}) != 1:
            raise AccountingError(f"round {r}: adaptive-clipping counts with different sample rates cannot be joined")
        first = qs[0]
        out.append((first, sum(q.noise_multiplier**-2 for q in qs[1:])))
    return out


def _groups(events: Iterable[Event], repeat: int = 1) -> Counter:
    out: Counter = Counter()
    for e, extra in _joined(tuple(events)):
        k, m = _key(e, extra)
        if m:
            out[k] += m * repeat
    return out


# ----------------------------------------------------------------------------- RDP curves


def skellam_rdp(order: float | np.ndarray, *, l1_sensitivity: float, l2_sensitivity: float, variance: float) -> Any:
    """RDP of the Skellam mechanism at integer ``order`` (Agarwal et al. 2021, Cor. 3.6); arrays of orders too.

    ``eps(a) = a D2^2 / (2 mu) + min(((2a - 1) D2^2 + 6 D1) / (4 mu^2), 3 D1 / (2 mu))`` with
    integer-domain sensitivities ``D1, D2`` and Skellam variance ``mu``.
    """
    a, d1, d2, mu = np.asarray(order, dtype=np.float64), l1_sensitivity, l2_sensitivity, variance
    out = a * d2 * d2 / (2 * mu) + np.minimum(((2 * a - 1) * d2 * d2 + 6 * d1) / (4 * mu * mu), 3 * d1 / (2 * mu))
    return float(out) if out.ndim == 0 else out


def discrete_gaussian_rdp(
    order: float | np.ndarray,
    *,
    l1_sensitivity: float,
    l2_sensitivity: float,
    local_stddev: float,
    num_clients: int,
    dim: int,
) -> Any:
    """RDP of a sum of ``num_clients`` discrete Gaussians (Kairouz, Liu, Steinke 2021, Prop. 14); arrays of orders too.

    With ``s = sqrt(n) * sigma``, ``tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1))``:
    ``eps(a) = min(a/2 (D2/s)^2 + tau d, a/2 ((D2/s)^2 + 2 (D1/s) tau + tau^2 d), a/2 (D2/s + sqrt(d) tau)^2)``.
    """
    a, n, sigma = np.asarray(order, dtype=np.float64), int(num_clients), local_stddev
    ks = np.arange(1, n, dtype=np.float64)
    tau = 10.0 * float(np.sum(np.exp(-2.0 * math.pi**2 * sigma**2 * ks / (ks + 1.0)))) if n > 1 else 0.0
    s = math.sqrt(n) * sigma
    l2, l1 = l2_sensitivity / s, l1_sensitivity / s
    out = np.minimum(
        np.minimum(a / 2 * l2 * l2 + tau * dim, a / 2 * (l2 * l2 + 2 * l1 * tau + tau * tau * dim)),
        a / 2 * (l2 + math.sqrt(dim) * tau) ** 2,
    )
    return float(out) if out.ndim == 0 else out


def poisson_subsampled_rdp(eps_at: np.ndarray, order: int, *, q: float) -> float:
    """Zhu & Wang (ICML 2019) Thm. 5: RDP at integer ``order`` of a Poisson-subsampled mechanism.

    ``eps_at[l]`` is the mechanism's RDP at integer order ``l`` (indices ``2..order`` used).
    Returns ``min(bound, eps_at[order])``.
    """
    a = int(order)
    if q >= 1.0:
        return float(eps_at[a])
    log_q, log_1q = math.log(q), math.log1p(-q)
    terms = [(a - 1) * log_1q + math.log(a * q - q + 1)]
    terms.append(
        float(special.gammaln(a + 1) - special.gammaln(3) - special.gammaln(a - 1)) + 2 * log_q + (a - 2) * log_1q + eps_at[2]
    )
    if a >= 3:
        ls = np.arange(3, a + 1)
        log_comb = special.gammaln(a + 1) - special.gammaln(ls + 1) - special.gammaln(a - ls + 1)
        t = math.log(3.0) + log_comb + ls * log_q + (a - ls) * log_1q + (ls - 1) * eps_at[3 : a + 1]
        terms.extend(t.tolist())
    bound = float(special.logsumexp(terms)) / (a - 1)
    return min(bound, float(eps_at[a]))


@functools.lru_cache(maxsize=4096)
def _curve(key: _Key) -> tuple[float, ...]:
    """RDP at ``RDP_ORDERS`` of one run of the mechanism described by ``key``."""
    kind = key[0]
    if kind == "gaussian":
        from opacus.accountants.analysis import rdp as opacus_rdp

        _, z, q = key
        return tuple(float(v) for v in opacus_rdp.compute_rdp(q=q, noise_multiplier=z, steps=1, orders=list(RDP_ORDERS)))
    if kind == "tuning":  # Papernot & Steinke 2022: the best of K trials, each the trial's events and one noised score
        _, (dist_kind, eta, gamma, mu), trial, score_z = key
        per_trial = _sum_curves(dict(trial)) + np.asarray(_curve(("gaussian", float(score_z), 1.0)))
        dist = TrialDistribution(kind=dist_kind, eta=eta, gamma=gamma, mu=mu)
        return tuple(float(v) for v in tuning_rdp(RDP_ORDERS, per_trial, dist))
    max_order = int(_INT_ORDERS[-1])
    a = np.arange(max_order + 1, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if kind == "skellam":
            _, d1, d2, mu, q, extra = key
            eps_at = skellam_rdp(a, l1_sensitivity=d1, l2_sensitivity=d2, variance=mu)
        elif kind == "discrete_gaussian":
            _, d1, d2, sigma, n, dim, q, extra = key
            eps_at = discrete_gaussian_rdp(a, l1_sensitivity=d1, l2_sensitivity=d2, local_stddev=sigma, num_clients=n, dim=dim)
        else:  # pragma: no cover - keys are built by _key
            raise AccountingError(f"unknown mechanism {kind!r}")
    eps_at = eps_at + a * extra / 2.0  # the joined adaptive-clipping counts: Gaussian, a / (2 z^2) each
    eps_at[:2] = np.inf
    by_int = {int(o): poisson_subsampled_rdp(eps_at, int(o), q=q) for o in _INT_ORDERS}
    return tuple(by_int[int(math.ceil(o))] for o in RDP_ORDERS)


def _sum_curves(groups: Mapping[_Key, int]) -> np.ndarray:
    """The composed RDP at ``RDP_ORDERS`` of every group (RDP adds up under composition)."""
    total = np.zeros(len(RDP_ORDERS))
    for key, mult in groups.items():
        total = total + mult * np.asarray(_curve(key))
    return total


def _rdp_epsilon(groups: Mapping[_Key, int], delta: float) -> tuple[float, float]:
    if not groups:
        return 0.0, float("nan")
    from opacus.accountants.analysis import rdp as opacus_rdp

    total = _sum_curves(groups)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        eps, order = opacus_rdp.get_privacy_spent(orders=list(RDP_ORDERS), rdp=total, delta=delta)
    return float(eps), float(order)


# ----------------------------------------------------------------------------- PRV


def prv_bounds(groups: Mapping[_Key, int], delta: float, *, eps_error: float) -> tuple[float, float, float]:
    """(lower, estimate, upper) epsilon from Opacus's PRV machinery (Gaussian groups only)."""
    from opacus.accountants.analysis.prv import (
        Domain,
        PoissonSubsampledGaussianPRV,
        TruncatedPrivacyRandomVariable,
        compose_heterogeneous,
        compute_safe_domain_size,
        discretize,
    )

    items = [(k, m) for k, m in groups.items()]
    bad = sorted({k[0] for k, _ in items if k[0] != "gaussian"})
    if bad:
        raise AccountingError(
            f"accountant 'prv' covers Gaussian mechanisms only; the history holds {bad}; use accountant='rdp' or 'tightest'"
        )
    if not items:
        return 0.0, 0.0, 0.0
    delta_error = delta / 1000
    prvs = [PoissonSubsampledGaussianPRV(k[2], k[1]) for k, _ in items]
    counts = [int(m) for _, m in items]
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        try:
            size = compute_safe_domain_size(prvs=prvs, max_self_compositions=counts, eps_error=eps_error, delta_error=delta_error)
            mesh = eps_error / math.sqrt(sum(counts) * math.log(12 / delta_error) / 2)
            domain = Domain.create_aligned(-size, size, mesh)
            dprvs = [discretize(TruncatedPrivacyRandomVariable(p, domain.t_min, domain.t_max), domain) for p in prvs]
            composed = compose_heterogeneous(dprvs=dprvs, num_self_compositions=counts)
            lower, estimate, upper = composed.compute_epsilon(delta, delta_error, eps_error)
        except (ValueError, RuntimeError, OverflowError, FloatingPointError) as exc:
            raise AccountingError(f"PRV accountant failed on this history: {exc}") from exc
    return float(lower), float(estimate), float(upper)


# "tightest" skips PRV when RDP already reports more than this (PRV gets slow and such an
# epsilon is no meaningful guarantee anyway).
_PRV_MAX_EPSILON = 50.0
# accountant="prv" refuses histories whose RDP epsilon exceeds this.
_PRV_MAX_RDP_EPSILON = 500.0


def _prv_error(rdp_eps: float) -> float:
    """PRV's absolute error target: 0.3% of the RDP figure, within [1e-4, 0.01]."""
    return float(min(0.01, max(1e-4, 0.003 * rdp_eps)))


# ----------------------------------------------------------------------------- PLD

#: Discretization of the final PLD pass, relative to the coarse pass's epsilon, and its limits.
_PLD_RELATIVE_INTERVAL = 1e-4
_PLD_COARSE_INTERVAL = 1e-2
_PLD_MIN_INTERVAL = 1e-12


@functools.lru_cache(maxsize=512)
def _gaussian_pld(z: float, q: float, interval: float) -> Any:
    from dp_accounting.pld import privacy_loss_distribution as pld

    return pld.from_gaussian_mechanism(
        standard_deviation=z, sensitivity=1.0, sampling_prob=q, value_discretization_interval=interval,
        pessimistic_estimate=True, use_connect_dots=True,
    )  # fmt: skip


def _pld_at(groups: Mapping[_Key, int], delta: float, interval: float) -> float:
    composed = None
    for (_kind, z, q), count in sorted(groups.items()):
        part = _gaussian_pld(float(z), float(q), interval).self_compose(int(count))
        composed = part if composed is None else composed.compose(part)
    assert composed is not None  # pld_epsilon returns 0.0 for no groups before calling this
    return float(composed.get_epsilon_for_delta(delta))


def _merge_unsampled(groups: Mapping[_Key, int]) -> dict[_Key, int]:
    """Every unsampled (q = 1) Gaussian group as one Gaussian: exact, and one PLD instead of a composition.

    The privacy loss of a Gaussian mechanism is itself Gaussian, so ``n_i`` rounds at noise
    ``z_i`` compose to exactly one Gaussian of noise ``(sum_i n_i / z_i^2)^(-1/2)`` (mu-GDP,
    Dong, Roth, Su 2022, Cor. 3.3); discretizing that one mechanism is tighter than composing
    the discretized rounds, and still pessimistic.
    """
    unsampled = {k: n for k, n in groups.items() if float(k[2]) >= 1.0}
    if len(unsampled) == 1 and next(iter(unsampled.values())) == 1:
        return dict(groups)
    merged = {k: n for k, n in groups.items() if k not in unsampled}
    if unsampled:
        z = sum(n / float(k[1]) ** 2 for k, n in unsampled.items()) ** -0.5
        merged[("gaussian", z, 1.0)] = 1
    return merged


def _unsampled_gaussian_epsilon(z: float, delta: float) -> float:
    """Epsilon of one unsampled Gaussian mechanism from its PLD's closed form (``dp_accounting``'s delta(eps), inverted).

    Its privacy loss is Gaussian, so no discretization is needed; the root is rounded up until
    its delta is at most ``delta`` (an upper bound, like the pessimistic PLD).
    """
    from dp_accounting.pld.privacy_loss_mechanism import GaussianPrivacyLoss
    from scipy.optimize import brentq

    loss = GaussianPrivacyLoss(standard_deviation=z, sensitivity=1.0, sampling_prob=1.0)
    if loss.get_delta_for_epsilon(0.0) <= delta:
        return 0.0
    high = 1.0
    while loss.get_delta_for_epsilon(high) > delta:
        high *= 2.0
    eps = float(brentq(lambda e: loss.get_delta_for_epsilon(e) - delta, 0.0, high, xtol=1e-12, rtol=1e-12))
    while loss.get_delta_for_epsilon(eps) > delta:
        eps = eps * (1 + 1e-12) + 1e-15
    return eps


def pld_epsilon(groups: Mapping[_Key, int], delta: float, *, relative: float = _PLD_RELATIVE_INTERVAL) -> float:
    """Epsilon of Gaussian groups from ``dp_accounting``'s PLD with pessimistic rounding (an upper bound).

    The discretization interval is sized to the answer: a first pass at ``1e-2``, a second at
    ``10 * relative`` times its epsilon; the pessimistic excess shrinks about in proportion to the
    interval, so the drop between two passes tells how much of it is left, and further passes
    (each interval a power of two, so that nearby answers, the rounds of a curve and calibration's
    candidates, share one cached PLD per mechanism) go on until that estimate is at most
    ``relative`` times epsilon, down to an interval of ``relative`` times epsilon at the finest.
    Every pass is an upper bound: the estimate only decides how tight.
    Unsampled groups first become one Gaussian (:func:`_merge_unsampled`), which has a closed form.
    """
    bad = sorted({k[0] for k in groups if k[0] != "gaussian"})
    if bad:
        raise AccountingError(f"accountant 'pld' covers Gaussian mechanisms only; the history holds {bad}; use accountant='rdp'")
    if not groups:
        return 0.0
    groups = _merge_unsampled(groups)
    if len(groups) == 1 and (key := next(iter(groups)))[2] >= 1.0:
        return _unsampled_gaussian_epsilon(float(key[1]), delta)
    interval = _PLD_COARSE_INTERVAL
    eps = _pld_at(groups, delta, interval)
    finer = _power_of_two_below(10 * relative * eps)
    for _ in range(6):
        if not math.isfinite(eps) or eps <= 0 or finer >= 0.5 * interval:
            break
        finer_eps = _pld_at(groups, delta, finer)
        left = max(0.0, eps - finer_eps) * finer / (interval - finer)  # the excess still in finer_eps
        interval, eps = finer, finer_eps
        if left <= relative * eps:
            break
        # never finer than relative * eps itself: the excess is far below it by then
        finer = max(_power_of_two_below(interval * relative * eps / left), _power_of_two_below(relative * eps))
    return eps


def _power_of_two_below(x: float) -> float:
    return 2.0 ** math.floor(math.log2(min(0.1, max(_PLD_MIN_INTERVAL, x))))


# ----------------------------------------------------------------------------- public


def _gaussian_only(groups: Mapping[_Key, int]) -> bool:
    return all(k[0] == "gaussian" for k in groups)


def _used(groups: Mapping[_Key, int], accountant: str) -> str:
    if accountant == "pld" and not _gaussian_only(groups):
        return "rdp"
    return accountant


def _epsilon_groups(groups: Mapping[_Key, int], delta: float, accountant: str) -> float:
    if not groups:
        return 0.0
    return _epsilon_cached(frozenset(groups.items()), delta, _used(groups, accountant))


@functools.lru_cache(maxsize=4096)
def _epsilon_cached(items: frozenset, delta: float, accountant: str) -> float:
    groups = dict(items)
    gaussian_only = _gaussian_only(groups)
    if accountant == "pld":
        return pld_epsilon(groups, delta)
    if accountant == "tightest":
        rdp_eps = _epsilon_cached(items, delta, "rdp")
        if not gaussian_only:
            return rdp_eps
        best = min(rdp_eps, _epsilon_cached(items, delta, "pld"))
        if rdp_eps <= _PRV_MAX_EPSILON:
            best = min(best, _epsilon_cached(items, delta, "prv"))
        return best
    rdp_eps, _ = _rdp_epsilon(groups, delta)
    if accountant == "rdp":
        return rdp_eps
    if gaussian_only and not rdp_eps <= _PRV_MAX_RDP_EPSILON:
        raise AccountingError(
            f"accountant 'prv' is not run when RDP already gives epsilon={rdp_eps:.6g} "
            f"(> {_PRV_MAX_RDP_EPSILON:g}: no meaningful guarantee, and PRV gets very slow); use 'rdp'"
        )
    _, _, upper = prv_bounds(groups, delta, eps_error=_prv_error(rdp_eps))
    return upper


def _check_common(delta: object, accountant: object) -> tuple[float, str]:
    d = chk.open_unit("delta", delta)
    a = chk.one_of("accountant", accountant, ACCOUNTANTS)
    return d, a


def _client_events(events: Iterable[Event]) -> list[Event]:
    return [e for e in events if e.level == "client"]


def _per_client(events: Iterable[Event]) -> dict[str, list[Event]]:
    out: dict[str, list[Event]] = {}
    for e in events:
        if e.level == "sample":
            out.setdefault(e.client_id, []).append(e)  # type: ignore[arg-type]
    return out


def epsilon(ledger_or_events: Ledger | Iterable[Event], *, delta: float, accountant: str = "pld") -> float:
    """Client-level epsilon of every client-level event in the history, at ``delta``.

    ``accountant="pld"`` (default) accounts a history holding Skellam or discrete Gaussian
    events with RDP (see ``accountant_used``).

    Raises:
        AccountingError: ``accountant="prv"`` with a Skellam or discrete Gaussian event, or an
            adaptive-clipping count that cannot be paired with its round's update noise.
        DPValueError: ``delta`` outside (0, 1) or an unknown accountant.
    """
    d, a = _check_common(delta, accountant)
    return _epsilon_groups(_groups(_client_events(_events_of(ledger_or_events))), d, a)


def accountant_used(ledger_or_events: Ledger | Iterable[Event], *, accountant: str = "pld", level: str = "client") -> str:
    """The accountant that ``epsilon`` (``level="client"``) or ``sample_level_epsilons`` really runs.

    ``"pld"`` becomes ``"rdp"`` for a client-level history holding Skellam or discrete
    Gaussian events; every other choice is itself.
    """
    a = chk.one_of("accountant", accountant, ACCOUNTANTS)
    lv = chk.one_of("level", level, ("client", "sample"))
    events = _events_of(ledger_or_events)
    if lv == "sample":
        return _used(_groups(e for e in events if e.level == "sample"), a)
    return _used(_groups(_client_events(events)), a)


def rdp_curve(ledger_or_events: Ledger | Iterable[Event], *, level: str = "client", client_id: str | None = None) -> np.ndarray:
    """The composed RDP at ``RDP_ORDERS`` of the client-level events, or of one client's sample-level ones.

    What the RDP accountant converts to (epsilon, delta); used to check that one history is
    dominated by another order by order (a private search's trials by its planned worst case).
    """
    lv = chk.one_of("level", level, ("client", "sample"))
    events = _events_of(ledger_or_events)
    if lv == "client":
        if client_id is not None:
            raise DPValueError(f"client_id applies to level='sample', got {client_id!r}")
        chosen = _client_events(events)
    else:
        if not isinstance(client_id, str):
            raise DPTypeError(f"client_id must be a str for level='sample', got {client_id!r}")
        chosen = _per_client(events).get(client_id, [])
    return _sum_curves(_groups(chosen))


def sample_level_epsilons(
    ledger_or_events: Ledger | Iterable[Event], *, delta: float, accountant: str = "pld"
) -> dict[str, float]:
    """Per-client sample-level epsilon: each client's DP-SGD runs composed over its rounds.

    Returns ``{client_id: epsilon}`` sorted by client id (clients without sample-level events
    are absent). Call again with another accountant for a cross-check.
    """
    d, a = _check_common(delta, accountant)
    per_client = _per_client(_events_of(ledger_or_events))
    return {cid: _epsilon_groups(_groups(per_client[cid]), d, a) for cid in sorted(per_client)}


def epsilon_by_accountant(ledger_or_events: Ledger | Iterable[Event], *, delta: float) -> dict[str, float | None]:
    """Client-level epsilon under every accountant (``None`` where one does not cover the history)."""
    d = chk.open_unit("delta", delta)
    groups = _groups(_client_events(_events_of(ledger_or_events)))
    out: dict[str, float | None] = {}
    for name in ACCOUNTANTS:
        if name in ("pld", "prv") and not _gaussian_only(groups):
            out[name] = None
            continue
        try:
            out[name] = _epsilon_groups(groups, d, name)
        except AccountingError:
            out[name] = None
    return out
