"""MovieLens task and models on a synthetic log: shapes, per-sample losses, privacy of user rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fedcore.rounds.training import TrainConfig, train_local
from fedcore.stages.layout import ParameterLayout
from fedcore.workloads.datasets import GENRES, MovieLens100K
from fedcore.workloads.recsys import (
    MatrixFactorization,
    MovieLensTask,
    RecommenderConfig,
    SequenceRecommender,
    movielens_federation,
    movielens_item_texts,
    zip_regions,
)
from fedcore.workloads.task import Task

N_USERS, N_ITEMS = 40, 150


def synthetic_movielens(seed: int = 0) -> MovieLens100K:
    """Two taste clusters: even users watch 25 of the 30 even movies below 61, odd users odd ones."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(1, N_USERS + 1):
        pool = np.arange(1 + (u % 2), 61, 2)
        for t, item in enumerate(rng.choice(pool, size=25, replace=False)):
            rows.append((u, int(item), 4, 1000 + t))
    ratings = pd.DataFrame(rows, columns=["user_id", "movie_id", "rating", "timestamp"])
    items = pd.DataFrame(
        {
            "movie_id": np.arange(1, N_ITEMS + 1),
            "title": [f"Movie {i} (1995)" for i in range(1, N_ITEMS + 1)],
            "release_date": "01-Jan-1995",
            "video_release_date": np.nan,
            "imdb_url": "x",
            **{g: (np.arange(N_ITEMS) % 19 == k).astype(np.int64) for k, g in enumerate(GENRES)},
        }
    )
    zips = ["0" + str(10000 + u) for u in range(1, N_USERS + 1)]
    zips = [str(u % 10) + z[1:] if u % 7 else "K1A0B1" for u, z in enumerate(zips, start=1)]
    users = pd.DataFrame(
        {"user_id": np.arange(1, N_USERS + 1), "age": 30, "gender": "M", "occupation": "other", "zip_code": zips}
    )
    return MovieLens100K(ratings=ratings, items=items, users=users)


def features() -> np.ndarray:
    feats = np.zeros((N_ITEMS, 8), dtype=np.float32)
    feats[np.arange(N_ITEMS), np.arange(N_ITEMS) % 2] = 1.0  # the text "knows" the cluster
    return feats + np.random.default_rng(0).normal(0, 0.1, size=feats.shape).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    return synthetic_movielens()


def test_regions_partition_holds_whole_users_and_states_its_rule(data):
    fed = movielens_federation(data, num_silos=5)
    users = np.concatenate(list(fed.client_users.values()))
    assert np.array_equal(np.sort(users), np.arange(N_USERS))
    assert len(fed.clients) == 5 and "contiguous runs" in fed.partition_rule
    assert list(fed.clients)[-1].endswith("non-US")
    for name, client in fed.clients.items():
        assert len(client.test) == fed.client_users[name].size  # one held-out item per user
        assert client.validation is None
    assert sum(c.num_train for c in fed.clients.values()) == fed.central.num_train == N_USERS * 24
    keys, groups = zip_regions(["02139", "94043", "V3N4P", "12345"])
    assert keys == ["0", "1", "9", "non-US"] and [g.tolist() for g in groups] == [[0], [3], [1], [2]]


def test_per_user_partition_and_validation_holdout(data):
    fed = movielens_federation(data, partition="users", max_users=10, validation=True)
    assert list(fed.clients)[:2] == ["user-0001", "user-0002"] and len(fed.clients) == 10
    client = fed.clients["user-0003"]
    assert client.num_train == 23 and len(client.validation) == 1 and len(client.test) == 1
    seq = fed.split.sequences[2]
    assert int(client.validation[0]["candidates"][0]) == seq[-2]
    assert int(client.test[0]["candidates"][0]) == seq[-1]
    items = {int(client.train[i]["item"]) for i in range(client.num_train)}
    assert items == set(seq[:-2].tolist())


def test_training_negatives_avoid_training_items_and_are_reproducible(data):
    fed = movielens_federation(data, max_users=5, sampling_seed=3)
    again = movielens_federation(data, max_users=5, sampling_seed=3)
    train, train2 = fed.central.train, again.central.train
    for i in range(len(train)):
        torch.manual_seed(i)  # negatives are keyed by torch's seeded RNG: the dataset keeps no state
        a = train[i]
        torch.manual_seed(i)
        b = train2[i]
        assert torch.equal(a["negatives"], b["negatives"])
        rated = set(fed.split.train_sequence(int(a["user"])).tolist())
        assert not rated & set(a["negatives"].tolist())


@pytest.mark.parametrize("model", ["mf", "mf_text", "transformer"])
def test_task_contract_and_local_only_user_table(data, model):
    cfg = RecommenderConfig(model=model, dim=16, history_length=5, heads=2, num_train_negatives=3)
    fed = movielens_federation(data, config=cfg, item_features=features())
    task = fed.task
    assert isinstance(task, Task)
    torch.manual_seed(0)
    net = task.build_model()
    batch = task.collate([fed.central.train[i] for i in range(6)])
    losses = task.loss(net, batch)
    assert losses.shape == (6,) and torch.all(losses > 0)
    empty = {k: v[:0] for k, v in batch.items()}
    assert task.loss(net, empty).shape == (0,)
    scores = task.predict(net, task.collate([fed.central.test[i] for i in range(4)]))
    assert scores.shape == (4, 100)
    layout = ParameterLayout(net, local_only=task.local_only)
    has_users = model != "transformer"
    assert any(n.startswith("user_embedding") for n, _ in net.named_parameters()) == has_users
    assert not any(n.startswith("user_embedding") for n in layout.names)
    assert set(layout.local_state(net)) == ({"user_embedding.weight"} if has_users else set())


