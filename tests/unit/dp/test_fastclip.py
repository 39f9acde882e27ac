"""Our one-pass per-sample clipping equals the reference per-sample computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import dp
from dp import _fastclip
from dp._fastclip import BookKeepingClipper

from .models import MF

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def reference(model: nn.Module, loss_of, batch: int, bound: float):
    """Explicit per-sample loop: autograd per sample, clip with Opacus's formula, sum."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(batch):
        grads = torch.autograd.grad(loss_of(i).sum(), params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
        n = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
        norms.append(n)
        c = min(1.0, bound / (float(n) + 1e-6))
        for t, g in zip(total, grads):
            t += c * g
    return dict(zip(params, total)), torch.stack(norms).float()


class Mixed(nn.Module):
    """Embedding (padding_idx, reused), EmbeddingBag (2-D mean, 1-D + offsets sum with weights),
    Linear on 3-D input, LayerNorm (through Opacus's grad sampler)."""

    def __init__(self, include_last_offset: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6, padding_idx=0)
        self.bag = nn.EmbeddingBag(15, 6, mode="mean", padding_idx=1)
        self.bag2 = nn.EmbeddingBag(15, 6, mode="sum", include_last_offset=include_last_offset)
        self.lin = nn.Linear(6, 5)
        self.ln = nn.LayerNorm(5)
        self.out = nn.Linear(5, 1)

    def forward(self, seq, bag, flat, offsets, weights):
        h = self.emb(seq) + self.emb(seq[:, :1])
        z = self.ln(torch.tanh(self.lin(h)))
        return self.out(z).squeeze(-1).sum(1) + (self.bag(bag) * self.bag2(flat, offsets, per_sample_weights=weights)).sum(-1)


def mixed_batch(batch: int, length: int, include_last_offset: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, 20, (batch, length), generator=g)
    seq[:, 1] = 0  # padding positions
    if length > 3:
        seq[:, 2] = seq[:, 3]  # duplicate rows within a sample
    bag = torch.randint(0, 15, (batch, 4), generator=g)
    bag[:, 0] = 1
    bag[:, 2] = bag[:, 3]
    lens = torch.randint(0, 4, (batch,), generator=g)
    flat = torch.randint(0, 15, (int(lens.sum()),), generator=g)
    weights = torch.rand(int(lens.sum()), generator=g)
    y = torch.randn(batch, generator=g)
    return seq, bag, lens, flat, weights, y


# positions per sample (the table is also called on the first position): Gram (<= 32) and sort
# paths; the one-position path is covered by the matrix-factorisation test below
@pytest.mark.parametrize("length", [2, 5, 40])
@pytest.mark.parametrize("include_last_offset", [False, True])
def test_mixed_model_matches_explicit_per_sample_loop(length, include_last_offset):
    torch.manual_seed(0)
    model = Mixed(include_last_offset)
    batch = 6
    seq, bag, lens, flat, weights, y = mixed_batch(batch, length, include_last_offset)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)[:-1]])

    def loss_of(idx):
        idx = torch.arange(batch)[idx].reshape(-1)
        parts = [(int(starts[i]), int(lens[i])) for i in idx]
        f = torch.cat([flat[s : s + n] for s, n in parts]) if parts else flat[:0]
        w = torch.cat([weights[s : s + n] for s, n in parts]) if parts else weights[:0]
        offs = torch.cat([torch.zeros(1, dtype=torch.long), lens[idx].cumsum(0)])
        offs = offs if include_last_offset else offs[:-1]
        return (model(seq[idx], bag[idx], f, offs, w) - y[idx]) ** 2

    _, norms = reference(model, loss_of, batch, float("inf"))
    bound = float(norms.median())  # half the samples get clipped
    expected, norms = reference(model, loss_of, batch, bound)
    clipper = BookKeepingClipper(model, max_grad_norm=bound)
    got = clipper.clipped_sum(loss_of(slice(None)))
    torch.testing.assert_close(clipper.last_norms, norms, rtol=1e-4, atol=1e-6)
    assert (norms > bound).any() and (norms < bound).any()  # both clipped and unclipped samples
    for p, e in expected.items():
        torch.testing.assert_close(got[p], e, rtol=1e-4, atol=1e-6)
    clipper.remove()


