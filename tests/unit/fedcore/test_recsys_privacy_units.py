"""The unit of privacy of the MovieLens examples: neighbouring datasets, per-user grouping, user-level DP."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import dp
import secagg
from fedcore.errors import ConfigError
from fedcore.experiments.config import parse_config
from fedcore.experiments.experiment import Workload, build_experiment
from fedcore.rounds.training import TrainConfig, train_local
from fedcore.workloads.datasets import MovieLens100K
from fedcore.workloads.recsys import RecommenderConfig, movielens_federation

from .test_recsys_models import N_ITEMS, synthetic_movielens

pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Optimal order is the")

USER, SEEDS = 4, range(8)  # the user whose rating (or whole data) the neighbour removes


@pytest.fixture(scope="module")
def data():
    return synthetic_movielens()


def without(data: MovieLens100K, keep: np.ndarray) -> MovieLens100K:
    return MovieLens100K(ratings=data.ratings[keep].reset_index(drop=True), items=data.items, users=data.users)


def removed_rating(data: MovieLens100K) -> tuple[MovieLens100K, int]:
    """The neighbour without one of USER's training ratings (a middle one, not a held-out item)."""
    rows = np.flatnonzero(data.ratings["user_id"].to_numpy() == USER)
    order = rows[np.argsort(data.ratings["timestamp"].to_numpy()[rows], kind="stable")]
    gone = order[len(order) // 2]
    keep = np.ones(len(data.ratings), dtype=bool)
    keep[gone] = False
    return without(data, keep), int(data.ratings["movie_id"].iloc[gone]) - 1  # item index = movie id - 1


def examples_by_record(fed, seed: int) -> dict[tuple[int, int], tuple]:
    """(user id, item) -> (history, negatives) of every training example, drawn with torch seed ``seed``."""
    train = fed.central.train
    torch.manual_seed(seed)
    batch = train.__getitems__(list(range(len(train)))).batch
    ids = fed.split.user_ids[batch["user"].numpy()]
    return {
        (int(u), int(i)): (tuple(h.tolist()), tuple(n.tolist()))
        for u, i, h, n in zip(ids, batch["item"], batch["history"], batch["negatives"])
    }


def test_at_record_level_removing_a_rating_changes_only_that_ratings_example(data):
    neighbour, item = removed_rating(data)
    for seed in SEEDS:
        before = examples_by_record(movielens_federation(data, unit="record"), seed)
        after = examples_by_record(movielens_federation(neighbour, unit="record"), seed)
        assert set(before) - set(after) == {(USER, item)} and set(after) <= set(before)
        assert all(after[r] == before[r] for r in after)  # every other example is the same, bit for bit


def test_with_negatives_among_unrated_items_the_record_level_claim_would_be_false(data):
    # The adversarial check of the test above: the old construction fails it. The removed item is
    # never a negative of the user's other examples while it is rated, and becomes one once removed.
    neighbour, item = removed_rating(data)
    as_negative = {"before": 0, "after": 0}
    changed = 0
    for seed in SEEDS:
        before = examples_by_record(movielens_federation(data), seed)
        after = examples_by_record(movielens_federation(neighbour), seed)
        changed += sum(after[r] != before[r] for r in after)
        as_negative["before"] += sum(item in neg for (u, _), (_, neg) in before.items() if u == USER)
        as_negative["after"] += sum(item in neg for (u, _), (_, neg) in after.items() if u == USER)
    assert changed > 0 and as_negative["before"] == 0 and as_negative["after"] > 0


def test_uniform_negatives_cover_the_catalogue_and_may_be_positives(data):
    fed = movielens_federation(data, unit="record")
    train = fed.central.train
    torch.manual_seed(0)
    batch = train.__getitems__(list(range(len(train)))).batch
    negatives = batch["negatives"].numpy()
    assert negatives.min() >= 0 and negatives.max() < N_ITEMS
    counts = np.bincount(negatives.ravel(), minlength=N_ITEMS)
    assert counts.min() > 0.5 * counts.mean()  # roughly uniform over all 150 items
    rated = [set(fed.split.train_sequence(int(u)).tolist()) for u in batch["user"]]
    noise = np.mean([n in r for row, r in zip(negatives, rated) for n in row])
    assert 0.08 < noise < 0.25  # label noise: about 24 rated of 150 items
    assert fed.units == ("record", "user") and movielens_federation(data).units == ("user",)


def grouped_by_id(fed, users: list[int], seed: int) -> dict[int, dict[str, np.ndarray]]:
    """User id -> that user's grouped item (all its examples) in one batch of ``users`` (indices)."""
    view = fed.central.train.by_user()
    torch.manual_seed(seed)
    batch = view.__getitems__(users).batch
    out = {}
    for r, u in enumerate(batch["user"].tolist()):
        mine = batch["sample"] == r
        assert torch.equal(batch["slot"][mine], torch.arange(int(mine.sum())))
        out[int(fed.split.user_ids[u])] = {k: batch[k][mine].numpy() for k in ("history", "item", "negatives")}
    return out


def test_at_user_level_removing_a_user_changes_only_that_users_examples(data):
    ids = data.ratings["user_id"].to_numpy()
    neighbour = without(data, ids != USER)
    fed, fed2 = movielens_federation(data, unit="user"), movielens_federation(neighbour, unit="user")
    others = [u for u in range(fed.split.num_users) if fed.split.user_ids[u] != USER]
    for seed in SEEDS:
        before = grouped_by_id(fed, others, seed)
        after = grouped_by_id(fed2, list(range(fed2.split.num_users)), seed)
        assert set(after) == set(before) and USER not in after
        for uid in after:
            for key in ("history", "item", "negatives"):
                assert np.array_equal(after[uid][key], before[uid][key])


FEATURES = np.random.default_rng(0).normal(size=(N_ITEMS, 6)).astype(np.float32)
MODELS = {
    "mf": RecommenderConfig(dim=8, num_train_negatives=3),  # packed
    "mf_text": RecommenderConfig(model="mf_text", dim=8, num_train_negatives=3),  # padded: a projection reads rows
    "transformer": RecommenderConfig(model="transformer", dim=8, history_length=4, dropout=0.0, num_train_negatives=3),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_users_grouped_item_holds_exactly_its_examples_and_its_loss_is_their_sum(data, name):
    fed = movielens_federation(data, config=MODELS[name], item_features=FEATURES, unit="user")
    train, task = fed.central.train, fed.task
    view = train.by_user()
    assert len(view) == fed.split.num_users
    users = [0, 3, 7]
    torch.manual_seed(5)
    grouped = view.__getitems__(users).batch
    flat_rows = [i for u in users for i in range(len(train)) if int(train.users[train._row[i]]) == u]
    torch.manual_seed(5)  # the same batch key: the same negatives per record
    flat = train.__getitems__(flat_rows).batch
    torch.manual_seed(0)
    model = task.build_model()
    per_user = task.loss(model, grouped)
    per_example = task.loss(model, flat)
    sums = torch.stack([per_example[flat["user"] == u].sum() for u in users])
    torch.testing.assert_close(per_user, sums)
    skip = 1 if MODELS[name].model == "transformer" else 0  # the first item has no history
    for r, u in enumerate(users):
        assert sorted(grouped["item"][grouped["sample"] == r].tolist()) == sorted(fed.split.train_sequence(u)[skip:].tolist())


def test_history_models_refuse_record_level_naming_the_setting(data):
    cfg = RecommenderConfig(model="transformer", history_length=5)
    with pytest.raises(ValueError, match=r"privacy unit 'record' \(privacy.unit\) is not supported for model 'transformer': "
                                         r"its history window puts each rating into up to 5 other examples; use unit 'user'"):  # fmt: skip
        movielens_federation(data, config=cfg, item_features=FEATURES, unit="record")
    assert movielens_federation(data, config=cfg, item_features=FEATURES, unit="user").units == ("user",)
    with pytest.raises(ValueError, match=r"unit must be one of \('record', 'user'\) or None, got 'rating'"):
        movielens_federation(data, unit="rating")


def test_user_level_dp_trains_the_transformer_one_row_per_user(data):
    fed = movielens_federation(data, config=MODELS["transformer"], item_features=FEATURES, unit="user")
    client, task = next(iter(fed.clients.values())), fed.task
    torch.manual_seed(0)
    model = task.build_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    privacy = dp.UserLevelDP(noise_multiplier=1e-9, max_grad_norm=0.5)
    result = train_local(model, task=task, data=client, config=TrainConfig(optimizer="sgd", lr=1.0, batch_size=64),
                         generator=torch.Generator().manual_seed(0), privacy=privacy)  # fmt: skip
    assert result.privacy_event.unit == "user" and result.privacy_event.clipping == "embedding"
    moved = torch.cat([(model.state_dict()[k] - v).flatten() for k, v in before.items()])
    users = len(client.train.by_user())
    expected_users = users // len(DataLoader(client.train, batch_size=64))
    # a step moves the model by lr * |sum of clipped per-user gradients| / expected users <= C * users / expected users
    assert 0 < float(moved.norm()) <= result.steps * 0.5 * users / expected_users * (1 + 1e-4)


def test_user_level_dp_on_a_silo_clips_per_user_and_keeps_user_rows_noise_free(data):
    fed = movielens_federation(data, config=RecommenderConfig(dim=8, num_train_negatives=3), unit="user")
    name = next(iter(fed.clients))
    client, task = fed.clients[name], fed.task
    torch.manual_seed(0)
    model = task.build_model()
    rows = model.user_embedding.weight.detach().clone()
    privacy = dp.UserLevelDP(noise_multiplier=5.0, max_grad_norm=0.5, user_parameters=task.user_parameters)
    config = TrainConfig(optimizer="sgd", lr=1.0, epochs=2, batch_size=48)
    result = train_local(
        model, task=task, data=client, config=config, generator=torch.Generator().manual_seed(0), privacy=privacy
    )
    event = result.privacy_event
    batches = len(DataLoader(client.train, batch_size=48))
    assert event.unit == "user" and event.sample_rate == pytest.approx(1 / batches) and event.steps == 2 * batches
    silo_users = fed.client_users[name]
    others = np.setdiff1d(np.arange(fed.split.num_users), silo_users)
    after = model.user_embedding.weight.detach()
    assert torch.equal(after[others], rows[others])  # rows of other silos' users: no noise, no update
    assert not torch.equal(after[silo_users], rows[silo_users])
    assert all(p.grad is None for p in model.parameters()) and not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize(
    "raw,match",
    [
        (
            {"privacy": {"level": "sample", "target_epsilon": 8.0, "unit": "rating"}},
            r"privacy.unit must be one of \['record', 'user'\], got 'rating'",
        ),
        (
            {"privacy": {"level": "client", "noise_multiplier": 1.0, "unit": "record"}},
            "privacy.unit 'record' at level 'client': a unit applies to level 'sample' .* or to level 'client' .'user'",
        ),
        (
            {"workload": {"case": "clothing"}, "privacy": {"level": "sample", "target_epsilon": 8.0, "unit": "user"}},
            "privacy.unit 'user' needs user ids, which workload.case 'clothing' lacks; use 'record'",
        ),
    ],
)
def test_bad_units_are_refused_naming_the_key(raw, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(raw)


def test_user_level_is_the_default_unit_for_movielens_and_record_for_clothing():
    dp_on = {"level": "sample", "target_epsilon": 8.0}
    assert parse_config({"privacy": dp_on}).privacy_unit == "user"
    assert parse_config({"workload": {"case": "clothing"}, "privacy": dp_on}).privacy_unit == "record"
    assert parse_config({"privacy": {**dp_on, "unit": "record"}}).privacy_unit == "record"
    assert parse_config({}).privacy_unit is None


def experiment(data, tmp_path, privacy: dict, *, built_for: str | None = "config", **top):
    config = parse_config({
        "rounds": 1, "output_dir": str(tmp_path), "workload": {"case": "movielens", "num_silos": 2, "dim": 8}, **top,
        "train": {"optimizer": "sgd", "lr": 1.0, "batch_size": 128}, "privacy": {"level": "sample", **privacy},
        "logging": {"jsonl": False, "tensorboard": False, "quiet": True},
    })  # fmt: skip
    unit = config.privacy_unit if built_for == "config" else built_for
    fed = movielens_federation(data, config=RecommenderConfig(dim=8), num_silos=2, unit=unit)
    workload = Workload(fed.task, fed.clients, fed.central, "synthetic", {}, config.workload, units=fed.units)
    return build_experiment(config, workload=workload)


def test_the_experiment_runs_user_level_dp_by_default_and_records_the_unit(data, tmp_path):
    exp = experiment(data, tmp_path, {"target_epsilon": 8.0})
    privacy = exp.federation.sample_privacy
    assert isinstance(privacy, dp.UserLevelDP) and privacy.unit == "user" and privacy.user_parameters == ("user_embedding",)
    fed = exp.federation
    planned = {e.client_id: e for e in fed._planned_events(1, fed.client_ids, 1.0)}
    fed.run_round()
    events = exp.ledger.events
    assert events and all(e.unit == "user" for e in events if e.level == "sample")
    for e in events:  # the budget was checked against the events the round then recorded, unit included
        assert (planned[e.client_id].unit, planned[e.client_id].sample_rate) == (e.unit, e.sample_rate)
        assert planned[e.client_id].steps >= e.steps
    assert 0 < exp.budget.spent(exp.ledger) <= 8.0


def test_record_level_needs_examples_built_for_it(data, tmp_path):
    exp = experiment(data, tmp_path / "a", {"target_epsilon": 8.0, "unit": "record"})
    assert type(exp.federation.sample_privacy) is dp.SampleLevelDP
    assert all(c.train.negatives == "uniform" for c in exp.workload.clients.values())
    with pytest.raises(
        ConfigError, match=r"privacy.unit 'record': the workload's examples support \['user'\]; build it from this config"
    ):
        experiment(data, tmp_path / "b", {"target_epsilon": 8.0, "unit": "record"}, built_for=None)


@pytest.mark.parametrize("noise", ["skellam", "discrete_gaussian"])
def test_distributed_noise_from_a_config_is_calibrated_with_the_bound_it_is_charged_with(data, tmp_path, noise):
    """Issue 18 item 5: calibrated as Gaussian and charged as Skellam, a target of 8 spent 10.5."""
    privacy = {"level": "client", "noise": noise, "target_epsilon": 8.0, "clip": 1.0}
    exp = experiment(data, tmp_path, privacy, rounds=20, aggregation={"mode": "masked"})
    fed = exp.federation
    integer_noise = fed.pipeline.backend.integer_noise
    assert integer_noise is not None and exp.noise_multiplier == integer_noise.noise_multiplier

    def whole_run(noise_multiplier: float) -> float:
        """Epsilon of the run's 20 rounds as the budget plans them: the fewest survivors the protocol allows."""
        candidate = dataclasses.replace(integer_noise, noise_multiplier=noise_multiplier)
        backend = secagg.MaskedSum(value_bound=fed.pipeline.backend.value_bound, max_clients=2, integer_noise=candidate)
        n = len(fed.client_ids)
        planned = [
            candidate.plan(round_index=t, scale=backend.encoder.scale, participants=n, min_survivors=fed.min_survivors(n))
            for t in range(1, 21)
        ]
        return dp.epsilon(dp.Ledger(planned), delta=1e-5)

    assert 7.9 < whole_run(integer_noise.noise_multiplier) <= 8.0  # fits the target, tightly
    gaussian = dp.calibrate_noise_multiplier(target_epsilon=8.0, delta=1e-5, steps=20, sample_rate=1.0)
    assert whole_run(gaussian) > 8.0  # the Gaussian calibration would overspend under the bound it is charged with
