import json
import re

import numpy as np
import pytest
import torch

import dp
from fedcore import (
    ConfigError,
    DropoutSimulator,
    FedAdam,
    FedAvg,
    Federation,
    FedSGD,
    JsonlLogger,
    ModelSelection,
    OutputEnsemble,
    PoissonSampler,
    RoundFailedError,
    TensorBoardLogger,
    TrainConfig,
    UpdatePipeline,
)
from fedcore.rounds.checkpoint import load_checkpoint
from fedcore.rounds.client import ClientResult
from secagg import DropoutError, PlaintextSum

from .toy import ToyTask, run_pipeline, toy_clients

TRAIN = TrainConfig(lr=0.05, epochs=1, batch_size=8)


def _federation(**kwargs):
    defaults = dict(task=ToyTask(), clients=toy_clients(4), strategy=FedAvg(), train=TRAIN, seed=7, reproducible=True, quiet=True)
    defaults.update(kwargs)
    return Federation(**defaults)


def test_fedavg_learns_and_records_history():
    fed = _federation()
    before = fed.evaluate()["accuracy"]
    history = fed.run(5)
    assert len(history) == 5 and history[-1]["round"] == 5
    assert history[-1]["participants"] == 4 and history[-1]["contributors"] == 4
    assert history[-1]["test_accuracy"] > before
    assert history[-1]["test_accuracy"] >= 0.8


def test_same_seed_same_model_different_seed_different_model():
    a, b, c = _federation(), _federation(), _federation(seed=8)
    for fed in (a, b, c):
        fed.run(3)
    assert np.array_equal(a.global_vector, b.global_vector)
    assert not np.array_equal(a.global_vector, c.global_vector)


def test_by_default_client_randomness_is_fresh_on_every_run_whatever_the_seed():
    """Not a simulation: the seed (written to summary.json) does not determine what clients drew."""
    a, b = _federation(reproducible=False), _federation(reproducible=False)
    assert not a.randomness.reproducible
    for fed in (a, b):
        fed.run(2)
    assert not np.array_equal(a.global_vector, b.global_vector)


def test_resume_after_kill_is_bit_for_bit(tmp_path):
    kwargs = dict(strategy=FedAdam(lr=0.05), sampler=PoissonSampler(q=0.6), checkpoint_dir=tmp_path / "ckpt")
    full = _federation(strategy=FedAdam(lr=0.05), sampler=PoissonSampler(q=0.6))
    full.run(6)
    first = _federation(**kwargs)
    first.run(3)  # "killed" here: only the checkpoint survives
    resumed = _federation(**kwargs)
    resumed.restore(tmp_path / "ckpt")
    assert resumed.round_index == 3
    resumed.run(6)
    assert np.array_equal(full.global_vector, resumed.global_vector)
    for cid in full.clients:
        for name, value in full.clients[cid].local_state.items():
            assert torch.equal(value, resumed.clients[cid].local_state[name])
    assert [h["participants"] for h in full.history] == [h["participants"] for h in resumed.history]


def test_restore_refuses_another_seed(tmp_path):
    fed = _federation(checkpoint_dir=tmp_path / "c")
    fed.run(1)
    with pytest.raises(ConfigError, match="checkpoint seed 7 differs from this federation's seed 9"):
        _federation(seed=9).restore(tmp_path / "c")


def test_local_only_parameters_never_leave_the_client():
    fed = _federation(record_inbox=True)
    fed.run(2)
    updates = [r for r in fed.channel.inbox if r.data[:4] == b"PFPT"]  # plaintext update messages
    assert len(updates) == 8
    # 27-byte header for a 6-character id, then the shared parameters and the weight, float32
    assert all(len(r.data) == 16 + len(r.sender) + 9 + 4 * (fed.layout.size + 1) for r in updates)
    assert "private_offset" not in fed.layout.names
    offsets = {cid: float(c.local_state["private_offset"]) for cid, c in fed.clients.items()}
    assert len(set(offsets.values())) == 4  # each client kept its own


