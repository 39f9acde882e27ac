"""User-level DP-SGD: per-user clipping of a user's summed gradient, user-owned rows, accounting."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dp

pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Optimal order is the")

D = 5


class Toy(nn.Module):
    """score = w . x + b_item[item] + b_user[user]; the user table is user-owned."""

    def __init__(self, users: int, items: int = 12) -> None:
        super().__init__()
        self.linear = nn.Linear(D, 1)
        self.item_bias = nn.Embedding(items, 1)
        self.user_bias = nn.Embedding(users, 1)

    def forward(self, user: torch.Tensor, x: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        # user (B,), x (B, N, D), item (B, N) -> scores (B, N)
        return self.linear(x).squeeze(-1) + self.item_bias(item).squeeze(-1) + self.user_bias(user)


class Grouped(torch.utils.data.Dataset):
    """One item per user: all of its examples, padded; ``mask`` marks the real ones."""

    def __init__(self, parent: Examples) -> None:
        self.parent = parent

    def __len__(self) -> int:
        return len(self.parent.of_user)

    def __getitem__(self, u: int) -> dict[str, torch.Tensor]:
        return self.batch([u])

    def batch(self, users: list[int]) -> dict[str, torch.Tensor]:
        p = self.parent
        longest = max([len(p.of_user[u]) for u in users], default=0)
        out = {"user": torch.tensor(users, dtype=torch.long), "x": torch.zeros(len(users), longest, D),
               "item": torch.zeros(len(users), longest, dtype=torch.long), "y": torch.zeros(len(users), longest),
               "mask": torch.zeros(len(users), longest)}  # fmt: skip
        for r, u in enumerate(users):
            idx = p.of_user[u]
            out["x"][r, : len(idx)] = p.x[idx]
            out["item"][r, : len(idx)] = p.item[idx]
            out["y"][r, : len(idx)] = p.y[idx]
            out["mask"][r, : len(idx)] = 1.0
        return out


class Examples(torch.utils.data.Dataset):
    """Examples of users with the given counts of examples; ``by_user`` groups them."""

    def __init__(self, counts: list[int], seed: int = 0, items: int = 12) -> None:
        g = torch.Generator().manual_seed(seed)
        n = sum(counts)
        self.owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        self.x = torch.randn(n, D, generator=g)
        self.item = torch.randint(0, items, (n,), generator=g)
        self.y = torch.randn(n, generator=g) * 3
        self.of_user = [torch.nonzero(self.owner == u).flatten() for u in range(len(counts))]

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int):
        return i

    def by_user(self) -> Grouped:
        return Grouped(self)


def collate(items):
    if isinstance(items[0], dict):
        keys = items[0].keys()
        longest = max(it["x"].shape[1] for it in items)

        def pad(t):
            return nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, longest - t.shape[1]))

        return {k: torch.cat([pad(it[k]) if it[k].dim() > 1 else it[k] for it in items]) for k in keys}
    return items


def per_user_loss(model: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    return (((model(b["user"], b["x"], b["item"]) - b["y"]) ** 2) * b["mask"]).sum(1)


def attach(
    model, data, *, z=1e-9, c=1.0, batch_size=None, lr=1.0, user_parameters=("user_bias",), clipping="auto", opt=None, **kw
):
    opt = opt or torch.optim.SGD(model.parameters(), lr=lr)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size or len(data), collate_fn=collate)
    cfg = dp.UserLevelDP(noise_multiplier=z, max_grad_norm=c, clipping=clipping, user_parameters=user_parameters, **kw)
    return cfg.attach(model, opt, loader, generator=torch.Generator().manual_seed(0))


def shared(model: Toy) -> torch.Tensor:
    return torch.cat([model.linear.weight.flatten(), model.linear.bias, model.item_bias.weight.flatten()]).detach().clone()


def reference(
    model: Toy, data: Examples, users: list[int], c: float, *, owned: bool
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """sum_u clip(sum_{i in u} grad l_i), example by example, the user table's gradient, the clip factors.

    ``owned``: the user table is user-owned (unclipped, outside the norm); else it is clipped with the rest.
    """
    params = [model.linear.weight, model.linear.bias, model.item_bias.weight, model.user_bias.weight]
    total = [torch.zeros_like(p) for p in params]
    factors = []
    for u in users:
        g_user = [torch.zeros_like(p) for p in params]
        for i in data.of_user[u].tolist():  # one example at a time
            loss = (model(torch.tensor([u]), data.x[i].view(1, 1, D), data.item[i].view(1, 1)) - data.y[i]) ** 2
            g_user = [a + b for a, b in zip(g_user, torch.autograd.grad(loss.sum(), params))]
        clipped = g_user[:-1] if owned else g_user
        norm = float(torch.cat([g.flatten() for g in clipped]).norm())
        factor = min(1.0, c / (norm + 1e-6))
        factors.append(factor)
        total = [t + g * (factor if (k < 3 or not owned) else 1.0) for k, (t, g) in enumerate(zip(total, g_user))]
    return torch.cat([t.flatten() for t in total[:-1]]), total[-1], factors


@pytest.mark.parametrize(
    "user_parameters,clipping", [(("user_bias",), "auto"), ((), "embedding"), ((), "default"), ((), "ghost")]
)
def test_per_user_gradient_is_the_clipped_sum_of_the_users_example_gradients(user_parameters, clipping):
    torch.manual_seed(0)
    data = Examples([1, 4, 9, 2, 30])
    model = Toy(users=5)
    users = [0, 1, 2, 3, 4]
    ref_shared, ref_user, factors = reference(model, data, users, c=5.0, owned=bool(user_parameters))
    assert min(factors) < 0.2 and max(factors) == 1.0  # the bound binds for heavy users only
    before, user_before = shared(model), model.user_bias.weight.detach().clone()
    private = attach(model, data, c=5.0, user_parameters=user_parameters, clipping=clipping)
    batch = data.by_user().batch(users)
    private.step(per_user_loss(private.module, batch))
    private.detach()
    expected = private.expected_batch_size
    assert expected == 5  # one step per epoch: every user sampled with probability 1
    torch.testing.assert_close(before - shared(model), ref_shared / expected, rtol=1e-4, atol=1e-6)
    # user-owned rows: the user's own gradient, neither clipped nor noised; else clipped with the rest
    torch.testing.assert_close(user_before - model.user_bias.weight, ref_user / expected, rtol=1e-4, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(count=st.integers(1, 400), scale=st.floats(0.1, 100.0), c=st.floats(0.05, 2.0))
def test_a_user_with_many_ratings_moves_the_shared_parameters_at_most_the_clip_bound(count, scale, c):
    torch.manual_seed(1)
    data = Examples([count, 1])
    data.y *= scale
    model = Toy(users=2)
    before = shared(model)
    private = attach(model, data, c=c)
    private.step(per_user_loss(private.module, data.by_user().batch([0])))  # the heavy user alone
    private.detach()
    moved = float((before - shared(model)).norm()) * private.expected_batch_size  # lr 1
    assert moved <= c * (1 + 1e-5) + 1e-6


def test_record_level_would_let_the_same_user_move_the_model_many_times_the_bound():
    # The adversarial counterpart: per-example clipping bounds each of the user's 50 ratings, not the user.
    torch.manual_seed(1)
    data = Examples([50, 1])
    model = Toy(users=2)
    grouped = data.by_user().batch([0])
    per_example = ((model(grouped["user"], grouped["x"], grouped["item"]) - grouped["y"]) ** 2)[0]  # (50,)
    params = [model.linear.weight, model.linear.bias, model.item_bias.weight]
    clipped = torch.zeros(sum(p.numel() for p in params))
    for i in range(50):
        g = torch.cat([t.flatten() for t in torch.autograd.grad(per_example[i], params, retain_graph=True)])
        clipped += g * min(1.0, 0.5 / (float(g.norm()) + 1e-6))
    assert float(clipped.norm()) > 5 * 0.5  # far above the user-level bound of 0.5


def test_rows_of_users_not_in_the_batch_never_move_even_under_heavy_noise():
    data = Examples([3, 3, 3, 3])
    model = Toy(users=4)
    rows = model.user_bias.weight.detach().clone()
    lin = model.linear.weight.detach().clone()
    private = attach(model, data, z=50.0, user_parameters=("user_bias",))
    private.step(per_user_loss(private.module, data.by_user().batch([1, 2])))
    private.detach()
    after = model.user_bias.weight.detach()
    assert torch.equal(after[[0, 3]], rows[[0, 3]])  # no noise on user-owned rows
    assert not torch.equal(after[[1, 2]], rows[[1, 2]])
    assert float((model.linear.weight.detach() - lin).abs().max()) > 1.0  # the shared part got the (large) noise


def test_accounting_uses_the_user_sampling_rate_and_says_the_unit_is_a_user():
    counts = [int(n) for n in np.random.default_rng(0).integers(1, 60, size=40)]
    data = Examples(counts)
    model = Toy(users=40)
    batch_size = len(data) // 4 + 1  # 4 batches of examples -> q = 1/4 over the 40 users
    private = attach(model, data, z=1.0, batch_size=batch_size)
    assert private.sample_rate == pytest.approx(0.25) and private.expected_batch_size == 10 and private.users == 40
    sizes = []
    for b in private.data_loader:  # Poisson batches of users, each user's examples whole
        sizes.append(int(b["user"].numel()))
        assert sorted(b["mask"].sum(1).tolist()) == sorted(counts[u] for u in b["user"].tolist())
        private.step(per_user_loss(private.module, b))
    assert len(sizes) == 4 and len(set(sizes)) > 1
    event = private.event(client_id="silo", round_index=0)
    private.detach()
    assert event.unit == "user" and event.level == "sample" and event.steps == 4 and event.sample_rate == pytest.approx(0.25)
    assert dp.UserLevelDP.unit == "user"
    same = dp.SampleLevelEvent(client_id="silo", round_index=0, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25,
                               steps=4, clipping=event.clipping)  # fmt: skip
    eps = dp.sample_level_epsilons([event], delta=1e-5)["silo"]
    assert eps == pytest.approx(dp.sample_level_epsilons([same], delta=1e-5)["silo"])
    assert dp.event_from_dict(dp.event_to_dict(event)) == event
    # the per-record rate of the same loader would be 1/4 as well, but over the examples, not the people:
    assert len(private.data_loader.dataset) == 40


def test_detach_leaves_a_clean_module():
    data = Examples([2, 3])
    model = Toy(users=2)
    keys = set(model.state_dict())
    private = attach(model, data)
    private.step(per_user_loss(private.module, data.by_user().batch([0, 1])))
    out = private.detach()
    assert out is model and set(model.state_dict()) == keys
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    again = attach(copy.deepcopy(model), data)  # attachable again
    again.detach()


def test_bad_inputs_name_the_parameter_and_the_value():
    data = Examples([2, 3, 1])
    with pytest.raises(dp.DPTypeError, match="user_parameters must be a tuple of submodule names, got 'user_bias'"):
        dp.UserLevelDP(noise_multiplier=1.0, max_grad_norm=1.0, user_parameters="user_bias")
    flat = torch.utils.data.TensorDataset(torch.zeros(4, D))
    with pytest.raises(dp.DPTypeError, match=r"needs data_loader.dataset to have by_user\(\).*got TensorDataset"):
        attach(Toy(users=3), flat)
    with pytest.raises(
        dp.DPValueError, match="each of the 3 users with probability 1/len\\(data_loader\\) = 1/6: fewer than one user"
    ):
        attach(Toy(users=3), data, batch_size=1)
    with pytest.raises(dp.DPValueError, match="user_parameters entry 'linear' must name an nn.Embedding of module, got Linear"):
        attach(Toy(users=3), data, user_parameters=("linear",))
    with pytest.raises(dp.DPValueError, match="user_parameters entry 'nope' must name an nn.Embedding of module, got no such"):
        attach(Toy(users=3), data, user_parameters=("nope",))
    with pytest.raises(dp.DPValueError, match="need clipping 'embedding', but clipping='ghost' resolves to 'ghost'"):
        attach(Toy(users=3), data, clipping="ghost")
    model = Toy(users=3)
    with pytest.raises(dp.DPValueError, match="optimizer known to update each element on its own.*got LBFGS"):
        attach(model, data, opt=torch.optim.LBFGS(model.parameters()))  # couples every coordinate
    assert all(p.requires_grad for p in model.parameters())  # a refused attach leaves nothing frozen


def test_a_user_row_read_by_another_users_examples_is_refused():
    data = Examples([2, 3, 1])
    model = Toy(users=3)
    private = attach(model, data)
    b = data.by_user().batch([0, 1])
    b["user"] = torch.tensor([1, 1])  # user 0's examples would train user 1's row
    with pytest.raises(dp.DPValueError, match=r"user parameter 'user_bias' must read one distinct row per user"):
        private.step(per_user_loss(private.module, b))
    private.detach()


def test_an_empty_poisson_batch_keeps_the_grouped_format_and_adds_noise_only():
    class Fetching(Grouped):
        def __getitems__(self, users):
            return [self.batch(list(users))]

    class Data(Examples):
        def by_user(self):
            return Fetching(self)

    data = Data([2, 2, 2])
    model = Toy(users=3)
    private = attach(model, data, z=1.0, batch_size=2)  # 3 steps, q = 1/3: P(empty) = 8/27 per step
    shapes = []
    for _ in range(10):
        for b in private.data_loader:
            assert isinstance(b, dict) and set(b) == {"user", "x", "item", "y", "mask"}
            shapes.append(b["user"].shape[0])
            private.step(per_user_loss(private.module, b))
    private.detach()
    assert 0 in shapes and private.steps == len(shapes) == 30


@given(counts=st.lists(st.integers(1, 6), min_size=2, max_size=6), c=st.floats(0.05, 5.0))
@settings(max_examples=15, deadline=None)
def test_clipped_user_gradients_are_the_per_user_loop_and_one_user_moves_their_sum_by_at_most_the_bound(counts, c):
    """User-level DP across silos: the silo's sum is the example-by-example reference, and removing a user moves it <= c."""
    torch.manual_seed(0)
    data, model = Examples(counts), Toy(len(counts))
    grouped, users = data.by_user(), list(range(len(counts)))

    def silo_sum(members: list[int]) -> tuple[torch.Tensor, dict]:
        sums, own = dp.clipped_user_gradients(
            model, lambda m: per_user_loss(m, grouped.batch(members)), max_grad_norm=c, user_parameters=("user_bias",)
        )
        assert set(sums) == {"linear.weight", "linear.bias", "item_bias.weight"}  # the user table is not clipped
        return torch.cat([sums[n].flatten() for n in ("linear.weight", "linear.bias", "item_bias.weight")]), own

    got, own = silo_sum(users)
    want, want_own, _ = reference(model, data, users, c, owned=True)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(own["user_bias"], want_own, atol=1e-5)
    for gone in users:  # the neighbouring silo without one user
        fewer, fewer_own = silo_sum([u for u in users if u != gone])
        assert float((got - fewer).norm()) <= c * (1 + 1e-5)
        kept = [u for u in users if u != gone]
        assert torch.allclose(fewer_own["user_bias"][kept], own["user_bias"][kept], atol=1e-6)  # others' rows: their own data
    assert all(p.grad is None for p in model.parameters()) and not any(m._forward_hooks for m in model.modules())


