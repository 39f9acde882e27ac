"""The MovieLens protocol on small synthetic logs: leave-one-out order, negatives, HR/NDCG."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.workloads.recsys import hit_rate_ndcg, leave_one_out, per_user_hit_ndcg, popularity_scores, rank_of_positive


def _ratings(rows):
    return pd.DataFrame(rows, columns=["user_id", "movie_id", "rating", "timestamp"])


def test_ties_keep_file_row_order_and_last_is_held_out():
    # User 7 rates 30, 10, 20 all at t=5 then 40 at t=4: time order is 40, then 30, 10, 20 (file order).
    ratings = _ratings([(7, 30, 1, 5), (7, 10, 1, 5), (9, 10, 1, 1), (7, 20, 1, 5), (7, 40, 1, 4), (9, 20, 1, 2)])
    split = leave_one_out(ratings, num_negatives=1, seed=0, item_ids=np.array([10, 20, 30, 40, 50]))
    assert split.user_ids.tolist() == [7, 9]
    assert split.item_ids[split.sequences[0]].tolist() == [40, 30, 10, 20]
    assert split.item_ids[split.test_items].tolist() == [20, 20]
    assert split.item_ids[split.train_sequence(0)].tolist() == [40, 30, 10]
    assert split.item_ids[split.negatives[0]].tolist() == [50]  # the only item user 7 never rated
    frame = split.train_frame()
    assert frame["user"].tolist() == [0, 0, 0, 1] and split.item_ids[frame["item"]].tolist() == [40, 30, 10, 10]


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), n_users=st.integers(1, 12), n_items=st.integers(40, 80))
def test_negatives_are_never_rated_distinct_and_fixed_by_seed(seed, n_users, n_items):
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        for i in rng.choice(n_items, size=int(rng.integers(2, 20)), replace=False):
            rows.append((u + 1, int(i) + 1, 3, int(rng.integers(0, 5))))
    ratings = _ratings(rows)
    catalogue = np.arange(1, n_items + 1)
    split = leave_one_out(ratings, num_negatives=15, seed=seed, item_ids=catalogue)
    again = leave_one_out(ratings, num_negatives=15, seed=seed, item_ids=catalogue)
    assert np.array_equal(split.negatives, again.negatives)
    for u, uid in enumerate(split.user_ids):
        rated = set(ratings.loc[ratings.user_id == uid, "movie_id"])
        negatives = split.item_ids[split.negatives[u]]
        assert len(set(negatives)) == 15 and not rated & set(negatives)
        assert len(split.sequences[u]) == len(rated)
    candidates = split.candidates()
    assert candidates.shape == (split.num_users, 16) and np.array_equal(candidates[:, 0], split.test_items)


def test_leave_one_out_bad_input():
    ok = _ratings([(1, 1, 1, 1), (1, 2, 1, 2)])
    with pytest.raises(ValueError, match="ratings must have a 'timestamp' column"):
        leave_one_out(ok.drop(columns="timestamp"))
    with pytest.raises(ValueError, match="num_negatives must be >= 1, got 0"):
        leave_one_out(ok, num_negatives=0)
    with pytest.raises(ValueError, match="user 1 has 1 interactions, fewer than min_interactions=2"):
        leave_one_out(_ratings([(1, 1, 1, 1), (2, 1, 1, 1), (2, 2, 1, 1)]), num_negatives=1, item_ids=np.arange(1, 5))
    with pytest.raises(ValueError, match="user 1 left only 1 unrated items, fewer than num_negatives=2"):
        leave_one_out(ok, num_negatives=2, item_ids=np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="movie ids that are not in item_ids"):
        leave_one_out(ok, num_negatives=1, item_ids=np.array([1, 3, 4]))


def test_hit_rate_ndcg_known_answers():
    scores = np.array(
        [
            [5.0, 1.0, 2.0, 3.0],  # rank 0: hit, ndcg 1
            [2.0, 3.0, 4.0, 1.0],  # rank 2: hit at k=3, ndcg 1/log2(4) = 0.5
            [0.0, 1.0, 2.0, 3.0],  # rank 3: miss at k=3
            [1.0, 1.0, 1.0, 0.0],  # ties count for the positive: rank 0
        ]
    )
    assert rank_of_positive(scores).tolist() == [0, 2, 3, 0]
    hits, gains = per_user_hit_ndcg(scores, k=3)
    assert hits.tolist() == [1.0, 1.0, 0.0, 1.0]
    assert gains.tolist() == [1.0, 0.5, 0.0, 1.0]
    hr, ndcg = hit_rate_ndcg(scores, k=3)
    assert hr == 0.75 and ndcg == pytest.approx(2.5 / 4)
    assert hit_rate_ndcg(scores, k=4) == (1.0, pytest.approx((2.5 + 1 / math.log2(5)) / 4))


def test_hit_rate_ndcg_bad_input():
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        hit_rate_ndcg(np.zeros((2, 3)), k=0)
    with pytest.raises(ValueError, match=r"scores must be 2-D \(users, candidates >= 2\), got shape \(3,\)"):
        hit_rate_ndcg(np.zeros(3))
    with pytest.raises(ValueError, match="scores must be finite"):
        hit_rate_ndcg(np.array([[np.nan, 1.0]]))


def test_popularity_counts_training_interactions_only():
    ratings = _ratings([(1, 1, 1, 1), (1, 2, 1, 2), (2, 2, 1, 1), (2, 3, 1, 2), (3, 2, 1, 1), (3, 1, 1, 2)])
    split = leave_one_out(ratings, num_negatives=1, item_ids=np.arange(1, 5))
    # Held out: item 2 (user 1), 3 (user 2), 1 (user 3); training: 1, 2, 2.
    assert popularity_scores(split).tolist() == [1.0, 2.0, 0.0, 0.0]