def test_examples_weighting_matches_manual_weighted_mean():
    pipe = UpdatePipeline(max_examples=100)
    pipe.build(dimension=2, num_clients=2, expected_clients=2)
    results = [
        ClientResult("a", np.array([1.0, 0.0], np.float32), 30),
        ClientResult("b", np.array([0.0, 1.0], np.float32), 90),
    ]
    out = run_pipeline(pipe, results, round_index=1, rng=np.random.default_rng(0))
    np.testing.assert_allclose(out.aggregate.mean, [0.25, 0.75], rtol=1e-6)


def test_claimed_examples_are_capped_at_the_weight_bound():
    pipe = UpdatePipeline(max_examples=10)
    pipe.build(dimension=1, num_clients=2, expected_clients=2)
    results = [ClientResult("a", np.array([1.0], np.float32), 10), ClientResult("liar", np.array([0.0], np.float32), 10**9)]
    out = run_pipeline(pipe, results, round_index=1, rng=np.random.default_rng(0))
    np.testing.assert_allclose(out.aggregate.mean, [0.5])


def test_pipeline_refuses_protection_without_a_bound():
    class FakeMasked(PlaintextSum):
        mode = "masked"

    pipe = UpdatePipeline(backend=FakeMasked(), max_examples=10)
    with pytest.raises(ConfigError, match="aggregation mode 'masked' needs a bound on every coordinate"):
        pipe.build(dimension=3, num_clients=2, expected_clients=2)


def test_pipeline_must_be_built_and_weighting_known():
    with pytest.raises(ConfigError, match="weighting must be one of"):
        UpdatePipeline(weighting="size")
    with pytest.raises(ConfigError, match="call UpdatePipeline.build"):
        UpdatePipeline(max_examples=1).prepare(np.zeros(1, np.float32), num_examples=1)


def test_a_round_that_fails_after_its_updates_left_changes_no_model_but_is_charged_and_uses_its_number(tmp_path):
    """The failure comes after the clients' inputs reached the server (here: at the unmasking), so they may have
    been seen: the round is charged at its planned worst case, and a retry runs under a new number."""

    class Failing(PlaintextSum):
        def server_session(self, **kw):
            session = super().server_session(**kw)

            def finish():
                raise DropoutError("only 1 of 4 clients survived; threshold is 3")

            session.finish = finish
            return session

    privacy = dp.SampleLevelDP(noise_multiplier=1.0, max_grad_norm=1.0)
    fed = _federation(strategy=FedAdam(lr=0.05), checkpoint_dir=tmp_path / "ck", sample_privacy=privacy, ledger=dp.Ledger())
    fed.run(2)
    vector, state, events = fed.global_vector.copy(), fed.strategy.state_dict(), len(fed.ledger.events)
    backend = fed.pipeline.backend
    fed.pipeline.backend = Failing()
    with pytest.raises(RoundFailedError, match="round 3 failed and changed nothing: only 1 of 4"):
        fed.run_round()
    assert np.array_equal(fed.global_vector, vector)
    assert all(np.array_equal(state[k], fed.strategy.state_dict()[k]) for k in state)
    assert fed.round_index == 3 and fed.history[-1]["interrupted"] is True and "only 1 of 4" in fed.history[-1]["error"]
    assert {e.round_index for e in fed.ledger.events[events:]} == {3} and len(fed.ledger.events) == events + 4
    assert load_checkpoint(tmp_path / "ck").round_index == 3 and not (tmp_path / "ck.begun.json").exists()
    fed.pipeline.backend = backend
    assert fed.run_round()["round"] == 4