def test_clipped_user_gradients_refuse_what_would_break_the_bound():
    torch.manual_seed(0)
    data, model = Examples([2, 3, 1]), Toy(3)
    grouped = data.by_user()
    with pytest.raises(dp.DPValueError, match="max_grad_norm must be > 0"):
        dp.clipped_user_gradients(model, lambda m: per_user_loss(m, grouped.batch([0, 1])), max_grad_norm=0.0)
    with pytest.raises(dp.DPValueError, match=r"one loss per user, shape \(U,\), got \(\)"):
        dp.clipped_user_gradients(model, lambda m: per_user_loss(m, grouped.batch([0, 1])).sum(), max_grad_norm=1.0)
    with pytest.raises(dp.DPValueError, match="user parameter 'user_bias' must read one distinct row per user"):
        dp.clipped_user_gradients(
            model, lambda m: per_user_loss(m, grouped.batch([1, 1])), max_grad_norm=1.0, user_parameters=("user_bias",)
        )
    with pytest.raises(dp.DPValueError, match="user_parameters entry 'linear' must name an nn.Embedding"):
        dp.clipped_user_gradients(
            model, lambda m: per_user_loss(m, grouped.batch([0])), max_grad_norm=1.0, user_parameters=("linear",)
        )
    assert all(p.requires_grad for p in model.parameters()) and not any(m._forward_hooks for m in model.modules())
