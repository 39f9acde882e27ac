"""User-level DP across silos: each silo sums its users' clipped gradients, the noise is added once to the sum."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import Subset

import dp
import secagg
from fedcore.errors import ConfigError, RoundFailedError
from fedcore.experiments.config import load_config, parse_config
from fedcore.experiments.experiment import Experiment, Workload, build_experiment
from fedcore.rounds.asynchronous import AsyncFederation, FedBuff
from fedcore.rounds.client import Client, Workspace, _clipped_user_gradient_sum
from fedcore.rounds.sampling import PoissonSampler
from fedcore.rounds.server import Federation
from fedcore.rounds.training import TrainConfig
from fedcore.stages.pipeline import UpdatePipeline
from fedcore.strategies import FedAvg, FedSGD
from fedcore.workloads.recsys import RecommenderConfig, movielens_federation

from .test_recsys_models import synthetic_movielens

pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Optimal order is the")

CLIP = 0.5
EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "users_across_silos.toml"


@pytest.fixture(scope="module")
def data():
    return synthetic_movielens()


@pytest.fixture(scope="module")
def federation(data):
    return movielens_federation(data, config=RecommenderConfig(dim=8, num_train_negatives=3), num_silos=3, unit="user")


def raw(tmp_path, **sections) -> dict:
    out = {
        "rounds": 2, "output_dir": str(tmp_path), "workload": {"case": "movielens", "num_silos": 3, "dim": 8},
        "train": {"optimizer": "sgd", "lr": 0.05, "batch_size": 64, "epochs": 1},
        "strategy": {"name": "fedsgd", "lr": 0.5},
        "aggregation": {"mode": "masked", "value_bound": 20.0},
        "privacy": {"level": "client", "unit": "user", "clip": CLIP, "noise": "skellam", "target_epsilon": 8.0},
        "logging": {"jsonl": False, "tensorboard": False, "quiet": True},
    }  # fmt: skip
    for name, section in sections.items():
        out[name] = {**out.get(name, {}), **section} if isinstance(section, dict) else section
    return out


def build(federation, tmp_path, clients=None, **sections) -> Experiment:
    config = parse_config(raw(tmp_path, **sections))
    workload = Workload(
        federation.task, clients or federation.clients, federation.central, "synthetic", {}, config.workload,
        units=federation.units,
    )  # fmt: skip
    return build_experiment(config, workload=workload)


def test_a_run_charges_one_users_bound_per_round_within_the_budget_and_the_report_names_the_unit(federation, tmp_path):
    exp = build(federation, tmp_path)
    assert exp.federation.pipeline.user_bound == CLIP
    exp.federation.run(2)
    events = exp.ledger.events
    assert len(events) == 2 and all(
        (e.unit, e.clip_bound, e.sample_rate, e.participants) == ("user", CLIP, 1.0, 3) for e in events
    )
    assert 0 < exp.budget.spent(exp.ledger) <= 8.0
    summary = exp.report().data["summary"]
    assert summary["unit_of_privacy"].startswith("one user of one silo")
    assert any(line.startswith("User level across silos") for line in summary["protected_against"])


class WithoutUser:
    """A silo's training data without one of its users: the neighbouring silo at user level."""

    def __init__(self, train, gone: int) -> None:
        self.train, self.gone = train, gone

    def by_user(self):
        grouped = self.train.by_user()
        return Subset(grouped, [r for r in range(len(grouped)) if r != self.gone])


@pytest.mark.parametrize("chunk", [1000, 4])  # users per chunk: one chunk, or several (each draws the same negatives)
def test_removing_one_user_moves_the_silos_sum_by_at_most_the_clip_and_no_other_users_row(federation, chunk):
    """The adversary's neighbouring silo: its sum must not move by more than the sensitivity the noise is sized for."""
    task = federation.task
    name = next(iter(federation.clients))
    train = federation.clients[name].train
    torch.manual_seed(0)
    workspace = Workspace(task)
    start = {k: v.clone() for k, v in workspace.model.state_dict().items()}
    config = TrainConfig(optimizer="sgd", lr=0.05, batch_size=chunk, user_clip=CLIP)

    def silo(data) -> tuple[np.ndarray, torch.Tensor]:
        workspace.model.load_state_dict(start)
        torch.manual_seed(1)  # the same negatives for every user in both silos (one key, drawn from torch's RNG)
        update = _clipped_user_gradient_sum(workspace, data, config)
        return update, workspace.model.user_embedding.weight.detach().clone()

    full, rows = silo(train)
    assert rows.shape[0] > 0 and not torch.equal(rows, start["user_embedding.weight"])  # users' rows learn at home
    users = train.users
    moved = []
    for gone in range(len(users)):
        fewer, fewer_rows = silo(WithoutUser(train, gone))
        moved.append(float(np.linalg.norm(full.astype(np.float64) - fewer)))
        others = np.delete(users, gone)
        assert torch.equal(fewer_rows[others], rows[others])
        assert torch.equal(fewer_rows[users[gone]], start["user_embedding.weight"][users[gone]])  # its row: untouched
    assert 0 < max(moved) <= CLIP * (1 + 1e-5)
    assert sum(m > CLIP * 0.99 for m in moved) > 0  # the bound binds for some users: the test can fail