@pytest.mark.parametrize("steps,d_in,d_out", [(3, 4, 5), (30, 4, 5)])  # ghost-norm and direct paths
def test_linear_paths_match_opacus_default_grad_sampler(steps, d_in, d_out):
    from opacus import GradSampleModule

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(d_in, d_out), nn.Tanh(), nn.Linear(d_out, 1))
    x = torch.randn(8, steps, d_in)
    y = torch.randn(8)
    loss = lambda m: (m(x).squeeze(-1).sum(1) - y) ** 2  # noqa: E731

    gsm = GradSampleModule(model, loss_reduction="sum")
    loss(gsm).sum().backward()
    per = {p: p.grad_sample for p in model.parameters()}
    norms = torch.stack([g.reshape(8, -1).norm(dim=1) for g in per.values()], 1).norm(dim=1)
    coef = (0.5 / (norms + 1e-6)).clamp(max=1.0)
    expected = {p: torch.einsum("i,i...", coef, g) for p, g in per.items()}
    gsm._close()
    for p in model.parameters():
        p.grad = None

    clipper = BookKeepingClipper(model, max_grad_norm=0.5)
    got = clipper.clipped_sum(loss(model))
    torch.testing.assert_close(clipper.last_norms, norms, rtol=1e-4, atol=1e-6)
    for p in model.parameters():
        torch.testing.assert_close(got[p], expected[p], rtol=1e-4, atol=1e-6)


def test_matrix_factorisation_matches_opacus_and_never_densifies():
    from opacus import GradSampleModule

    torch.manual_seed(2)
    model = MF(users=50, items=70, dim=4)
    x = torch.stack([torch.randint(0, 50, (16,)), torch.randint(0, 70, (16,))], 1)
    x[1] = x[0]  # same user and item twice in the batch
    y = torch.rand(16) * 5
    gsm = GradSampleModule(model, loss_reduction="sum")
    ((gsm(x) - y) ** 2).sum().backward()
    per = {p: p.grad_sample for p in model.parameters()}
    norms = torch.stack([g.reshape(16, -1).norm(dim=1) for g in per.values()], 1).norm(dim=1)
    coef = (1.0 / (norms + 1e-6)).clamp(max=1.0)
    expected = {p: torch.einsum("i,i...", coef, g) for p, g in per.items()}
    gsm._close()

    clipper = BookKeepingClipper(model, max_grad_norm=1.0)
    # the clipped sum arrives as sparse rows: index_add into the target, no (B, V, D) tensor
    calls = []
    original = torch.Tensor.index_add_

    def spy(self, dim, index, source, **kw):
        calls.append(tuple(source.shape))
        return original(self, dim, index, source, **kw)

    torch.Tensor.index_add_ = spy  # type: ignore[method-assign]
    try:
        got = clipper.clipped_sum((model(x) - y) ** 2)
    finally:
        torch.Tensor.index_add_ = original  # type: ignore[method-assign]
    assert calls and all(s[0] == 16 for s in calls)  # one row per sample, never per table row
    for p in model.parameters():
        torch.testing.assert_close(got[p], expected[p], rtol=1e-4, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 6),
    length=st.integers(_fastclip._GRAM_MAX_LEN + 1, 80),
    rows=st.integers(1, 12),
    keep=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_padded_sort_path_equals_the_sum_over_every_position_bit_for_bit(batch, length, rows, keep, seed):
    # A batch padded to its longest sample (user-level DP): the positions a mask zeroes have a
    # zero output gradient. Leaving them out must change no bit of the norms or the clipped sum
    # against the formula over every position (duplicates of a row within a sample included).
    g = torch.Generator().manual_seed(seed)
    emb = nn.Embedding(rows, 3)
    idx = torch.randint(0, rows, (batch, length), generator=g)
    mask = (torch.rand(batch, length, generator=g) < keep).float()
    target = torch.randn(batch, length, generator=g)

    def per_sample_loss(out: torch.Tensor) -> torch.Tensor:
        return (((out.sum(-1) - target) ** 2) * mask).sum(1)

    out = emb(idx)
    (grad,) = torch.autograd.grad(per_sample_loss(out).sum(), out)
    sample_ids = torch.arange(batch).repeat_interleave(length)
    norm_sq = _fastclip._sparse_rows_norm_sq(sample_ids, idx.reshape(-1), grad.reshape(-1, 3), batch, rows)
    norms = norm_sq.clamp(min=0).sqrt()
    bound = float(norms.median()) if batch > 1 else 1.0
    coef = (norms + 1e-6).reciprocal_().mul_(bound).clamp_(max=1.0)
    expected = torch.zeros_like(emb.weight).index_add_(0, idx.reshape(-1), (grad * coef.view(-1, 1, 1)).reshape(-1, 3))

    clipper = BookKeepingClipper(emb, max_grad_norm=bound)
    got = clipper.clipped_sum(per_sample_loss(emb(idx)))
    clipper.remove()
    assert torch.equal(clipper.last_norms, norms)
    assert torch.equal(got[emb.weight], expected)


