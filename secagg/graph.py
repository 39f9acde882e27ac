"""Neighbour graphs (complete = SecAgg, random Harary = SecAgg+) and the parameter planner.

Graph. Participants are indexed 0..n-1 in sorted-id order. SecAgg+ (Bell et al., CCS 2020,
Sec. 3-4) uses a Harary graph H(k, n) (each node joined to the k/2 nearest on each side of
a ring) whose ring order is a uniformly random permutation drawn from a 256-bit seed by
AES-CTR: a random k-regular graph that every client recomputes from the seed. With
``degree >= n - 1`` the graph is complete (the original SecAgg, Bonawitz et al. CCS 2017).

Each client secret-shares to its *holders*: its k neighbours and itself (k + 1 shares), of
which ``threshold`` (t) reconstruct.

Planner. :func:`plan_secagg_plus` picks the smallest even k (and the largest t for it)
such that, for ``n`` clients, independent dropouts at ``dropout_rate`` and a server
colluding with ``corrupted_fraction * n`` clients:

* completion: the union bound over clients of "fewer than t of its holders answer the
  unmask request" is at most ``2^-completion_bits``;
* privacy of single inputs: the union bound of "some honest client has t or more corrupted
  neighbours" is at most ``2^-security_bits`` (hypergeometric tail);
* privacy of partial sums: the union bound of "the honest survivors split into groups the
  server could unmask separately" is at most ``2^-security_bits``. In a ring-ordered
  Harary graph the surviving honest nodes stay connected unless two runs of k/2
  consecutive ring nodes are all dropped or corrupted; with removal probability
  ``p <= dropout_rate + corrupted_fraction`` this is at most ``(n (1-p) p^(k/2))^2 / 2``;
* unsigned (honest-but-curious server): t is a majority of the k + 1 holders;
* against an active server (``active_server=True``, signed rounds with the consistency
  check): ``2t > k + 2 + C`` (``2t > n + 1 + C`` for the complete graph), with
  C = floor(corrupted_fraction * n) counted as if every colluding client were one client's
  holder, so the condition holds for every graph, including one the server steered by
  withholding advertisements. Why it suffices: each honest client signs one survivor set,
  answers only under the set it signed after checking t signatures over it from its own
  holders, and reveals a dropped neighbour h's key only after t signatures over it from h's
  holders. Revealing both secrets of a client, or a neighbour a's key beside an honest answer
  a gave under a set with a alive, would need two disjoint groups of t honest-or-colluding
  signers among one client's k + 1 holders, which ``2t > k + 1 + C`` rules out. So every
  honest holder of v's seed that answers is one v did not mask with, or v itself; a client
  masks only when t of its holders (itself included) shared with it, so there are at most
  ``k + 2 - t`` of them, fewer than the ``t - C`` honest shares needed.

If no sparse degree below n - 1 meets them, the complete graph is returned with the largest
threshold that meets the completion target among the secure ones (a majority of clients,
above the corrupted ones, and ``2t > n + 1 + corrupted`` against an active server), or, when
none does (small n, high dropout rates), with the smallest secure threshold; its guarantee
text then says the target is not met.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import numpy as np

from . import _primitives as prim
from .base import Stage

__all__ = [
    "SecAggPlan",
    "LocalGraph",
    "derive_graph_seed",
    "plan_complete",
    "plan_secagg_plus",
    "neighbours",
    "neighbours_of",
    "round_completes",
    "simulate_completion",
]

_MAX_SPARSE_DEGREE = 1024


@dataclass(frozen=True)
class SecAggPlan:
    """Graph degree and threshold for one round, and what they guarantee.

    Attributes:
        graph: ``"complete"`` or ``"secagg+"``.
        n: participants in the round.
        degree: neighbours per client (``n - 1`` for the complete graph).
        threshold: shares needed to reconstruct a secret (of ``degree + 1`` holders).
        dropout_rate: dropout probability (or, for the complete graph, the tolerated
            fraction) the plan was made for.
        corrupted_fraction: fraction of clients assumed to collude with the server.
        tolerated_dropouts: any this many dropouts, wherever they fall, never stop a round.
        completion_probability: lower bound on completing under independent dropouts at
            ``dropout_rate`` (exact for the complete graph, a union bound otherwise).
        privacy_failure_bound: upper bound on the probability that the server learns more
            than the sum of all honest survivors (0.0 when impossible by counting).
        active_secure: the active-server condition ``2t > k + 2 + corrupted`` holds, for
            every graph (see the module docstring).
        guarantee: the above in plain words.
    """

    graph: str
    n: int
    degree: int
    threshold: int
    dropout_rate: float
    corrupted_fraction: float
    tolerated_dropouts: int
    completion_probability: float
    privacy_failure_bound: float
    active_secure: bool
    guarantee: str

    @property
    def holders(self) -> int:
        """Shares made of each secret: the neighbours plus the client itself."""
        return self.degree + 1

    def as_dict(self) -> dict[str, object]:
        """The plan as JSON data for reports (graph, n, degree, threshold, failure bounds)."""
        return {
            "graph": self.graph,
            "n": self.n,
            "degree": self.degree,
            "threshold": self.threshold,
            "dropout_rate": self.dropout_rate,
            "corrupted_fraction": self.corrupted_fraction,
            "tolerated_dropouts": self.tolerated_dropouts,
            "completion_probability": self.completion_probability,
            "privacy_failure_bound": self.privacy_failure_bound,
            "active_secure": self.active_secure,
            "guarantee": self.guarantee,
        }


# ------------------------------------------------------------------------- tail bounds


def _log_binom_pmf(k: int, p: float) -> list[float]:
    if p <= 0.0:
        return [0.0 if i == 0 else -math.inf for i in range(k + 1)]
    if p >= 1.0:
        return [0.0 if i == k else -math.inf for i in range(k + 1)]
    lp, lq = math.log(p), math.log1p(-p)
    return [math.lgamma(k + 1) - math.lgamma(i + 1) - math.lgamma(k - i + 1) + i * lp + (k - i) * lq for i in range(k + 1)]


def _cdf_below(logpmf: Sequence[float]) -> list[float]:
    """``out[t] = P[X < t]`` for t = 0..len(logpmf)."""
    out = [0.0]
    for lv in logpmf:
        out.append(min(1.0, out[-1] + (math.exp(lv) if lv > -745 else 0.0)))
    return out


def _hyper_tail_at_least(pop: int, marked: int, draws: int) -> list[float]:
    """``out[t] = P[X >= t]`` for X ~ Hypergeometric(pop, marked, draws), t = 0..draws+1."""
    if marked <= 0:
        return [1.0] + [0.0] * (draws + 1)
    lc = lambda a, b: math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)  # noqa: E731
    total = lc(pop, draws)
    pmf = [0.0] * (draws + 1)
    for i in range(max(0, draws - (pop - marked)), min(marked, draws) + 1):
        pmf[i] = math.exp(lc(marked, i) + lc(pop - marked, draws - i) - total)
    tail = [0.0] * (draws + 2)
    for t in range(draws, -1, -1):
        tail[t] = min(1.0, tail[t + 1] + pmf[t])
    return tail


def _completion_fail(n: int, k: int, t: int, rate: float, cdf: Sequence[float]) -> float:
    """Union bound: some client has fewer than t of its k + 1 holders answering."""
    alive_self = cdf[max(0, min(t - 1, k + 1))]
    dropped_self = cdf[max(0, min(t, k + 1))]
    return min(1.0, n * ((1.0 - rate) * alive_self + rate * dropped_self))


def _split_bound(n: int, k: int, removal: float) -> float:
    if k >= n - 1:
        return 0.0
    p = min(1.0, removal)
    if p <= 0.0:
        return 0.0
    mu = n * (1.0 - p) * p ** (k // 2)
    return min(1.0, mu * mu / 2.0)


def _check_fraction(name: str, value: object, *, upper_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not (0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return value


def _check_n(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    return n


def _check_bits(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256:
        raise ValueError(f"{name} must be an int in [1, 256], got {value!r}")
    return value


def _fmt(p: float) -> str:
    if p <= 0.0:
        return "0"
    if p < 1e-3:
        return f"2^{math.log2(p):.1f}"
    return f"{p:.4g}"


# ------------------------------------------------------------------------- complete graph


def plan_complete(
    *,
    n: int,
    dropout_rate: float = 0.25,
    corrupted_fraction: float = 0.0,
    threshold: int | None = None,
    active_server: bool = False,
) -> SecAggPlan:
    """Plan the complete graph (SecAgg): every client shares to all n.

    Without ``threshold``, t = n - floor(dropout_rate * n): any floor(dropout_rate * n)
    clients may drop at any stage (the worst case), and t is as large as that allows, so
    the server learns only sums over at least t clients. A planned t must be a majority of
    the n clients and exceed the corrupted ones (with ``active_server``, also
    ``2t > n + 1 + corrupted``); an explicit ``threshold`` is taken as given.

    Raises:
        ValueError: bad n, rates or threshold (t outside [1, n]); or a planned t below the
            secure floor above.
    """
    n = _check_n(n)
    rate = _check_fraction("dropout_rate", dropout_rate)
    gamma = _check_fraction("corrupted_fraction", corrupted_fraction)
    corrupted = math.floor(gamma * n)
    if threshold is None:
        t = n - math.floor(rate * n)
        lowest = _secure_floor(n, corrupted, active_server)
        if t < lowest:
            raise ValueError(
                f"no threshold fits n={n}: tolerating floor({rate} * {n}) = {n - t} dropouts needs t <= {t}, but a "
                f"planned threshold must be a majority of clients and exceed the {corrupted} corrupted ones"
                f"{' (and 2t > n + 1 + corrupted against an active server)' if active_server else ''}: t >= {lowest}; "
                f"lower dropout_rate or corrupted_fraction, or pass an explicit threshold"
            )
    else:
        t = _check_threshold(threshold, n - 1)
    return _describe_complete(n, t, rate, gamma, corrupted, active_server)


def _mode_text(active_server: bool, active: bool, condition: str) -> str:
    if not active_server:
        return (
            "Unsigned mode: honest-but-curious server (it follows the protocol and reports dropouts truly); "
            f"against an active server nothing is claimed ({condition} would "
            f"{'hold' if active else 'not hold'} with signed keys and the consistency check)."
        )
    return (
        f"Signed mode, against an active server that lies about dropouts and survivors: "
        f"{'safe' if active else 'NOT safe'}, since {condition}."
    )


def _secure_floor(n: int, corrupted: int, active_server: bool) -> int:
    """Smallest threshold the planner gives the complete graph: a majority, above the corrupted clients."""
    lowest = max(n // 2 + 1, corrupted + 1)
    if active_server:
        lowest = max(lowest, (n + 1 + corrupted) // 2 + 1)
    if lowest > n:
        raise ValueError(
            f"no threshold of at most n={n} exceeds the {corrupted} corrupted clients"
            f"{' with 2t > n + 1 + corrupted (active server)' if active_server else ''}; lower corrupted_fraction"
        )
    return lowest


def _check_threshold(threshold: object, degree: int) -> int:
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise TypeError(f"threshold must be an int, got {type(threshold).__name__}")
    if not 1 <= threshold <= degree + 1:
        raise ValueError(f"threshold must be in [1, {degree + 1}] (the {degree + 1} holders of each secret), got {threshold}")
    return threshold


def _active_secure(k: int, t: int, corrupted: int) -> bool:
    """The active-server condition of signed rounds (module docstring): 2t > k + 2 + corrupted."""
    return 2 * t > k + 2 + corrupted


def _describe_complete(n: int, t: int, rate: float, gamma: float, corrupted: int, active_server: bool = False) -> SecAggPlan:
    k = n - 1
    survive = _log_binom_pmf(n, 1.0 - rate)
    completion = 1.0 - _cdf_below(survive)[t]
    active = _active_secure(k, t, corrupted)
    privacy = 0.0 if t > corrupted else 1.0
    text = (
        f"complete graph over n={n} clients, threshold t={t}: any {n - t} clients may drop at any "
        f"stage and the round still completes; with independent dropouts at rate {rate:g} it completes "
        f"with probability {completion:.6g}. The server learns only the sum of the inputs that reached it, "
        f"never a sum over fewer than {t} clients"
    )
    if corrupted:
        text += f" ({t - corrupted} or more honest ones when {corrupted} colluding clients are subtracted)"
    text += (
        f"; {'no' if t > corrupted else 'SOME'} coalition of the server and {corrupted} clients can rebuild a "
        f"client's secrets (needs {t} shares). "
    )
    text += _mode_text(active_server, active, f"2t={2 * t} {'>' if active else '<='} n + 1 + corrupted = {n + 1 + corrupted}")
    return SecAggPlan(
        graph="complete",
        n=n,
        degree=k,
        threshold=t,
        dropout_rate=rate,
        corrupted_fraction=gamma,
        tolerated_dropouts=n - t,
        completion_probability=completion,
        privacy_failure_bound=privacy,
        active_secure=active,
        guarantee=text,
    )


# ------------------------------------------------------------------------- SecAgg+


def plan_secagg_plus(
    *,
    n: int,
    dropout_rate: float,
    corrupted_fraction: float = 0.0,
    security_bits: int = 40,
    completion_bits: int = 20,
    degree: int | None = None,
    threshold: int | None = None,
    active_server: bool = False,
) -> SecAggPlan:
    """Pick degree k = O(log n) and threshold t for SecAgg+ (see the module docstring).

    ``degree`` or ``threshold`` pin that parameter; the other is planned. A pinned pair is
    evaluated and returned as given (its guarantee text says what it does not meet).

    Raises:
        ValueError: bad n, rates, bit counts, an odd degree below n - 1, or a threshold
            outside [1, k + 1]; or (when planning) a complete-graph fallback that cannot
            be made secure (see :func:`plan_complete`).
    """
    n = _check_n(n)
    rate = _check_fraction("dropout_rate", dropout_rate)
    gamma = _check_fraction("corrupted_fraction", corrupted_fraction)
    sec = _check_bits("security_bits", security_bits)
    comp = _check_bits("completion_bits", completion_bits)
    corrupted = math.floor(gamma * n)
    eps_s, eps_c = 2.0**-sec, 2.0**-comp

    if degree is not None:
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 0:
            raise ValueError(f"degree must be an int >= 0, got {degree!r}")
        if degree >= n - 1:
            if threshold is None:
                return _fallback(n, rate, gamma, active_server, None, completion_bits=comp, note="")
            return plan_complete(
                n=n, dropout_rate=rate, corrupted_fraction=gamma, threshold=threshold, active_server=active_server
            )
        if degree % 2:
            raise ValueError(f"degree must be even below n - 1 (Harary graph), got {degree} for n={n}")
        candidates = [degree]
    else:
        candidates = list(range(2, min(n - 2, _MAX_SPARSE_DEGREE) + 1, 2))

    for k in candidates:
        split = _split_bound(n, k, rate + gamma)
        cdf = _cdf_below(_log_binom_pmf(k, 1.0 - rate))
        tail = _hyper_tail_at_least(n - 1, corrupted, k)

        def completes(t: int, k: int = k, cdf=cdf) -> bool:  # bound per candidate degree
            return _completion_fail(n, k, t, rate, cdf) <= eps_c

        def secure(t: int, k: int = k, tail=tail, split: float = split) -> bool:
            if n * tail[min(t, k + 1)] > eps_s or split > eps_s or 2 * t <= k + 1:
                return False
            return not active_server or _active_secure(k, t, corrupted)

        if threshold is not None:
            t = _check_threshold(threshold, k)
            if degree is not None or (completes(t) and secure(t)):
                return _describe_sparse(n, k, t, rate, gamma, corrupted, sec, comp, active_server)
            continue
        feasible = [t for t in range(1, k + 2) if completes(t) and secure(t)]
        if feasible:
            return _describe_sparse(n, k, max(feasible), rate, gamma, corrupted, sec, comp, active_server)
        if degree is not None:  # pinned degree: best completion, the text says what fails
            finishing = [t for t in range(1, k + 2) if completes(t)]
            t = max(finishing) if finishing else k // 2 + 1
            return _describe_sparse(n, k, t, rate, gamma, corrupted, sec, comp, active_server)
    return _fallback(n, rate, gamma, active_server, threshold, completion_bits=comp)


def _fallback(
    n: int,
    rate: float,
    gamma: float,
    active_server: bool,
    threshold: int | None,
    *,
    completion_bits: int = 20,
    note: str | None = None,
) -> SecAggPlan:
    """Complete graph for SecAgg+ requests: keep the completion target if some t meets it."""
    if threshold is None:
        corrupted = math.floor(gamma * n)
        lowest = _secure_floor(n, corrupted, active_server)
        fail_below = _cdf_below(_log_binom_pmf(n, 1.0 - rate))  # P[fewer than t never drop]
        good = [t for t in range(lowest, n + 1) if fail_below[t] <= 2.0**-completion_bits]
        if good:
            t = max(good)
            reason = f"the largest t whose completion probability meets the target 1 - 2^-{completion_bits}"
        else:
            t = lowest
            reason = (
                f"the smallest secure t (a majority of clients, above the corrupted ones); the completion "
                f"target 1 - 2^-{completion_bits} is NOT met at this n"
            )
        plan = plan_complete(n=n, dropout_rate=rate, corrupted_fraction=gamma, threshold=t, active_server=active_server)
    else:
        plan = plan_complete(n=n, dropout_rate=rate, corrupted_fraction=gamma, threshold=threshold, active_server=active_server)
        reason = "the given threshold"
    if note is None:
        note = (
            f" (SecAgg+ fallback: no sparse degree below n - 1 = {n - 1} meets the targets at n={n}, "
            f"so the complete graph is used with {reason}.)"
        )
    return replace(plan, guarantee=plan.guarantee + note)


def _describe_sparse(
    n: int, k: int, t: int, rate: float, gamma: float, corrupted: int, sec: int, comp: int, active_server: bool
) -> SecAggPlan:
    cdf = _cdf_below(_log_binom_pmf(k, 1.0 - rate))
    tail = _hyper_tail_at_least(n - 1, corrupted, k)
    fail = _completion_fail(n, k, t, rate, cdf)
    single = min(1.0, n * tail[min(t, k + 1)])
    split = _split_bound(n, k, rate + gamma)
    privacy = min(1.0, single + split)
    active = _active_secure(k, t, corrupted)
    text = (
        f"SecAgg+ random {k}-regular Harary graph over n={n} clients, threshold t={t} of {k + 1} holders: "
        f"any {k + 1 - t} dropouts are tolerated wherever they fall; with independent dropouts at rate "
        f"{rate:g} the round completes with probability >= 1 - {_fmt(fail)} (union bound, target "
        f"2^-{comp}). With the server colluding with {corrupted} clients "
        f"(corrupted_fraction={gamma:g}), the probability that it rebuilds some honest client's secrets is "
        f"<= {_fmt(single)} and that the honest survivors split into separately unmaskable groups is "
        f"<= {_fmt(split)} (target 2^-{sec}); otherwise it learns only the sum of all honest survivors"
        f"{'' if 2 * t > k + 1 else ' (t is NOT a majority of the holders)'}. "
    )
    text += _mode_text(active_server, active, f"2t={2 * t} {'>' if active else '<='} k + 2 + corrupted = {k + 2 + corrupted}")
    return SecAggPlan(
        graph="secagg+",
        n=n,
        degree=k,
        threshold=t,
        dropout_rate=rate,
        corrupted_fraction=gamma,
        tolerated_dropouts=k + 1 - t,
        completion_probability=max(0.0, 1.0 - fail),
        privacy_failure_bound=privacy,
        active_secure=active,
        guarantee=text,
    )


# ------------------------------------------------------------------------- graph


def derive_graph_seed(*, round_index: int, setup_digest: bytes, roster: Sequence[tuple[str, bytes]]) -> bytes:
    """The SecAgg+ graph seed: a hash of the round, its set-up and every advertisement's digest.

    Fixed only once every key is in, so the server cannot draw or grind it before the
    clients' fresh keys exist; what is left to it is withholding advertisements, which the
    active-server condition of the planner does not depend on (it holds for every graph).
    """
    parts: list[bytes | str | int] = [round_index, setup_digest]
    for sender, ad_digest in roster:
        parts += [sender, ad_digest]
    return prim.digest(prim.LABEL_GRAPH_SEED, *parts)


def _permutation(n: int, seed: bytes) -> list[int]:
    """Uniform permutation of range(n) by Fisher-Yates over AES-CTR output (rejection sampling)."""
    stream = prim.keystream(prim.hkdf(seed, prim.LABEL_GRAPH, n), 16 * max(1, n) + 64)
    words = np.frombuffer(stream[: len(stream) // 8 * 8], dtype="<u8")
    pos, perm = 0, list(range(n))
    for i in range(n - 1, 0, -1):
        bound = i + 1
        limit = (1 << 64) - ((1 << 64) % bound)
        while True:
            if pos >= words.size:  # astronomically rare: extend deterministically
                words = np.frombuffer(prim.keystream(prim.hkdf(seed, prim.LABEL_GRAPH, n, pos), 8 * n + 64), "<u8")
                pos = 0
            w = int(words[pos])
            pos += 1
            if w < limit:
                break
        j = w % bound
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def neighbours(n: int, *, degree: int, seed: bytes) -> tuple[tuple[int, ...], ...]:
    """Neighbour indices of each of n nodes (sorted), excluding the node itself.

    ``degree >= n - 1`` gives the complete graph (the seed is unused); otherwise ``degree``
    must be even and the graph is the Harary graph H(degree, n) on a ring order drawn from
    ``seed`` (32 bytes).

    Raises:
        ValueError: n < 1, negative or odd sparse degree, or a seed that is not 32 bytes.
    """
    n = _check_n(n)
    _check_degree_and_seed(n, degree, seed)
    if degree >= n - 1:
        return tuple(tuple(j for j in range(n) if j != i) for i in range(n))
    ring = _permutation(n, bytes(seed))  # ring[position] = node
    position = [0] * n
    for p, node in enumerate(ring):
        position[node] = p
    half = degree // 2
    return tuple(tuple(sorted(ring[(position[node] + s) % n] for s in range(-half, half + 1) if s)) for node in range(n))


def neighbours_of(n: int, *, degree: int, seed: bytes, node: int) -> tuple[int, ...]:
    """Neighbour indices of one node, equal to ``neighbours(n, degree=, seed=)[node]``.

    Raises:
        ValueError: as :func:`neighbours`, or a node outside [0, n).
    """
    n = _check_n(n)
    if isinstance(node, bool) or not isinstance(node, int) or not 0 <= node < n:
        raise ValueError(f"node must be an int in [0, {n}), got {node!r}")
    _check_degree_and_seed(n, degree, seed)
    if degree >= n - 1:
        return tuple(j for j in range(n) if j != node)
    ring = _permutation(n, bytes(seed))
    p = ring.index(node)
    half = degree // 2
    return tuple(sorted(ring[(p + s) % n] for s in range(-half, half + 1) if s))


class LocalGraph:
    """One client's view of the graph: its neighbours and its neighbours' neighbours.

    That is all a client needs to check whose signatures count (its own holders, and the
    holders of a dropped neighbour whose key it is asked for); built from one permutation.
    """

    def __init__(self, n: int, *, degree: int, seed: bytes, node: int) -> None:
        n = _check_n(n)
        if isinstance(node, bool) or not isinstance(node, int) or not 0 <= node < n:
            raise ValueError(f"node must be an int in [0, {n}), got {node!r}")
        _check_degree_and_seed(n, degree, seed)
        self.n, self.node = n, node
        self._complete = degree >= n - 1
        self._half = degree // 2
        self._cache: dict[int, frozenset[int]] = {}
        if self._complete:
            self.neighbours = tuple(j for j in range(n) if j != node)
            return
        ring = _permutation(n, bytes(seed))
        p, h = ring.index(node), self._half
        self._slice = [ring[(p + s) % n] for s in range(-2 * h, 2 * h + 1)]  # ring positions p-2h .. p+2h
        self._at = {self._slice[i]: i for i in range(h, 3 * h + 1)}  # the node and its neighbours
        self.neighbours = tuple(sorted(self.of(node)))

    def of(self, j: int) -> frozenset[int]:
        """Neighbours of ``j``, which must be this node or one of its neighbours.

        Raises:
            ValueError: ``j`` is further away.
        """
        if self._complete:
            if not 0 <= j < self.n:
                raise ValueError(f"node {j} is not in a graph of {self.n}")
            return frozenset(range(self.n)) - {j}
        if j not in self._cache:
            if j not in self._at:
                raise ValueError(f"node {j} is not node {self.node} or one of its neighbours")
            i, h = self._at[j], self._half
            self._cache[j] = frozenset(self._slice[i - h : i + h + 1]) - {j}
        return self._cache[j]


def _check_degree_and_seed(n: int, degree: object, seed: object) -> None:
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 0:
        raise ValueError(f"degree must be an int >= 0, got {degree!r}")
    if degree >= n - 1:
        return
    if degree % 2:
        raise ValueError(f"degree must be even below n - 1 (Harary graph), got {degree} for n={n}")
    if not isinstance(seed, (bytes, bytearray)) or len(seed) != prim.KEY_BYTES:
        raise ValueError(f"graph seed must be {prim.KEY_BYTES} bytes, got {seed!r:.20}")


# ------------------------------------------------------------------------- completion


def round_completes(
    nbrs: Sequence[Sequence[int]],
    *,
    threshold: int,
    silent_from: Mapping[int, Stage | int],
    signed: bool = False,
) -> bool:
    """Whether a round completes, by the exact rules the server and clients enforce.

    ``silent_from[i]`` is the stage from which node i sends nothing (absent: never). Rules:
    a node whose holders that advertised keys (itself included) number fewer than t leaves
    at SHARE_KEYS, and one whose holders that shared number fewer than t leaves at
    MASKED_INPUT; the server needs at least t clients after each stage. A node answers (and,
    in signed rounds, signs the survivor set) only if t of its holders sent their masked
    input, and in signed rounds answers only if t of its holders signed the set. Every
    node that shared needs t answering holders, for its self-mask seed if it sent its masked
    input, or for its mask key if a surviving neighbour masked with it.
    """
    n = len(nbrs)
    t = threshold
    stage = [int(silent_from.get(i, len(Stage))) for i in range(n)]

    def holders(flags: Sequence[bool], i: int) -> int:
        return 1 + sum(flags[j] for j in nbrs[i])

    u1 = [s > Stage.ADVERTISE_KEYS for s in stage]
    u2 = [u1[i] and stage[i] > Stage.SHARE_KEYS and holders(u1, i) >= t for i in range(n)]
    u3 = [u2[i] and stage[i] > Stage.MASKED_INPUT and holders(u2, i) >= t for i in range(n)]
    stages = [u1, u2, u3]
    if signed:
        signers = [u3[i] and stage[i] > Stage.CONSISTENCY_CHECK and holders(u3, i) >= t for i in range(n)]
        answer = [signers[i] and stage[i] > Stage.UNMASK and holders(signers, i) >= t for i in range(n)]
        stages.append(signers)
    else:
        answer = [u3[i] and stage[i] > Stage.UNMASK and holders(u3, i) >= t for i in range(n)]
    if min(sum(u) for u in stages) < t:
        return False
    for v in range(n):
        if u2[v] and (u3[v] or any(u3[j] for j in nbrs[v])) and answer[v] + sum(answer[j] for j in nbrs[v]) < t:
            return False
    return True


def simulate_completion(
    plan: SecAggPlan,
    *,
    dropout_rate: float,
    trials: int,
    rng: np.random.Generator,
    batch: int = 2000,
    signed: bool = False,
) -> float:
    """Monte-Carlo completion rate of ``plan`` under independent dropouts.

    Each client drops with probability ``dropout_rate``, at a stage drawn uniformly from
    the five; the rules are those of :func:`round_completes`, vectorised over trials. The
    Harary ring order does not matter here (independent dropouts are exchangeable), so the
    unpermuted graph is used.
    """
    rate = _check_fraction("dropout_rate", dropout_rate)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    n, k, t = plan.n, plan.degree, plan.threshold
    if k >= n - 1:
        nb = np.array([[j for j in range(n) if j != i] for i in range(n)], dtype=np.int64).reshape(n, max(0, n - 1))
    else:
        half = k // 2
        offs = np.array([s for s in range(-half, half + 1) if s])
        nb = (np.arange(n)[:, None] + offs[None, :]) % n
    done, ok = 0, 0
    while done < trials:
        m = min(batch, trials - done)
        drop = rng.random((m, n)) < rate
        stage = np.where(drop, rng.integers(0, len(Stage), (m, n)), len(Stage))
        u1 = stage > Stage.ADVERTISE_KEYS
        u2 = u1 & (stage > Stage.SHARE_KEYS) & (1 + u1[:, nb].sum(axis=2) >= t)
        u3 = u2 & (stage > Stage.MASKED_INPUT) & (1 + u2[:, nb].sum(axis=2) >= t)
        good = (u1.sum(1) >= t) & (u2.sum(1) >= t) & (u3.sum(1) >= t)
        live3 = 1 + u3[:, nb].sum(axis=2) >= t
        if signed:
            signers = u3 & (stage > Stage.CONSISTENCY_CHECK) & live3
            answer = signers & (stage > Stage.UNMASK) & (1 + signers[:, nb].sum(axis=2) >= t)
            good &= signers.sum(1) >= t
        else:
            answer = u3 & (stage > Stage.UNMASK) & live3
        answering = answer + answer[:, nb].sum(axis=2)
        needed = u2 & (u3 | u3[:, nb].any(axis=2))
        good &= ~(needed & (answering < t)).any(axis=1)
        ok += int(good.sum())
        done += m
    return ok / trials