def test_the_masked_sum_is_the_plaintext_sum_within_the_encoders_bound(federation, tmp_path):
    """The protected path against the plaintext reference, with the same central noise (reproducible runs)."""
    vectors = {}
    for mode in ("plaintext", "masked"):
        exp = build(federation, tmp_path / mode, aggregation={"mode": mode}, privacy={"noise": "central"}, reproducible=True)
        exp.federation.run(2)
        vectors[mode] = exp.federation.global_vector.copy()
    diff = float(np.max(np.abs(vectors["masked"] - vectors["plaintext"])))
    assert 0 < diff < 1e-3


@pytest.mark.parametrize(
    "sections,match",
    [
        ({"strategy": {"name": "fedavg"}}, "needs strategy.name = 'fedsgd'"),
        ({"sampling": {"kind": "poisson", "q": 0.5}}, "needs sampling.kind = 'all'"),
        ({"aggregation": {"mode": "masked", "value_bound": None}}, "set aggregation.value_bound"),
        ({"train": {"optimizer": "adam"}}, "user_clip .* cannot honour optimizer='adam'"),
        ({"train": {"epochs": 2}}, "cannot honour epochs=2"),
        ({"privacy": {"adaptive_clip": True, "noise": "central", "count_noise_multiplier": 1.0}}, "adaptive clipping"),
    ],
)
def test_settings_that_would_break_the_user_level_guarantee_are_refused(federation, tmp_path, sections, match):
    with pytest.raises(ConfigError, match=match):
        build(federation, tmp_path, **sections)


def test_a_user_held_by_two_silos_is_refused(federation, tmp_path):
    first = next(iter(federation.clients.values()))
    clients = {**federation.clients, "copy": first}
    with pytest.raises(ConfigError, match=r"user \d+ is held by clients '.+' and '.+': its gradient would enter the sum twice"):
        build(federation, tmp_path, clients=clients)


def test_with_silos_dropping_out_down_to_the_threshold_the_run_never_spends_beyond_its_budget(federation, tmp_path):
    """The noise is sized for the fewest survivors masking allows; a dropped silo takes its users and its share away."""
    exp = build(
        federation, tmp_path, rounds=6, reproducible=True,
        aggregation={"dropout_rate": 0.3, "dropout_tolerance": 0.34}, privacy={"budget_epsilon": 8.0},
    )  # fmt: skip
    failed = 0
    for _ in range(6):
        try:
            exp.federation.run_round()
        except RoundFailedError:  # fewer survivors than the threshold: the round changes nothing and costs nothing
            failed += 1
    events = exp.ledger.events
    assert len(events) == 6 - failed
    threshold = exp.federation.pipeline.backend.integer_noise.min_clients
    assert threshold < 3 and any(e.survivors < e.participants for e in events)  # dropouts happened
    assert all(e.survivors >= threshold for e in events)
    assert exp.budget.spent(exp.ledger) <= 8.0


def test_the_example_config_runs_on_the_real_data_and_charges_users(tmp_path):
    config = load_config(
        EXAMPLE, overrides={"rounds": 2, "output_dir": str(tmp_path), "logging.jsonl": False, "logging.quiet": True}
    )
    exp = build_experiment(config)
    assert exp.federation.pipeline.user_bound == config.privacy.clip
    exp.federation.run(2)
    assert [e.unit for e in exp.ledger.events] == ["user", "user"] and 0 < exp.budget.spent(exp.ledger) <= 8.0