def test_unsupported_models_are_refused_with_the_reason():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.w

    with pytest.raises(dp.UnsupportedModelError, match=r"<root> \(Custom: no rule and no Opacus grad sampler\)"):
        BookKeepingClipper(Custom(), max_grad_norm=1.0)
    with pytest.raises(dp.UnsupportedModelError, match="scale_grad_by_freq=True couples the samples"):
        BookKeepingClipper(nn.Embedding(5, 2, scale_grad_by_freq=True), max_grad_norm=1.0)
    with pytest.raises(dp.UnsupportedModelError, match=r"EmbeddingBag mode='max'"):
        BookKeepingClipper(nn.EmbeddingBag(5, 2, mode="max"), max_grad_norm=1.0)
    tied = nn.Sequential(nn.Embedding(5, 2), nn.Linear(2, 5, bias=False))
    tied[1].weight = tied[0].weight
    assert _fastclip.tied_parameters(tied) == ["0.weight"]
    with pytest.raises(dp.UnsupportedModelError, match="parameter shared by several layers"):
        BookKeepingClipper(tied, max_grad_norm=1.0)


def test_broadcast_position_ids_and_in_place_outputs_are_refused():
    emb = nn.Embedding(10, 3)
    clipper = BookKeepingClipper(emb, max_grad_norm=1.0)
    pos = torch.arange(4).unsqueeze(0)  # (1, T): what BERT builds when position_ids is not passed
    out = emb(pos) + torch.zeros(5, 4, 3)
    with pytest.raises(dp.UnsupportedModelError, match="pass position_ids .* explicitly"):
        clipper.clipped_sum(out.sum((1, 2)))
    emb = nn.Embedding(10, 3)
    clipper = BookKeepingClipper(emb, max_grad_norm=1.0)
    h = emb(torch.arange(4))
    h.mul_(2.0)
    with pytest.raises(dp.UnsupportedModelError, match="modified in place"):
        clipper.clipped_sum(h.sum(1))