def test_mf_and_transformer_learn_the_planted_clusters(data):
    for model, lr in (("mf", 0.02), ("transformer", 0.01)):
        cfg = RecommenderConfig(model=model, dim=16, history_length=5, dropout=0.0)
        fed = movielens_federation(data, config=cfg, item_features=features())
        torch.manual_seed(0)
        net = fed.task.build_model()
        before = fed.task.evaluate(net, fed.central.test)
        train_local(
            net,
            task=fed.task,
            data=fed.central,
            config=TrainConfig(lr=lr, epochs=4, batch_size=64),
            generator=torch.Generator().manual_seed(0),
        )
        after = fed.task.evaluate(net, fed.central.test)
        assert set(after) == {"hr@10", "ndcg@10"}
        # About 4 of the 99 negatives lie in the user's cluster: a model that learned it ranks far better.
        assert before["hr@10"] < 0.3 and after["hr@10"] > 0.6, (model, before, after)


def test_transformer_ignores_padding_and_needs_no_user():
    torch.manual_seed(0)
    net = SequenceRecommender(10, item_features=torch.randn(10, 4), history_length=4, dim=8, dropout=0.0).eval()
    items = torch.tensor([[1, 2, 3]])
    history = torch.tensor([[10, 10, 5, 6]])  # 10 = padding
    a = net(torch.tensor([0]), history, items)
    b = net(torch.tensor([99]), history, items)
    assert torch.equal(a, b)
    with torch.no_grad():
        net.item_features[10] = 1e3  # the padding row is never read through attention
    assert torch.allclose(net(torch.tensor([0]), history, items), a)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_models_work_with_opacus_per_sample_gradients(data):
    from opacus import GradSampleModule

    cfg = RecommenderConfig(model="transformer", dim=8, history_length=4, heads=2, dropout=0.0)
    fed = movielens_federation(data, config=cfg, item_features=features())
    for net in (fed.task.build_model(), MatrixFactorization(N_USERS, N_ITEMS, dim=4, item_features=torch.as_tensor(features()))):
        wrapped = GradSampleModule(net)
        batch = fed.task.collate([fed.central.train[i] for i in range(5)])
        fed.task.loss(wrapped, batch).sum().backward()
        for name, p in wrapped.named_parameters():
            if p.requires_grad:
                assert p.grad_sample is not None and p.grad_sample.shape[0] == 5, name


def test_config_and_task_errors():
    with pytest.raises(ValueError, match="model must be one of"):
        RecommenderConfig(model="gru")
    with pytest.raises(ValueError, match="loss must be one of"):
        RecommenderConfig(loss="hinge")
    with pytest.raises(ValueError, match="dim must be >= 1, got 0"):
        RecommenderConfig(dim=0)
    with pytest.raises(ValueError, match=r"model 'transformer' needs item_features of shape \(5, F\), got None"):
        MovieLensTask(RecommenderConfig(model="transformer"), num_users=2, num_items=5)
    with pytest.raises(ValueError, match=r"item_features must have shape \(5, F\), got \(4, 3\)"):
        MatrixFactorization(2, 5, item_features=torch.zeros(4, 3))


def test_builder_errors(data):
    with pytest.raises(ValueError, match="partition must be one of"):
        movielens_federation(data, partition="random")
    with pytest.raises(ValueError, match=r"num_silos must be in \[1, 11\]"):
        movielens_federation(data, num_silos=12)
    with pytest.raises(ValueError, match="max_users must be >= 1 or None, got 0"):
        movielens_federation(data, max_users=0)


def test_item_texts_are_title_and_genres(data):
    texts = movielens_item_texts(data)
    assert len(texts) == N_ITEMS
    assert texts[0] == "Movie 1 (1995) | unknown genre"  # genre 0 is "unknown"
    assert texts[1] == "Movie 2 (1995) | Action"


def test_batched_draw_matches_the_sequences_and_works_with_poisson_loading(data):
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader

    cfg = RecommenderConfig(model="transformer", history_length=4, num_train_negatives=3)
    fed = movielens_federation(data, config=cfg, item_features=features(), max_users=6)
    train = fed.central.train
    batch = fed.task.collate(train.__getitems__(list(range(len(train)))))
    pad = fed.split.num_items
    for i in range(len(train)):
        user = int(batch["user"][i])
        seq = fed.split.train_sequence(user).tolist()
        pos = seq.index(int(batch["item"][i]))
        expected = ([pad] * 4 + seq[:pos])[-4:]
        assert batch["history"][i].tolist() == expected and pos >= 1  # the first item has no history
        assert not set(batch["negatives"][i].tolist()) & set(seq)
    loader = DPDataLoader.from_data_loader(
        DataLoader(train, batch_size=8, collate_fn=fed.task.collate), generator=torch.Generator().manual_seed(0)
    )
    model = fed.task.build_model()
    sizes = []
    for b in loader:  # Poisson batches of varying (possibly zero) size
        sizes.append(b["item"].shape[0])
        assert fed.task.loss(model, b).shape == (sizes[-1],)
    assert len(set(sizes)) > 1 and sum(sizes) > 0
