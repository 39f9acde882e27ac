"""Partitioners: coverage, determinism under a generator, natural groups, merge rules, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.workloads.partition import (
    by_column,
    client_of,
    dirichlet_by_label,
    distinct_values,
    iid,
    merge_groups,
    nested_silo_members,
    nested_silos,
)


def _is_partition(parts, n):
    every = np.concatenate(parts)
    return every.size == n and np.array_equal(np.sort(every), np.arange(n)) and all(np.all(np.diff(p) > 0) for p in parts)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(1, 40), seed=st.integers(0, 2**32))
def test_iid_covers_once_with_near_equal_sizes(n, k, seed):
    if k > n:
        with pytest.raises(ValueError, match=f"num_clients={k} > n_items={n}"):
            iid(n, k, np.random.default_rng(seed))
        return
    parts = iid(n, k, np.random.default_rng(seed))
    assert len(parts) == k and _is_partition(parts, n)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1
    again = iid(n, k, np.random.default_rng(seed))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_iid_bad_input():
    with pytest.raises(ValueError, match="num_clients must be >= 1, got 0"):
        iid(10, 0, np.random.default_rng(0))
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator, got int"):
        iid(10, 2, 0)


@settings(max_examples=30, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=20, max_size=200),
    k=st.integers(1, 6),
    alpha=st.floats(0.05, 100.0),
    seed=st.integers(0, 2**32),
)
def test_dirichlet_covers_once_and_respects_min_size(labels, k, alpha, seed):
    try:
        parts = dirichlet_by_label(labels, k, alpha, np.random.default_rng(seed), min_size=2)
    except ValueError as exc:  # allowed only when no draw reaches min_size
        assert "no Dirichlet draw gave every client >= min_size=2" in str(exc)
        return
    assert len(parts) == k and _is_partition(parts, len(labels))
    assert min(p.size for p in parts) >= 2
    again = dirichlet_by_label(labels, k, alpha, np.random.default_rng(seed), min_size=2)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_dirichlet_small_alpha_is_label_skewed_large_alpha_is_not():
    labels = np.repeat(np.arange(4), 500)

    def skew(alpha):
        parts = dirichlet_by_label(labels, 4, alpha, np.random.default_rng(1))
        shares = [np.bincount(labels[p], minlength=4) / p.size for p in parts]
        return float(np.mean([s.max() for s in shares]))

    assert skew(0.05) > 0.6
    assert skew(1000.0) < 0.3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(alpha=0.0), "alpha must be a finite number > 0, got 0.0"),
        (dict(alpha=float("nan")), "alpha must be a finite number > 0, got nan"),
        (dict(num_clients=0), "num_clients must be >= 1, got 0"),
        (dict(min_size=0), "min_size must be >= 1, got 0"),
        (dict(num_clients=11), r"num_clients \* min_size must be <= len\(labels\), got 11 \* 1 > 10"),
    ],
)
def test_dirichlet_bad_input(kwargs, message):
    args = dict(labels=[0, 1] * 5, num_clients=2, alpha=1.0, rng=np.random.default_rng(0)) | kwargs
    with pytest.raises(ValueError, match=message):
        dirichlet_by_label(**args)


def test_dirichlet_gives_up_with_a_clear_error():
    with pytest.raises(ValueError, match="in 3 tries"):
        dirichlet_by_label([0] * 10, 5, 0.01, np.random.default_rng(0), min_size=2, max_tries=3)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.none(), st.sampled_from(["a", "b", "c", "d"])), min_size=1, max_size=60))
def test_by_column_one_group_per_value_in_sorted_order(values):
    groups = by_column(values)
    keys = distinct_values(values)
    assert len(groups) == len(keys) and _is_partition(groups, len(values))
    present = sorted({v for v in values if v is not None})
    assert keys == present + ([None] if None in values else [])
    for key, group in zip(keys, groups):
        assert all(values[i] == key for i in group)


def test_by_column_empty_is_refused():
    with pytest.raises(ValueError, match="values must not be empty"):
        by_column([])


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 50), min_size=1, max_size=15),
    k=st.integers(1, 15),
    rule=st.sampled_from(["balanced", "contiguous"]),
)
def test_merge_groups_never_splits_a_group(sizes, k, rule):
    bounds = np.cumsum([0, *sizes])
    groups = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(sizes))]
    if k > len(groups):
        with pytest.raises(ValueError, match=f"got {k} > {len(groups)}"):
            merge_groups(groups, k, rule=rule)
        return
    silos = merge_groups(groups, k, rule=rule)
    assert len(silos) == k and _is_partition(silos, int(bounds[-1]))
    owner = client_of(silos, int(bounds[-1]))
    for g in groups:
        assert np.unique(owner[g]).size == 1
    if rule == "contiguous":  # silos hold runs of consecutive groups, in order
        firsts = [owner[g[0]] for g in groups]
        assert firsts == sorted(firsts)
    else:  # greedy balancing: no silo exceeds the smallest by more than the largest group
        totals = [s.size for s in silos]
        assert max(totals) - min(totals) <= max(sizes)


def test_merge_groups_known_answers():
    g = [np.arange(0, 5), np.arange(5, 14), np.arange(14, 17), np.arange(17, 24), np.arange(24, 25)]
    balanced = merge_groups(g, 2)
    assert [s.size for s in balanced] == [13, 12]  # 9 | 7, then 5 -> second, 3 -> first, 1 -> second
    contiguous = merge_groups(g, 3, rule="contiguous")
    assert [s.size for s in contiguous] == [5, 12, 8]  # cuts at cumulative 5 and 17, nearest to 25/3 and 50/3


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        (([np.arange(3)], 1), dict(rule="random"), ValueError, "rule must be one of"),
        (([np.arange(3)], 0), {}, ValueError, "num_silos must be >= 1, got 0"),
        (([np.arange(3), np.arange(2, 4)], 2), {}, ValueError, "groups must be disjoint"),
    ],
)
def test_merge_groups_bad_input(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        merge_groups(*args, **kwargs)


def test_nested_silos_split_the_largest_parent_by_class():
    # Parent "T" has classes of sizes 10, 6, 4, 3; "D" one class of 12; "B" classes 5 and 4.
    sizes = [10, 6, 4, 3, 12, 5, 4]
    parents = ["T", "T", "T", "T", "D", "B", "B"]
    bounds = np.cumsum([0, *sizes])
    groups = [np.arange(bounds[i], bounds[i + 1]) for i in range(len(sizes))]
    assert nested_silo_members(groups, parents, 3) == [[0, 1, 2, 3], [4], [5, 6]]
    assert nested_silo_members(groups, parents, 4) == [[0, 3], [1, 2], [4], [5, 6]]
    assert nested_silo_members(groups, parents, 2) == [[0, 1, 2, 3], [4, 5, 6]]
    silos = nested_silos(groups, parents, 5)
    assert len(silos) == 5 and _is_partition(silos, int(bounds[-1]))


def test_nested_silos_bad_input():
    with pytest.raises(ValueError, match="one parent per group, got 1 parents for 2 groups"):
        nested_silos([np.arange(2), np.arange(2, 4)], ["a"], 1)
    with pytest.raises(ValueError, match="got 3 > 2"):
        nested_silos([np.arange(2), np.arange(2, 4)], ["a", "a"], 3)


def test_client_of_inverts_and_checks():
    owner = client_of([np.array([0, 2]), np.array([1])], 4)
    assert owner.tolist() == [0, 1, 0, -1]
    with pytest.raises(ValueError, match="client 1 holds an index that another client"):
        client_of([np.array([0]), np.array([0])], 2)
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        client_of([np.array([5])], 2)
