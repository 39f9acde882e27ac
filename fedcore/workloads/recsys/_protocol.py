"""The MovieLens evaluation protocol: leave-one-out by timestamp, sampled negatives, HR/NDCG@k.

Protocol (stated in every table): implicit feedback, every rating is an interaction; per user a
stable sort by timestamp (ties keep the data file's row order); the last interaction is held out
as the test item; 99 negatives per user are drawn once, with a fixed seed, from the items the user
never rated; HR@10 and NDCG@10 are computed over the 100 candidates (the test item and its 99
negatives). The rank of the test item counts the negatives scored strictly higher than it, so a
tie is resolved in the test item's favour (the usual NCF evaluation code does the same).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = [
    "PROTOCOL",
    "LeaveOneOut",
    "leave_one_out",
    "hit_rate_ndcg",
    "per_user_hit_ndcg",
    "rank_of_positive",
    "popularity_scores",
]

PROTOCOL = (
    "MovieLens-100K, implicit feedback; per user stable sort by timestamp (ties keep file row order), "
    "last interaction held out; 99 negatives per user drawn once (seed {seed}) from never-rated items; "
    "HR@10 / NDCG@10 over 100 candidates, ties counted in the positive's favour"
)


@dataclass(frozen=True)
class LeaveOneOut:
    """A leave-one-out split of interactions, with contiguous indices for users and items.

    Attributes:
        user_ids: original user id of each user index (sorted ascending), shape ``(U,)``.
        item_ids: original item id of each item index (sorted ascending), shape ``(I,)``.
        sequences: per user index, its item indices in time order (stable sort, file order on
            ties), the held-out test item last.
        timestamps: per user index, the timestamps matching ``sequences``.
        negatives: ``(U, num_negatives)`` item indices never rated by the user, drawn once.
        seed: the seed the negatives were drawn with.
    """

    user_ids: np.ndarray
    item_ids: np.ndarray
    sequences: tuple[np.ndarray, ...]
    timestamps: tuple[np.ndarray, ...]
    negatives: np.ndarray
    seed: int

    @property
    def num_users(self) -> int:
        """Users in the split."""
        return int(self.user_ids.shape[0])

    @property
    def num_items(self) -> int:
        """Items in the catalogue (indices run from 0 to ``num_items - 1``)."""
        return int(self.item_ids.shape[0])

    @property
    def test_items(self) -> np.ndarray:
        """The held-out item index of every user, shape ``(U,)``."""
        return np.array([seq[-1] for seq in self.sequences], dtype=np.int64)

    def train_sequence(self, user: int) -> np.ndarray:
        """Item indices of ``user``'s training interactions (all but the last), in time order."""
        return self.sequences[user][:-1]

    def candidates(self, users: np.ndarray | None = None) -> np.ndarray:
        """``(U, 1 + num_negatives)`` candidates per user: the test item first, then its negatives."""
        users = np.arange(self.num_users) if users is None else np.asarray(users, dtype=np.int64)
        return np.concatenate([self.test_items[users, None], self.negatives[users]], axis=1)

    def train_frame(self) -> pd.DataFrame:
        """The training interactions as a frame of ``user`` / ``item`` indices and ``timestamp``."""
        users = np.concatenate([np.full(len(s) - 1, u, dtype=np.int64) for u, s in enumerate(self.sequences)])
        items = np.concatenate([s[:-1] for s in self.sequences])
        times = np.concatenate([t[:-1] for t in self.timestamps])
        return pd.DataFrame({"user": users, "item": items, "timestamp": times})

    @property
    def protocol(self) -> str:
        """The split and metric protocol in words, stated in every table."""
        return PROTOCOL.format(seed=self.seed)