def test_a_round_interrupted_in_a_notebook_after_its_updates_left_is_charged_without_any_checkpoint():
    class Stop(BaseException):
        pass

    fed = _federation(sample_privacy=dp.SampleLevelDP(noise_multiplier=1.0, max_grad_norm=1.0), ledger=dp.Ledger())
    fed.run(1)
    apply = fed.strategy.apply
    fed.strategy.apply = lambda vector, aggregate: (_ for _ in ()).throw(Stop())  # the user presses stop
    with pytest.raises(Stop):
        fed.run_round()
    fed.strategy.apply = apply
    fed.run(3)
    assert [h["round"] for h in fed.history] == [1, 2, 3] and fed.history[1]["interrupted"] is True
    assert sorted(e.round_index for e in fed.ledger.events) == [1] * 4 + [2] * 4 + [3] * 4


def test_revealing_strategies_need_consent_and_plaintext():
    with pytest.raises(ConfigError, match="reveals individual local models.*allow_reveal=True"):
        _federation(strategy=ModelSelection(metric="accuracy"))
    fed = _federation(strategy=ModelSelection(metric="accuracy"), allow_reveal=True)
    fed.run(2)
    assert len(fed.reveals) == 2 and fed.reveals[0].round_index == 1
    assert fed.strategy.last_selected in fed.clients


def test_output_ensemble_runs_and_records_reveals():
    fed = _federation(strategy=OutputEnsemble(), allow_reveal=True)
    fed.run(1)
    assert len(fed.strategy.members()) == 4
    assert fed.reveals[0].client_ids == tuple(sorted(fed.clients))


def test_fedsgd_uses_gradients():
    fed = _federation(strategy=FedSGD(lr=1.0))
    before = fed.evaluate()["loss"]
    fed.run(5)
    assert fed.evaluate()["loss"] < before


def test_dropouts_are_drawn_and_excluded():
    fed = _federation(dropouts=DropoutSimulator(rate=0.5))
    fed.run(4)
    assert sum(h["dropped"] for h in fed.history) > 0
    for h in fed.history:
        assert h["participants"] - h["dropped"] <= h["contributors"] <= h["participants"]


def test_loggers_write_jsonl_and_tensorboard(tmp_path):
    jsonl = JsonlLogger(tmp_path / "metrics.jsonl")
    fed = _federation(logger=jsonl)
    fed.run(2)
    jsonl.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and "test_accuracy" in rows[0]
    tb = TensorBoardLogger(tmp_path / "tb")
    tb.log(1, {"test_accuracy": 0.5, "note": "ignored"})
    tb.close()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def test_bad_federation_settings():
    with pytest.raises(ConfigError, match="clients must hold at least one client"):
        _federation(clients={})
    with pytest.raises(ConfigError, match="evaluate_every must be >= 0"):
        _federation(evaluate_every=-1)
    with pytest.raises(ConfigError, match="on_budget must be 'stop' or 'raise'"):
        _federation().run(1, on_budget="ignore")
    with pytest.raises(ConfigError, match=r"dropout rate must be in \[0, 1\), got 1.0"):
        DropoutSimulator(rate=1.0)


def test_sample_level_dp_that_cannot_attach_is_refused_before_any_round():
    import dp

    lazy = dp.SampleLevelDP(noise_multiplier=1.0, max_grad_norm=1.0, lazy_noise=True)
    with pytest.raises(ConfigError, match="sample-level DP cannot train this model with these settings: lazy_noise=True needs"):
        _federation(sample_privacy=lazy, train=TrainConfig(optimizer="adam", lr=0.05, batch_size=8))
    fed = _federation(sample_privacy=dp.SampleLevelDP(noise_multiplier=1.0, max_grad_norm=1.0))
    assert fed.run_round()["contributors"] == 4  # the check left the model and its hooks as they were


class _Flaky(ToyTask):
    """A task whose loss raises for the named clients' data (a client crashing mid-round)."""

    def __init__(self, bad_sizes):
        super().__init__()
        self.bad_sizes = bad_sizes

    def loss(self, model, batch):
        x, _ = batch
        if x.shape[0] in self.bad_sizes:
            raise RuntimeError("disk on fire")
        return super().loss(model, batch)