def test_the_federation_refuses_a_per_user_clip_the_noise_is_not_sized_for(federation):
    """The same guarantees through the Python API, which builds no config."""
    noise = dp.CentralGaussian(noise_multiplier=1.0, clip_bound=CLIP)
    common = dict(task=federation.task, clients=federation.clients, quiet=True)
    with pytest.raises(ConfigError, match=r"train.user_clip=5.0 must equal the pipeline's user_bound=0.5"):
        Federation(**common, strategy=FedSGD(lr=0.1), train=TrainConfig(optimizer="sgd", user_clip=5.0),
                   pipeline=UpdatePipeline(central_noise=noise, user_bound=CLIP, weighting="uniform"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"strategy 'fedavg' sends 'delta' updates"):
        Federation(**common, strategy=FedAvg(), train=TrainConfig(optimizer="sgd", user_clip=CLIP),
                   pipeline=UpdatePipeline(central_noise=noise, user_bound=CLIP, weighting="uniform"))  # fmt: skip
    with pytest.raises(ConfigError, match=r"sampler PoissonSampler samples silos"):
        Federation(**common, strategy=FedSGD(lr=0.1), train=TrainConfig(optimizer="sgd", user_clip=CLIP),
                   pipeline=UpdatePipeline(central_noise=noise, user_bound=CLIP, weighting="uniform"),
                   sampler=PoissonSampler(q=0.5))  # fmt: skip
    with pytest.raises(ConfigError, match=r"client_deadline=5.0 makes a silo's dropout depend on its training time"):
        Federation(**common, strategy=FedSGD(lr=0.1), train=TrainConfig(optimizer="sgd", user_clip=CLIP),
                   pipeline=UpdatePipeline(central_noise=noise, user_bound=CLIP, weighting="uniform"),
                   client_deadline=5.0)  # fmt: skip
    client = Client("silo", next(iter(federation.clients.values())))
    workspace = Workspace(federation.task)
    with pytest.raises(ConfigError, match="user_clip sums per-user clipped gradients, which only update_kind 'gradient'"):
        client.fit(workspace, global_vector=workspace.layout.flatten(workspace.model), seed=0, round_index=1,
                   config=TrainConfig(optimizer="sgd", user_clip=CLIP), update_kind="delta")  # fmt: skip


def test_a_model_with_dropout_or_an_asynchronous_buffer_is_refused(data, tmp_path, federation):
    """Dropout masks follow a user's position in the batch; a buffer holds the silos that finished first."""
    transformer = movielens_federation(
        data, config=RecommenderConfig(model="transformer", dim=8, num_train_negatives=3), num_silos=3, unit="user"
    )
    train = next(iter(transformer.clients.values())).train
    model = transformer.task.build_model()
    batch = transformer.task.collate(train.by_user().__getitems__([0, 1]))
    with pytest.raises(dp.DPValueError, match="needs a module that draws no randomness in training mode"):
        dp.clipped_user_gradients(model, lambda m: transformer.task.loss(m, batch), max_grad_norm=CLIP)
    exp = build(federation, tmp_path)
    with pytest.raises(ConfigError, match="an asynchronous buffer holds the silos that finished first"):
        AsyncFederation(exp.federation, schedule=FedBuff(buffer_size=2, concurrency=3))


@given(dim=st.integers(1, 400), c=st.floats(1e-7, 1.0), spread=st.booleans(), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=60, deadline=None)
def test_one_users_share_of_a_rounded_sum_is_within_the_rounded_sensitivity(dim, c, spread, seed):
    """dp._events' claim: two sums differing by one user's g (|g| <= c), rounded with the encoder's shared
    uniforms (the coupling floor(x s + U)), differ by at most the sensitivity the ledger charges (s c + sqrt(d));
    ``spread`` puts g in every coordinate (each may round the other way), else in one."""
    rng = np.random.default_rng(seed)
    encoder = secagg.MaskedSum(value_bound=60.0, max_clients=5).encoder
    x = rng.uniform(-50, 50, dim)
    g = rng.normal(size=dim) if spread else np.eye(dim)[0]
    g *= c / np.linalg.norm(g)
    a = encoder.quantize(x, rng=np.random.default_rng(seed))
    b = encoder.quantize(x + g, rng=np.random.default_rng(seed))
    bound = dp.SkellamNoise(noise_multiplier=1.0, clip_bound=c, dim=dim, min_clients=1).l2_sensitivity(scale=encoder.scale)
    assert float(np.linalg.norm((b - a).astype(np.float64))) <= bound


@given(seed=st.integers(0, 2**31 - 1), size=st.floats(0.1, 200.0))
@settings(max_examples=40, deadline=None)
def test_the_silos_clip_of_its_sum_moves_by_no_more_than_the_users_gradient(seed, size):
    """The report's claim that the pipeline's clip of a silo's sum is 1-Lipschitz: one user still moves it <= |g|."""
    rng = np.random.default_rng(seed)
    pipe = UpdatePipeline(clip=dp.L2Clip(20.0), weighting="uniform", user_bound=CLIP,
                          central_noise=dp.CentralGaussian(noise_multiplier=1.0, clip_bound=CLIP))  # fmt: skip
    pipe.build(dimension=50, num_clients=3, expected_clients=3)
    total = rng.normal(size=50) * size / np.sqrt(50)  # inside or far outside the silo's bound of 20
    g = rng.normal(size=50)
    g *= CLIP / np.linalg.norm(g)
    a = pipe.prepare(total.astype(np.float32), num_examples=1).astype(np.float64)
    b = pipe.prepare((total + g).astype(np.float32), num_examples=1).astype(np.float64)
    assert np.linalg.norm(b - a) <= CLIP * (1 + 1e-5)