def leave_one_out(
    ratings: pd.DataFrame,
    num_negatives: int = 99,
    seed: int = 0,
    *,
    item_ids: np.ndarray | None = None,
    min_interactions: int = 2,
) -> LeaveOneOut:
    """Split ``ratings`` leave-one-out by timestamp and draw the evaluation negatives once.

    Args:
        ratings: columns ``user_id``, ``movie_id``, ``timestamp`` (others ignored), in file order.
        num_negatives: negatives per user, drawn without replacement from never-rated items.
        seed: seed of the negatives (``numpy.random.default_rng(seed)``, users in ascending id order).
        item_ids: the catalogue (defaults to the rated movie ids); negatives come from it.
        min_interactions: users with fewer interactions are refused (one is needed for training).

    Raises:
        ValueError: missing columns, a user with too few interactions, a rated item outside the
            catalogue, or a user who rated too much of the catalogue to draw ``num_negatives``.
    """
    for col in ("user_id", "movie_id", "timestamp"):
        if col not in ratings.columns:
            raise ValueError(f"ratings must have a {col!r} column, got columns {list(ratings.columns)}")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives!r}")
    if min_interactions < 2:
        raise ValueError(f"min_interactions must be >= 2, got {min_interactions!r}")
    catalogue = np.unique(ratings["movie_id"].to_numpy()) if item_ids is None else np.unique(np.asarray(item_ids))
    users_col = ratings["user_id"].to_numpy()
    items_col = ratings["movie_id"].to_numpy()
    times_col = ratings["timestamp"].to_numpy()
    item_index = np.searchsorted(catalogue, items_col)
    if np.any(item_index >= catalogue.size) or np.any(catalogue[np.minimum(item_index, catalogue.size - 1)] != items_col):
        raise ValueError("ratings hold movie ids that are not in item_ids")
    user_ids, user_index = np.unique(users_col, return_inverse=True)
    # Stable sort by (user, timestamp): ties keep the file's row order.
    order = np.lexsort((np.arange(len(ratings)), times_col, user_index))
    bounds = np.searchsorted(user_index[order], np.arange(user_ids.size + 1))
    sequences = []
    timestamps = []
    for u in range(user_ids.size):
        rows = order[bounds[u] : bounds[u + 1]]
        if rows.size < min_interactions:
            raise ValueError(
                f"user {int(user_ids[u])} has {rows.size} interactions, fewer than min_interactions={min_interactions}"
            )
        sequences.append(item_index[rows].astype(np.int64))
        timestamps.append(times_col[rows].astype(np.int64))
    rng = np.random.default_rng(seed)
    negatives = np.empty((user_ids.size, num_negatives), dtype=np.int64)
    for u, seq in enumerate(sequences):
        unrated = np.setdiff1d(np.arange(catalogue.size), seq, assume_unique=False)
        if unrated.size < num_negatives:
            raise ValueError(
                f"user {int(user_ids[u])} left only {unrated.size} unrated items, fewer than num_negatives={num_negatives}"
            )
        negatives[u] = rng.choice(unrated, size=num_negatives, replace=False)
    return LeaveOneOut(
        user_ids=user_ids.astype(np.int64),
        item_ids=catalogue.astype(np.int64),
        sequences=tuple(sequences),
        timestamps=tuple(timestamps),
        negatives=negatives,
        seed=int(seed),
    )


def rank_of_positive(scores: np.ndarray) -> np.ndarray:
    """0-based rank of column 0 among each row's candidates (negatives scored strictly higher)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be 2-D (users, candidates >= 2), got shape {scores.shape}")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores must be finite")
    return (scores[:, 1:] > scores[:, :1]).sum(axis=1)


def hit_rate_ndcg(scores: np.ndarray, k: int = 10) -> tuple[float, float]:
    """Mean HR@k and NDCG@k when column 0 of each row scores the held-out item.

    HR@k is 1 when the held-out item ranks in the top ``k``; NDCG@k is ``1 / log2(rank + 2)`` then
    (0-based rank), else 0. Both are averaged over rows (users).

    Raises:
        ValueError: ``k < 1``, a wrong shape, or non-finite scores.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    hits, gains = per_user_hit_ndcg(scores, k)
    return float(hits.mean()), float(gains.mean())


def per_user_hit_ndcg(scores: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Per-row hit (0/1) and NDCG@k, see :func:`hit_rate_ndcg`."""
    rank = rank_of_positive(scores)
    hits = (rank < k).astype(np.float64)
    gains = np.where(rank < k, 1.0 / np.log2(rank + 2.0), 0.0)
    return hits, gains


def popularity_scores(split: LeaveOneOut) -> np.ndarray:
    """Training-interaction count of every item (the popularity baseline's score), shape ``(I,)``."""
    counts = np.zeros(split.num_items, dtype=np.float64)
    for seq in split.sequences:
        np.add.at(counts, seq[:-1], 1.0)
    return counts