def test_a_client_that_raises_is_a_dropout():
    # client-1 holds 45 examples: a full-batch size no other client has
    fed = _federation(task=_Flaky({45}), train=TrainConfig(lr=0.05, batch_size=64))
    record = fed.run_round()
    assert record["failed"] == 1 and record["contributors"] == 3 and record["dropped"] == 1


def test_a_round_where_every_client_fails_changes_nothing():
    fed = _federation(task=_Flaky({40, 45, 50, 55}), train=TrainConfig(lr=0.05, batch_size=64))
    vector = fed.global_vector.copy()
    with pytest.raises(RoundFailedError, match="every participant failed.*disk on fire"):
        fed.run_round()
    assert np.array_equal(fed.global_vector, vector) and fed.round_index == 0


def test_clients_past_the_deadline_are_dropped():
    fed = _federation(client_deadline=1e-9)
    with pytest.raises(
        RoundFailedError, match=r"round 1: every participant failed or dropped; first failure: client-0: missed the deadline"
    ):
        fed.run_round()  # everyone is late
    with pytest.raises(ConfigError, match="client_deadline must be > 0 seconds or None, got 0"):
        _federation(client_deadline=0)


def test_client_updates_show_the_next_rounds_raw_updates_and_change_nothing():
    fed, twin = _federation(), _federation()
    fed.run(1)
    twin.run(1)
    states = {c: {k: v.clone() for k, v in fed.clients[c].local_state.items()} for c in fed.client_ids}
    assert [r.client_id for r in fed.client_updates(["client-2", "client-0"])] == ["client-2", "client-0"]
    results = fed.client_updates()
    assert fed.round_index == 1 and len(fed.history) == 1
    for c in fed.client_ids:
        assert all(torch.equal(v, states[c][k]) for k, v in fed.clients[c].local_state.items())
    # the next round runs exactly as if nobody had looked, and averages these very updates
    before = fed.global_vector.copy()
    fed.run_round()
    twin.run_round()
    assert np.array_equal(fed.global_vector, twin.global_vector)
    weights = np.array([r.num_examples for r in results], dtype=np.float64)
    mean = np.sum([w * r.update for w, r in zip(weights, results)], axis=0) / weights.sum()
    assert np.allclose(fed.global_vector, before + mean, atol=1e-6)
    with pytest.raises(ConfigError, match=re.escape("client_ids must name clients of this federation, got unknown ['nobody']")):
        fed.client_updates(["nobody"])


def test_checkpoint_keeps_local_state_with_each_client_and_refuses_edits(tmp_path):
    fed = _federation(checkpoint_dir=tmp_path / "ckpt")
    fed.run(1)
    server_files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert server_files == ["global.npy", "state.json", "strategy.npz"]
    assert "private_offset" not in (tmp_path / "ckpt" / "state.json").read_text()
    owned = sorted(p.name for p in Federation.client_folder(tmp_path / "ckpt").iterdir())
    assert owned == [f"client-{i}.npz" for i in range(4)]
    vector = np.load(tmp_path / "ckpt" / "global.npy")
    np.save(tmp_path / "ckpt" / "global.npy", vector + 1)
    with pytest.raises(ConfigError, match=r"global.npy' does not match the SHA-256 in state.json"):
        _federation().restore(tmp_path / "ckpt")


def test_resume_that_changes_the_protection_is_refused(tmp_path):
    from secagg import MaskedSum

    fed = _federation(checkpoint_dir=tmp_path / "ckpt")
    fed.run(1)
    masked = UpdatePipeline(backend=MaskedSum(value_bound=1.0, max_clients=4), clip=dp.L2Clip(1.0), max_examples=100)
    with pytest.raises(ConfigError, match="a resumed run must keep the protection and privacy settings"):
        _federation(pipeline=masked).restore(tmp_path / "ckpt")


