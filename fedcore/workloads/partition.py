"""Partitioners: which example (or user) goes to which client.

Every partitioner returns a list of index arrays (int64, ascending within each client), one per
client, that together cover each index exactly once. Random ones draw only from the
``numpy.random.Generator`` they are given, so a seed fixes the partition. Natural partitions
(:func:`by_column`) follow a column of the data, such as a shop's department or a user id, and
:func:`merge_groups` merges natural groups into a given number of silos by a stated rule.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "iid",
    "dirichlet_by_label",
    "by_column",
    "distinct_values",
    "merge_groups",
    "nested_silos",
    "nested_silo_members",
    "client_of",
]

_RULES = ("balanced", "contiguous")


def iid(n_items: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle ``range(n_items)`` and cut it into ``num_clients`` parts whose sizes differ by at most 1.

    Raises:
        ValueError: ``num_clients < 1`` or more clients than items.
        TypeError: ``rng`` is not a ``numpy.random.Generator``.
    """
    _check_rng(rng)
    n_items, num_clients = int(n_items), int(num_clients)
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients!r}")
    if n_items < num_clients:
        raise ValueError(
            f"num_clients must be <= n_items so no client is empty, got num_clients={num_clients} > n_items={n_items}"
        )
    perm = rng.permutation(n_items)
    return [np.sort(part).astype(np.int64) for part in np.array_split(perm, num_clients)]