def test_in_place_activations_after_linear_layers_are_handled():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 1))
    x, y = torch.randn(5, 4), torch.randn(5)

    def loss_of(idx):
        return (model(x[idx].reshape(-1, 4)).squeeze(-1) - y[idx].reshape(-1)) ** 2

    expected, norms = reference(model, loss_of, 5, 0.3)
    clipper = BookKeepingClipper(model, max_grad_norm=0.3)
    got = clipper.clipped_sum(loss_of(slice(None)))
    torch.testing.assert_close(clipper.last_norms, norms, rtol=1e-4, atol=1e-6)
    for p, e in expected.items():
        torch.testing.assert_close(got[p], e, rtol=1e-4, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    counts=st.lists(st.integers(0, 7), min_size=1, max_size=6),
    rows=st.integers(1, 9),
    candidates=st.integers(1, 3),
    padding=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_packed_lookups_match_the_per_sample_loop(counts, rows, candidates, padding, seed):
    # A packed batch (a user's ratings without padding to the longest user): index row r belongs
    # to sample ``sample[r]``. A batch-first call of the same table in the same step adds to it.
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    emb = dp.PackedEmbedding(rows, 3, padding_idx=0 if padding else None)
    batch = len(counts)
    sample = torch.arange(batch).repeat_interleave(torch.tensor(counts))
    idx = torch.randint(0, rows, (sample.numel(), candidates), generator=g)
    own = torch.randint(0, rows, (batch,), generator=g)
    target = torch.randn(sample.numel(), candidates, generator=g)

    def per_sample_loss(keep: torch.Tensor) -> torch.Tensor:
        packed = ((emb(idx[keep], sample[keep]).sum(-1) - target[keep]) ** 2).sum(1)
        return packed.new_zeros(batch).index_add(0, sample[keep], packed) + emb(own).pow(2).sum(-1)

    everyone = torch.ones(sample.numel(), dtype=torch.bool)
    expected, norms = reference(emb, lambda i: per_sample_loss(everyone)[i], batch, bound=0.5)
    clipper = BookKeepingClipper(emb, max_grad_norm=0.5)
    got = clipper.clipped_sum(per_sample_loss(everyone))
    clipper.remove()
    torch.testing.assert_close(clipper.last_norms, norms, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[emb.weight], expected[emb.weight], rtol=1e-5, atol=1e-6)


def test_packed_calls_with_a_bad_sample_or_under_opacus_are_refused():
    emb = dp.PackedEmbedding(10, 3)
    clipper = BookKeepingClipper(emb, max_grad_norm=1.0)
    out = emb(torch.arange(4), torch.tensor([0, 0, 1, 2]))
    with pytest.raises(dp.UnsupportedModelError, match=r"sample values in \[0, 2\]; the batch has 2 samples"):
        clipper.clipped_sum(torch.zeros(2).index_add(0, torch.tensor([0, 0, 1, 1]), out.sum(-1)))
    out = emb(torch.arange(4), torch.tensor([0, 1]))
    with pytest.raises(dp.UnsupportedModelError, match=r"sample must be integer, of shape \(4,\)"):
        clipper.clipped_sum(out.sum(-1)[:2])
    clipper.remove()
    model = nn.Sequential(dp.PackedEmbedding(10, 3))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(8)), batch_size=4)
    private = dp.SampleLevelDP(noise_multiplier=1.0, max_grad_norm=1.0, clipping="ghost").attach(
        model, torch.optim.SGD(model.parameters(), lr=0.1), data
    )
    with pytest.raises(dp.UnsupportedModelError, match=r"packed PackedEmbedding call \(with sample\) needs clipping='embedding'"):
        private.step(model[0](torch.arange(4), torch.tensor([0, 0, 1, 1])).sum(-1)[:2])
    private.detach()


@pytest.mark.parametrize("d_in,d_out,steps", [(64, 48, 2), (3, 2, 9)])  # the Gram identity; per-sample gradients
def test_a_linear_layer_called_twice_matches_the_per_sample_loop(d_in, d_out, steps):
    torch.manual_seed(1)
    lin = nn.Linear(d_in, d_out)
    x1, x2 = torch.randn(5, steps, d_in), torch.randn(5, 2 * steps, d_in)

    def loss_of(i):
        rows = slice(None) if i is None else slice(i, i + 1)
        return torch.tanh(lin(x1[rows])).sum((1, 2)) + lin(x2[rows]).pow(2).sum((1, 2))

    expected, norms = reference(lin, loss_of, 5, bound=0.7)
    clipper = BookKeepingClipper(lin, max_grad_norm=0.7)
    got = clipper.clipped_sum(loss_of(None))
    clipper.remove()
    torch.testing.assert_close(clipper.last_norms, norms, rtol=1e-5, atol=1e-6)
    for p in lin.parameters():
        torch.testing.assert_close(got[p], expected[p], rtol=1e-5, atol=1e-6)