def test_sample_level_dp_refuses_a_scalar_loss_at_construction():
    class ScalarLoss(ToyTask):
        def loss(self, model, batch):
            return super().loss(model, batch).mean()

    privacy = dp.SampleLevelDP(noise_multiplier=1.0, max_grad_norm=1.0)
    with pytest.raises(ConfigError, match=r"task.loss to return one loss per example \(a 1-D tensor\), got \(\)"):
        _federation(task=ScalarLoss(), sample_privacy=privacy)


def test_unknown_config_key_suggests_the_closest_one():
    from fedcore.experiments.config import parse_config

    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['lrr'\] in \[train\] \(did you mean 'lr'\?\)"):
        parse_config({"train": {"lrr": 0.1}})


def test_run_prints_one_line_per_round_unless_quiet(capsys):
    fed = _federation(quiet=False)
    fed.run(2)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    for t, line in enumerate(lines, start=1):
        assert re.fullmatch(rf"round {t}/2 \(\d+\.\d+s\)  test_accuracy=\d\.\d{{4}}  test_loss=\d+\.\d{{4}}", line), line
    assert f"test_accuracy={fed.history[1]['test_accuracy']:.4f}" in lines[1]
    _federation(quiet=True).run(2)
    assert capsys.readouterr().out == ""


class _Crash(BaseException):
    """The server process dying mid-round (not an Exception: nothing may catch it on the way)."""


def _crash_in_round(tmp_path, crash_round: int) -> tuple[Federation, dp.Ledger]:
    """A DP run checkpointed each round whose server dies in round ``crash_round``, after it received the sum.

    A kill runs no handler: the disk as it was at that moment (copied to ``tmp_path / "disk"``) is what a
    resumed server finds.
    """
    import shutil

    privacy = dp.SampleLevelDP(noise_multiplier=1.0, max_grad_norm=1.0)
    fed = _federation(sample_privacy=privacy, ledger=dp.Ledger(), checkpoint_dir=tmp_path / "run" / "ck")
    apply = fed.strategy.apply

    def apply_or_die(vector, aggregate):
        if fed.round_index + 1 == crash_round:
            shutil.copytree(tmp_path / "run", tmp_path / "disk")
            raise _Crash()
        return apply(vector, aggregate)

    fed.strategy.apply = apply_or_die
    with pytest.raises(_Crash):
        fed.run(crash_round)
    resumed = _federation(sample_privacy=privacy, ledger=dp.Ledger(), checkpoint_dir=tmp_path / "disk" / "ck")
    resumed.restore(tmp_path / "disk" / "ck")
    return resumed, fed.ledger


def test_a_round_interrupted_by_a_crash_is_charged_on_resume_and_not_run_again_under_its_number(tmp_path):
    """The attack: a server that dies after its clients released round 3, then resumes, must not get round 3 for free."""
    resumed, _ = _crash_in_round(tmp_path, 3)
    charged = [e for e in resumed.ledger.events if e.round_index == 3]
    assert len(charged) == 4  # every participant's planned DP-SGD run of round 3, though round 3 never finished
    assert resumed.round_index == 3 and resumed.history[-1]["interrupted"] is True
    # each client's own ledger came back from its disk, with the round 3 update it released before the crash
    assert all({e.round_index for e in resumed.client_side.spent[cid].events} == {1, 2, 3} for cid in resumed.clients)
    resumed.run(4)
    assert [h["round"] for h in resumed.history] == [1, 2, 3, 4]
    assert sorted({e.round_index for e in resumed.ledger.events}) == [1, 2, 3, 4]
    assert not (tmp_path / "disk" / "ck.begun.json").exists()
    # each client's spend covers four rounds of DP-SGD, more than the three that finished
    finished = [e for e in resumed.ledger.events if e.round_index != 3]
    spent = dp.sample_level_epsilons(resumed.ledger, delta=1e-5)
    without = dp.sample_level_epsilons(finished, delta=1e-5)
    assert all(spent[cid] > without[cid] > 0 for cid in spent)