def dirichlet_by_label(
    labels: Sequence[Any] | np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    *,
    min_size: int = 1,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Label-skewed split: each label's examples are spread over clients by Dirichlet(alpha) shares.

    Small ``alpha`` gives each client few labels (strongly non-IID); large ``alpha`` approaches IID.
    The draw is repeated (up to ``max_tries`` times) until every client holds ``min_size`` examples.
    (Hsu, Qi and Brown, "Measuring the effects of non-identical data distribution", 2019.)

    Raises:
        ValueError: ``alpha <= 0``, ``num_clients < 1``, ``min_size < 1``, more clients than
            ``len(labels) // min_size``, or no draw reaching ``min_size`` in ``max_tries`` tries.
    """
    _check_rng(rng)
    labels = np.asarray(labels)
    num_clients = int(num_clients)
    if not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients!r}")
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1, got {min_size!r}")
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries!r}")
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if num_clients * min_size > labels.size:
        raise ValueError(f"num_clients * min_size must be <= len(labels), got {num_clients} * {min_size} > {labels.size}")
    codes = pd.factorize(labels, sort=True, use_na_sentinel=False)[0]
    by_label = [np.flatnonzero(codes == c) for c in range(codes.max() + 1)]
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for members in by_label:
            members = rng.permutation(members)
            shares = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(shares)[:-1] * members.size).astype(np.int64)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
        clients = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(c.size for c in clients) >= min_size:
            return clients
    raise ValueError(
        f"no Dirichlet draw gave every client >= min_size={min_size} examples in {max_tries} tries "
        f"(alpha={alpha!r}, num_clients={num_clients}); raise alpha, or lower min_size or num_clients"
    )


def by_column(values: Sequence[Any] | np.ndarray | pd.Series) -> list[np.ndarray]:
    """One group per distinct value, in sorted order of the values; missing values form a last group.

    The keys of the groups, in the same order, are :func:`distinct_values` (``None`` for missing).

    Raises:
        ValueError: ``values`` is empty or not 1-D.
    """
    codes, _ = _factorize(values)
    known = int(codes.max()) + 1 if np.any(codes >= 0) else 0
    groups = [np.flatnonzero(codes == c).astype(np.int64) for c in range(known)]
    if np.any(codes < 0):
        groups.append(np.flatnonzero(codes < 0).astype(np.int64))
    return groups


def distinct_values(values: Sequence[Any] | np.ndarray | pd.Series) -> list[Any]:
    """The keys of :func:`by_column`'s groups, in its order (``None`` stands for missing values)."""
    return _factorize(values)[1]


def merge_groups(groups: Sequence[np.ndarray], num_silos: int, *, rule: str = "balanced") -> list[np.ndarray]:
    """Merge natural groups into ``num_silos`` silos; no group is split.

    Rules:
        ``"balanced"``: largest group first, each into the silo with the fewest indices so far
            (ties: the lower silo number; groups of equal size keep their given order).
        ``"contiguous"``: keep the given order of groups and cut it into ``num_silos`` runs whose
            sizes are closest to equal shares (for ordered groups, such as regions or periods).

    Raises:
        ValueError: an unknown rule, ``num_silos < 1``, fewer non-empty groups than silos, or an
            index in two groups.
    """
    if rule not in _RULES:
        raise ValueError(f"rule must be one of {_RULES}, got {rule!r}")
    num_silos = int(num_silos)
    groups = [np.asarray(g, dtype=np.int64).reshape(-1) for g in groups]
    if num_silos < 1:
        raise ValueError(f"num_silos must be >= 1, got {num_silos!r}")
    nonempty = [g for g in groups if g.size]
    if len(nonempty) < num_silos:
        raise ValueError(f"num_silos must be <= the number of non-empty groups, got {num_silos} > {len(nonempty)}")
    every = np.concatenate(nonempty)
    if np.unique(every).size != every.size:
        raise ValueError("groups must be disjoint, but an index appears in more than one group")
    sizes = np.array([g.size for g in nonempty])
    members: list[list[int]] = [[] for _ in range(num_silos)]
    if rule == "balanced":
        totals = np.zeros(num_silos, dtype=np.int64)
        for g in np.argsort(-sizes, kind="stable"):
            silo = int(np.argmin(totals))
            members[silo].append(int(g))
            totals[silo] += sizes[g]
    else:
        cum = np.concatenate([[0], np.cumsum(sizes)])
        start = 0
        for j in range(1, num_silos):
            target = cum[-1] * j / num_silos
            lo, hi = start + 1, len(nonempty) - (num_silos - j)
            cut = lo + int(np.argmin(np.abs(cum[lo : hi + 1] - target)))
            members[j - 1] = list(range(start, cut))
            start = cut
        members[-1] = list(range(start, len(nonempty)))
    return [np.sort(np.concatenate([nonempty[g] for g in m])) for m in members]


def nested_silos(groups: Sequence[np.ndarray], parents: Sequence[Any], num_silos: int) -> list[np.ndarray]:
    """Silos from a two-level grouping, such as product classes within departments.

    Rule: start with one silo per parent (in order of first appearance); while there are fewer
    than ``num_silos``, the largest silo holding two or more groups is split in two by the
    "balanced" rule of :func:`merge_groups`; while there are more, the two smallest silos merge.
    No group is split, and groups of one parent stay together unless the count requires otherwise.

    Returns:
        ``num_silos`` index arrays; :func:`nested_silo_members` gives the group numbers of each.

    Raises:
        ValueError: lengths differ, ``num_silos < 1``, overlapping groups, or fewer groups than silos.
    """
    return [
        np.sort(np.concatenate([np.asarray(groups[g], dtype=np.int64) for g in m]))
        for m in nested_silo_members(groups, parents, num_silos)
    ]


def nested_silo_members(groups: Sequence[np.ndarray], parents: Sequence[Any], num_silos: int) -> list[list[int]]:
    """The group numbers of each silo of :func:`nested_silos`, in the same order."""
    groups = [np.asarray(g, dtype=np.int64).reshape(-1) for g in groups]
    parents = list(parents)
    num_silos = int(num_silos)
    if len(parents) != len(groups):
        raise ValueError(f"parents must name one parent per group, got {len(parents)} parents for {len(groups)} groups")
    if num_silos < 1:
        raise ValueError(f"num_silos must be >= 1, got {num_silos!r}")
    every = np.concatenate(groups) if groups else np.zeros(0, dtype=np.int64)
    if np.unique(every).size != every.size:
        raise ValueError("groups must be disjoint, but an index appears in more than one group")
    live = [g for g in range(len(groups)) if groups[g].size]
    if len(live) < num_silos:
        raise ValueError(f"num_silos must be <= the number of non-empty groups, got {num_silos} > {len(live)}")
    size = lambda silo: sum(groups[g].size for g in silo)  # noqa: E731
    silos: list[list[int]] = []
    seen: dict[Any, int] = {}
    for g in live:
        key = parents[g]
        if key not in seen:
            seen[key] = len(silos)
            silos.append([])
        silos[seen[key]].append(g)
    while len(silos) < num_silos:
        splittable = [i for i, s in enumerate(silos) if len(s) >= 2]
        i = max(splittable, key=lambda j: (size(silos[j]), -j))
        halves = merge_groups([groups[g] for g in silos[i]], 2, rule="balanced")
        parts = [[g for g in silos[i] if np.isin(groups[g], h).all()] for h in halves]
        silos[i : i + 1] = parts
    while len(silos) > num_silos:
        order = sorted(range(len(silos)), key=lambda j: (size(silos[j]), j))
        a, b = sorted(order[:2])
        silos[a] = silos[a] + silos[b]
        del silos[b]
    return silos


def client_of(partition: Sequence[np.ndarray], n_items: int) -> np.ndarray:
    """Inverse of a partition: the client number of every index, ``-1`` where none holds it.

    Raises:
        ValueError: an index out of range or held by two clients.
    """
    owner = np.full(int(n_items), -1, dtype=np.int64)
    for client, part in enumerate(partition):
        part = np.asarray(part, dtype=np.int64)
        if part.size and (part.min() < 0 or part.max() >= n_items):
            raise ValueError(f"client {client} holds an index outside [0, {n_items})")
        if np.any(owner[part] >= 0) or np.unique(part).size != part.size:
            raise ValueError(f"client {client} holds an index that another client (or itself) holds already")
        owner[part] = client
    return owner


def _factorize(values: Sequence[Any] | np.ndarray | pd.Series) -> tuple[np.ndarray, list[Any]]:
    series = pd.Series(values) if not isinstance(values, pd.Series) else values.reset_index(drop=True)
    if series.size == 0:
        raise ValueError("values must not be empty")
    if isinstance(values, np.ndarray) and values.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {values.shape}")
    codes, uniques = pd.factorize(series, sort=True, use_na_sentinel=True)
    keys = [u.item() if hasattr(u, "item") else u for u in uniques]
    if np.any(codes < 0):
        keys.append(None)
    return np.asarray(codes), keys


def _check_rng(rng: object) -> None:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
