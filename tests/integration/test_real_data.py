"""The real data sets, fetched once into the default cache (PRIVFL_DATA_DIR or ~/.cache/privfl/data).

Protocol checks on MovieLens-100K (counts, leave-one-out, negatives, the popularity anchor), a short
centralized MF run that must beat popularity, and the clothing reviews' split and silos.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fedcore.rounds.training import TrainConfig, train_local
from fedcore.workloads.datasets import load_clothing_reviews, load_movielens100k, load_movielens100k_grouplens
from fedcore.workloads.recsys import (
    ClothingConfig,
    RecommenderConfig,
    clothing_federation,
    hit_rate_ndcg,
    leave_one_out,
    movielens_federation,
    popularity_scores,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def movielens():
    return load_movielens100k()


@pytest.fixture(scope="module")
def split(movielens):
    return leave_one_out(movielens.ratings, num_negatives=99, seed=0, item_ids=movielens.items["movie_id"].to_numpy())


def test_movielens_counts(movielens):
    assert len(movielens.ratings) == 100_000
    assert movielens.ratings["user_id"].nunique() == 943 == len(movielens.users)
    assert len(movielens.items) == 1_682 and movielens.ratings["movie_id"].nunique() == 1_682
    assert movielens.ratings.iloc[0].tolist() == [196, 242, 3, 881250949]  # u.data's first line
    assert movielens.items.loc[0, "title"] == "Toy Story (1995)"


def test_leave_one_out_protocol(movielens, split):
    ratings = movielens.ratings
    assert split.num_users == 943 and split.num_items == 1_682
    assert sum(len(s) for s in split.sequences) == 100_000  # each user: training items + one held out
    assert split.test_items.shape == (943,) and split.negatives.shape == (943, 99)
    last_time = ratings.groupby("user_id")["timestamp"].max().to_numpy()
    assert np.array_equal(np.array([t[-1] for t in split.timestamps]), last_time)
    for u in range(0, 943, 37):
        rated = set(ratings.loc[ratings.user_id == split.user_ids[u], "movie_id"])
        negatives = set(split.item_ids[split.negatives[u]].tolist())
        assert len(negatives) == 99 and not rated & negatives


def test_popularity_anchor(split):
    hr, ndcg = hit_rate_ndcg(popularity_scores(split)[split.candidates()], k=10)
    assert hr == pytest.approx(0.409, abs=0.01)
    assert ndcg == pytest.approx(0.228, abs=0.01)


def test_partitions(movielens):
    silos = movielens_federation(movielens, partition="regions", num_silos=5)
    assert [u.size for u in silos.client_users.values()] == [193, 163, 198, 201, 188]
    assert sum(len(c.test) for c in silos.clients.values()) == 943
    devices = movielens_federation(movielens, partition="users")
    assert len(devices.clients) == 943 and all(len(c.test) == 1 for c in devices.clients.values())


def test_short_centralized_mf_beats_popularity(movielens, split):
    popular, _ = hit_rate_ndcg(popularity_scores(split)[split.candidates()], k=10)
    fed = movielens_federation(movielens, config=RecommenderConfig(model="mf", dim=32))
    torch.manual_seed(0)
    model = fed.task.build_model()
    config = TrainConfig(lr=0.01, epochs=2, batch_size=1024)
    train_local(model, task=fed.task, data=fed.central, config=config, generator=torch.Generator().manual_seed(0))
    metrics = fed.task.evaluate(model, fed.central.test)
    assert metrics["hr@10"] > popular + 0.05, (metrics, popular)


def test_grouplens_layout_round_trip(movielens, tmp_path):
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    movielens.ratings.to_csv(folder / "u.data", sep="\t", header=False, index=False)
    items = movielens.items.copy()
    items["video_release_date"] = ""
    items.fillna("").to_csv(folder / "u.item", sep="|", header=False, index=False, encoding="latin-1")
    movielens.users.to_csv(folder / "u.user", sep="|", header=False, index=False)
    again = load_movielens100k_grouplens(folder)
    pd.testing.assert_frame_equal(again.ratings, movielens.ratings)
    pd.testing.assert_frame_equal(again.users, movielens.users)
    pd.testing.assert_frame_equal(again.items.drop(columns=["release_date"]), movielens.items.drop(columns=["release_date"]))


def test_clothing_split_and_silos():
    data = load_clothing_reviews()
    reviews = data.reviews
    assert len(reviews) == 23_486 and reviews["review_text"].notna().sum() == 22_641
    fed = clothing_federation(data, config=ClothingConfig(trainable_layers=0, max_length=16), max_reviews=None)
    assert len(fed.central.train) == 18_112 and len(fed.central.test) == 4_529
    majority = float(np.mean(fed.central.test.labels))
    assert majority == pytest.approx(0.819, abs=0.002)
    assert len(fed.clients) == 10
    assert sum(c.num_train for c in fed.clients.values()) == 18_112
    assert {"knits", "blouses", "sweaters", "fine-gauge", "dresses", "intimate", "jackets", "trend"} <= set(fed.clients)
    rates = [float(np.mean(c.train.labels)) for c in fed.clients.values()]
    assert max(rates) - min(rates) > 0.05  # non-IID label rates