def test_a_finished_round_leaves_no_write_ahead_record_and_a_second_restore_charges_nothing_again(tmp_path):
    resumed, _ = _crash_in_round(tmp_path, 2)
    events = len(resumed.ledger.events)
    again = _federation(
        sample_privacy=dp.SampleLevelDP(noise_multiplier=1.0, max_grad_norm=1.0),
        ledger=dp.Ledger(),
        checkpoint_dir=tmp_path / "disk" / "ck",
    )
    again.restore(tmp_path / "disk" / "ck")  # a second crash right after the first resume
    assert len(again.ledger.events) == events and again.round_index == 2
    fed = _federation(checkpoint_dir=tmp_path / "plain")
    fed.run(2)
    assert not (tmp_path / "plain.begun.json").exists()


def _lying_server_spend(client_budgets: bool) -> tuple[dict[str, float], float, list[str]]:
    """An honest run up to its sample-level budget, then the server forgets (model, round number, ledger, budget)
    and asks the same client parties again, as a server restoring an earlier checkpoint on purpose would.

    Returns each client's epsilon over every update the server used in both runs (from the server's own
    ledgers, built from the clients' reports), the budget, and the errors of the rounds that failed.
    """
    privacy = dp.SampleLevelDP(noise_multiplier=1.0, max_grad_norm=1.0)
    probe = _federation(sample_privacy=privacy, ledger=dp.Ledger())
    probe.run(2)
    limit = 1.0001 * max(dp.sample_level_epsilons(probe.ledger, delta=1e-5).values())  # two rounds fit every client
    budget = dp.PrivacyBudget(epsilon=limit, delta=1e-5, level="sample")
    # fresh client randomness: every round asked again is a new noise draw, not a replay of the first
    fed = _federation(sample_privacy=privacy, ledger=dp.Ledger(), budget=budget, reproducible=False)
    if not client_budgets:
        fed.client_side.budget = None
    start = fed.global_vector.copy()
    with pytest.warns(UserWarning, match="training stopped"):
        fed.run(10)  # the honest server stops at its budget
    honest = list(fed.ledger.events)
    fed.global_vector, fed.round_index, fed.ledger, fed.budget, fed.history = start.copy(), 0, dp.Ledger(), None, []
    errors = []
    for _ in range(4):
        try:
            fed.run_round()
        except RoundFailedError as exc:
            errors.append(str(exc))
    spent = dp.sample_level_epsilons(honest + list(fed.ledger.events), delta=1e-5)
    if client_budgets:  # a refusal comes before training: no update, no metrics of a fresh run
        report = fed.train_clients(fed.round_index + 1, ["client-0"], version=fed.round_index)["client-0"]
        assert (report["ok"], report["budget_refused"], report["metrics"], report["steps"]) == (False, True, {}, 0)
    return spent, limit, errors


def test_a_server_that_forgets_its_ledger_and_asks_again_gets_no_more_than_each_clients_budget():
    spent, limit, errors = _lying_server_spend(client_budgets=True)
    assert spent and all(eps <= limit for eps in spent.values()), (spent, limit)
    assert errors and "refused by the client" in errors[0] and "budget" in errors[0]


def test_without_the_clients_own_budgets_the_same_lying_server_gets_more():
    """The positive control: the attack above works when clients keep no account of their own."""
    spent, limit, errors = _lying_server_spend(client_budgets=False)
    assert not errors and max(spent.values()) > 1.5 * limit


def test_restoring_an_older_copy_does_not_roll_back_a_clients_own_ledger(tmp_path):
    """The attack: the server keeps a copy of round 1's folders and restores it after round 3 on purpose."""
    import shutil

    fed = _federation(
        sample_privacy=dp.SampleLevelDP(noise_multiplier=1.0, max_grad_norm=1.0),
        ledger=dp.Ledger(),
        checkpoint_dir=tmp_path / "ck",
    )
    fed.run(1)
    for name in ("ck", "ck-clients"):
        shutil.copytree(tmp_path / name, tmp_path / name.replace("ck", "old"))
    fed.run(3)
    fed.restore(tmp_path / "old")
    assert fed.round_index == 1 and len(fed.ledger.events) == 4  # the server forgot rounds 2 and 3
    assert all({e.round_index for e in fed.client_side.spent[cid].events} == {1, 2, 3} for cid in fed.clients)


def test_a_clients_ledger_file_is_read_as_a_multiset(tmp_path):
    """A round the client released twice (a server that asked again) stays two releases after a restart."""
    from fedcore.rounds.checkpoint import save_client_ledger

    fed = _federation(sample_privacy=dp.SampleLevelDP(noise_multiplier=1.0, max_grad_norm=1.0), ledger=dp.Ledger())
    event = dp.SampleLevelEvent(
        client_id="client-0", round_index=2, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, steps=3
    )
    twice = dp.Ledger()
    twice.record(event)
    twice.record(event)
    save_client_ledger(tmp_path, "client-0", twice.to_json())
    fed.client_side.spent["client-0"].record(event)  # already holds one of them
    fed.client_side.load_states(tmp_path)
    assert fed.client_side.spent["client-0"].events == (event, event)


def test_a_crash_in_the_first_round_is_resumed_and_charged(tmp_path):
    """No round had finished, so there was no checkpoint: the first release writes one of the starting state."""
    resumed, _ = _crash_in_round(tmp_path, 1)
    assert resumed.round_index == 1 and sorted({e.round_index for e in resumed.ledger.events}) == [1]
    resumed.run(2)
    assert sorted({e.round_index for e in resumed.ledger.events}) == [1, 2]


def test_a_server_restarted_on_the_clients_disk_without_restoring_gets_no_more_updates(tmp_path):
    """The attack: a new server (and freshly started client parties) on the same disk, that never restores."""
    privacy = dp.SampleLevelDP(noise_multiplier=1.0, max_grad_norm=1.0)
    probe = _federation(sample_privacy=privacy, ledger=dp.Ledger())
    probe.run(2)
    limit = 1.0001 * max(dp.sample_level_epsilons(probe.ledger, delta=1e-5).values())
    budget = dp.PrivacyBudget(epsilon=limit, delta=1e-5, level="sample")
    first = _federation(sample_privacy=privacy, ledger=dp.Ledger(), budget=budget, checkpoint_dir=tmp_path / "ck")
    with pytest.warns(UserWarning, match="training stopped"):
        first.run(10)
    again = _federation(sample_privacy=privacy, ledger=dp.Ledger(), budget=budget, checkpoint_dir=tmp_path / "ck")
    again.budget = None  # the new server ignores any budget
    assert all(len(again.client_side.spent[c].events) == len(first.client_side.spent[c].events) > 0 for c in again.clients)
    with pytest.raises(RoundFailedError, match="refused by the client"):
        again.run_round()


def test_two_federations_on_one_disk_never_shorten_a_clients_ledger_file(tmp_path):
    """A notebook cell run twice: two live client-party objects write the same clients' files."""
    from fedcore.rounds.checkpoint import load_client_ledgers

    privacy = dp.SampleLevelDP(noise_multiplier=1.0, max_grad_norm=1.0)
    first = _federation(sample_privacy=privacy, ledger=dp.Ledger(), checkpoint_dir=tmp_path / "ck")
    second = _federation(sample_privacy=privacy, ledger=dp.Ledger(), checkpoint_dir=tmp_path / "ck")
    first.run(2)
    second.run(1)
    files = load_client_ledgers(tmp_path / "ck-clients")
    assert {cid: len(dp.Ledger.from_json(text).events) for cid, text in files.items()} == {c: 3 for c in first.clients}
