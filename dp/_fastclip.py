"""Per-sample clipping in one backward pass, without dense per-sample embedding gradients.

Opacus's default mode materialises a ``(B, V, D)`` per-sample gradient for every
``nn.Embedding`` (hundreds of times the cost of a plain step for a recommender), and its
ghost clipping runs two backward passes. This module computes the clipped, summed gradient
directly, in the "book-keeping" style of Bu, Wang, Zha, Karypis (ICML 2023, "Differentially
private optimization on large model at small cost"):

1. a forward hook records each trainable layer's inputs and output (handing downstream
   code a copy of non-embedding outputs, so in-place activations cannot corrupt them);
2. one ``torch.autograd.grad`` of ``sum_i loss_i`` with respect to those outputs gives the
   per-sample output gradients (parameter gradients are never formed);
3. per layer, the per-sample gradient *norms* are computed from inputs and output
   gradients: for an embedding table from the touched rows only (sparse: the rows one
   sample touched, duplicates merged), for ``nn.Linear`` by the ghost-norm identity
   (Goodfellow 2015; Li et al. ICLR 2022) or directly, whichever is cheaper;
4. the clip factors ``c_i = min(1, C / (||g_i|| + 1e-6))`` (Opacus's formula) re-weight the
   output gradients and the clipped sum is formed once per layer (an ``index_add`` into the
   table, a matmul for a linear layer).

Other layer types with a grad sampler registered in Opacus (``LayerNorm``, ``Conv``,
``GroupNorm``...) use that grad sampler (dense per-sample gradients, cheap for those
layers). The result equals the reference per-sample computation (tests compare it with
Opacus's default grad samplers and with an explicit per-sample loop).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Union

import torch
import torch.nn as nn

from ._errors import UnsupportedModelError

__all__ = ["BookKeepingClipper", "PackedEmbedding", "unsupported_layers", "tied_parameters"]

# Sequences up to this length use the (B, L, L) Gram identity for embedding norms; longer
# ones deduplicate (sample, row) pairs with a sort (torch.unique).
_GRAM_MAX_LEN = 32


class PackedEmbedding(nn.Embedding):
    """An ``nn.Embedding`` that can also be read by a packed batch: ``layer(indices, sample)``.

    A batch whose samples hold different numbers of lookups (a user's ratings) is padded to
    its longest sample when each sample must be one row; with ``sample`` the lookups are
    packed instead: ``indices`` ``(R, ...)`` and ``sample`` ``(R,)``, where ``sample[r]`` is the
    batch row (sample) that index row ``r`` belongs to. Per-sample clipping
    (``clipping="embedding"``) attributes every looked-up row to its sample; Opacus's own modes
    assume batch-first inputs and refuse a packed call. Called without ``sample`` it is an
    ``nn.Embedding``. ``sample`` is positional-only so that every hook sees it.
    """

    def forward(self, input: torch.Tensor, sample: torch.Tensor | None = None, /) -> torch.Tensor:
        del sample  # read by the clipper's hook; the lookup itself is the plain one
        return super().forward(input)


class _Call(NamedTuple):
    args: tuple
    kwargs: dict
    output: torch.Tensor
    version: int


class _ScaledRows:
    """The clipped sum of a table read at one row per sample: row ``rows[i]`` gets ``coef[i] * grads[i]``.

    Called with the clip factors like any rule's closure; ``accumulate`` reads the fields instead,
    so that the tables of one step share one column of clip factors.
    """

    __slots__ = ("weight", "rows", "grads")

    def __init__(self, weight: torch.Tensor, rows: torch.Tensor, grads: torch.Tensor) -> None:
        self.weight, self.rows, self.grads = weight, rows, grads

    def __call__(self, coef: torch.Tensor) -> dict[torch.Tensor, _Grad]:
        return {self.weight: (self.rows, self.scaled(_as(coef, self.grads.dtype).unsqueeze(1)))}

    def scaled(self, column: torch.Tensor) -> torch.Tensor:
        """``grads`` times the clip factors as a ``(B, 1)`` column of the gradients' dtype."""
        return _as(self.grads * column, self.weight.dtype)


# ----------------------------------------------------------------------------- rules
# A rule turns the calls of one layer (inputs, output gradients) into per-sample squared
# norms (B,) and a closure producing {param: clipped summed gradient} from the clip factors.

# A clipped gradient is either dense (a tensor shaped like the parameter) or sparse rows
# ``(row_indices, values)`` to be index-added into the parameter-shaped target. Keys are the
# parameters, typed as tensors because torch types ``layer.weight`` as one.
_Grad = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]
_Work = tuple[torch.Tensor, Callable[[torch.Tensor], dict[torch.Tensor, _Grad]]]


def _packed_sample(call: _Call) -> torch.Tensor | None:
    """The ``sample`` argument of a packed :class:`PackedEmbedding` call (None: batch-first)."""
    return call.args[1] if len(call.args) > 1 else None


def _batch_check(name: str, tensor: torch.Tensor, batch: int, what: str) -> None:
    if tensor.dim() == 0 or tensor.shape[0] != batch:
        hint = (
            " For Hugging Face BERT-family models pass position_ids (and token_type_ids) explicitly "
            "with shape (batch, seq_len): see dp.bert_dp_inputs."
            if what == "indices"
            else ""
        )
        raise UnsupportedModelError(
            f"layer {name!r} got {what} of shape {tuple(tensor.shape)} but the batch has {batch} samples; "
            f"per-sample clipping needs batch-first inputs with one row per sample.{hint}"
        )


def _detached(a: Any) -> Any:
    """A layer input as recorded: tensors that carry a graph are detached (indices need not be)."""
    return a.detach() if isinstance(a, torch.Tensor) and a.requires_grad else a


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _sparse_rows_norm_sq(
    sample_ids: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, batch: int, num_rows: int
) -> torch.Tensor:
    """Squared norm per sample of sum_p e_{rows[p]} values[p]^T over the positions of each sample."""
    keys = sample_ids * num_rows + rows
    uniq, inverse = torch.unique(keys, return_inverse=True)
    summed = values.new_zeros(uniq.numel(), values.shape[1]).index_add_(0, inverse, values)
    sq = summed.pow(2).sum(1)
    return values.new_zeros(batch).index_add_(0, torch.div(uniq, num_rows, rounding_mode="floor"), sq)


def _embedding_rule(name: str, layer: nn.Embedding, calls: list[_Call], grads: list[torch.Tensor], batch: int) -> _Work:
    if layer.scale_grad_by_freq:  # pragma: no cover - refused at attach
        raise UnsupportedModelError(f"layer {name!r}: scale_grad_by_freq=True couples samples; not supported")
    if len(calls) == 1 and len(calls[0].args) == 1 and layer.padding_idx is None:
        idx0 = calls[0].args[0]
        if idx0.dim() == 1:  # one row per sample, batch-first: the common recsys case
            _batch_check(name, idx0, batch, "indices")
            g1 = grads[0]
            return torch.linalg.vecdot(g1, g1), _ScaledRows(layer.weight, idx0, g1)
    if any(_packed_sample(c) is not None for c in calls):
        return _packed_embedding_rule(name, layer, calls, grads, batch)
    dim = layer.embedding_dim
    idx_parts, grad_parts = [], []
    for call, g in zip(calls, grads):
        idx = call.args[0] if call.args else call.kwargs["input"]
        _batch_check(name, idx, batch, "indices")
        idx_parts.append(idx.reshape(batch, -1))
        grad_parts.append(g.reshape(batch, -1, dim))
    idx = torch.cat(idx_parts, 1) if len(idx_parts) > 1 else idx_parts[0]
    g = torch.cat(grad_parts, 1) if len(grad_parts) > 1 else grad_parts[0]
    if layer.padding_idx is not None:  # the padding row receives no gradient
        g = g * (idx != layer.padding_idx).unsqueeze(-1).to(g.dtype)
    length = idx.shape[1]
    if length == 1:
        g0 = g[:, 0]
        norm_sq = (g0 * g0).sum(-1)
    elif length <= _GRAM_MAX_LEN:
        same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(g.dtype)
        norm_sq = (torch.bmm(g, g.transpose(1, 2)) * same).sum((1, 2))
    else:
        # A position whose output gradient is zero (padding, a masked-out example: most of a
        # batch padded to its longest sample) adds nothing to a norm nor to the clipped sum, so
        # it is left out before the sort. The kept positions stay in row-major order: every sum
        # adds the same nonzero terms in the same order as over all positions, bit for bit.
        sample_ids, pos = g.ne(0).any(-1).nonzero(as_tuple=True)
        rows, values = idx[sample_ids, pos], g[sample_ids, pos]
        return _rows_work(layer, sample_ids, rows, values, batch)

    def clipped(coef: torch.Tensor) -> dict[torch.Tensor, _Grad]:
        values = (g * _as(coef, g.dtype).view(-1, 1, 1)).reshape(-1, dim)
        return {layer.weight: (idx.reshape(-1), _as(values, layer.weight.dtype))}

    return norm_sq, clipped


def _packed_embedding_rule(name: str, layer: nn.Embedding, calls: list[_Call], grads: list[torch.Tensor], batch: int) -> _Work:
    """Any mix of packed and batch-first calls: every looked-up row with the sample it belongs to."""
    sample_parts, row_parts, value_parts = [], [], []
    for call, g in zip(calls, grads):
        idx = call.args[0]
        sample = _packed_sample(call)
        if sample is None:  # batch-first: row b of the indices belongs to sample b
            _batch_check(name, idx, batch, "indices")
            sample = torch.arange(batch, device=idx.device)
        elif sample.dim() != 1 or sample.shape[0] != idx.shape[0] or sample.dtype.is_floating_point:
            raise UnsupportedModelError(
                f"layer {name!r} got a packed call with sample of shape {tuple(sample.shape)} and dtype {sample.dtype} "
                f"for indices of shape {tuple(idx.shape)}; sample must be integer, of shape ({idx.shape[0]},)"
            )
        elif sample.numel() and (int(sample.min()) < 0 or int(sample.max()) >= batch):
            raise UnsupportedModelError(
                f"layer {name!r} got a packed call with sample values in [{int(sample.min())}, {int(sample.max())}]; "
                f"the batch has {batch} samples, so they must lie in [0, {batch - 1}]"
            )
        per_row = idx[0].numel() if idx.shape[0] else 0
        sample_parts.append(sample.repeat_interleave(per_row))
        row_parts.append(idx.reshape(-1))
        value_parts.append(g.reshape(-1, layer.embedding_dim))
    sample_ids, rows, values = torch.cat(sample_parts), torch.cat(row_parts), torch.cat(value_parts)
    if layer.padding_idx is not None:  # the padding row receives no gradient
        values = values * (rows != layer.padding_idx).unsqueeze(-1).to(values.dtype)
    return _rows_work(layer, sample_ids, rows, values, batch)


def _rows_work(layer: nn.Embedding, sample_ids: torch.Tensor, rows: torch.Tensor, values: torch.Tensor, batch: int) -> _Work:
    """Norms and clipped sum of a table read at ``rows`` by samples ``sample_ids`` with output gradients ``values``."""
    norm_sq = _sparse_rows_norm_sq(sample_ids, rows, values, batch, layer.num_embeddings)

    def clipped(coef: torch.Tensor) -> dict[torch.Tensor, _Grad]:
        scaled = values * _as(coef, values.dtype)[sample_ids].unsqueeze(1)
        return {layer.weight: (rows, _as(scaled, layer.weight.dtype))}

    return norm_sq, clipped


def _embedding_bag_rule(name: str, layer: nn.EmbeddingBag, calls: list[_Call], grads: list[torch.Tensor], batch: int) -> _Work:
    if layer.mode not in ("sum", "mean"):  # pragma: no cover - refused at attach
        raise UnsupportedModelError(f"layer {name!r}: EmbeddingBag mode={layer.mode!r} not supported")
    sids, rows, vals = [], [], []
    for call, g in zip(calls, grads):
        args: list[Any] = list(call.args) + [None] * (3 - len(call.args))
        inp = args[0] if args[0] is not None else call.kwargs["input"]  # the forward ran, so it had an input
        offsets = args[1] if args[1] is not None else call.kwargs.get("offsets")
        psw = args[2] if args[2] is not None else call.kwargs.get("per_sample_weights")
        _batch_check(name, g, batch, "output gradient")
        if inp.dim() == 2:
            _batch_check(name, inp, batch, "indices")
            length = inp.shape[1]
            sample_ids = torch.arange(batch, device=inp.device).repeat_interleave(length)
            flat = inp.reshape(-1)
            psw_flat = psw.reshape(-1) if psw is not None else None
        else:
            assert offsets is not None  # torch's forward refuses 1-D input without offsets
            flat = inp
            offs = offsets[:-1] if layer.include_last_offset else offsets
            if offs.shape[0] != batch:
                raise UnsupportedModelError(f"layer {name!r} got {offs.shape[0]} bags but the batch has {batch} samples")
            ends = torch.cat([offs[1:], offs.new_tensor([flat.shape[0]])])
            sample_ids = torch.arange(batch, device=flat.device).repeat_interleave(ends - offs)
            psw_flat = psw
        weight = torch.ones(flat.shape[0], dtype=g.dtype, device=g.device)
        if layer.padding_idx is not None:
            weight = weight * (flat != layer.padding_idx).to(g.dtype)
        if layer.mode == "mean":
            counts = g.new_zeros(batch).index_add_(0, sample_ids, weight)
            weight = weight / counts.clamp(min=1)[sample_ids]
        if psw_flat is not None:
            weight = weight * psw_flat.detach().to(g.dtype)
        sids.append(sample_ids)
        rows.append(flat)
        vals.append(g[sample_ids] * weight.unsqueeze(1))
    sample_ids, flat, values = torch.cat(sids), torch.cat(rows), torch.cat(vals)
    norm_sq = _sparse_rows_norm_sq(sample_ids, flat, values, batch, layer.num_embeddings)

    def clipped(coef: torch.Tensor) -> dict[torch.Tensor, _Grad]:
        scaled = values * coef.to(values.dtype)[sample_ids].unsqueeze(1)
        return {layer.weight: (flat, scaled.to(layer.weight.dtype))}

    return norm_sq, clipped


def _linear_rule(name: str, layer: nn.Linear, calls: list[_Call], grads: list[torch.Tensor], batch: int) -> _Work:
    a_parts, g_parts = [], []
    for call, g in zip(calls, grads):
        a = call.args[0] if call.args else call.kwargs["input"]
        _batch_check(name, a, batch, "inputs")
        a_parts.append(a.reshape(batch, -1, layer.in_features).to(g.dtype))
        g_parts.append(g.reshape(batch, -1, layer.out_features))
    steps = sum(a.shape[1] for a in a_parts)
    w, b = layer.weight, layer.bias
    norm_sq = g_parts[0].new_zeros(batch)
    # (B, out, in) per-sample gradients, when forming them is cheaper than the Gram identity:
    # summed call by call (no concatenation of the inputs), and weighted again for the clipped sum
    per_sample: torch.Tensor | None = None
    if w.requires_grad:
        if steps == 1:
            norm_sq = norm_sq + a_parts[0][:, 0].pow(2).sum(-1) * g_parts[0][:, 0].pow(2).sum(-1)
        elif steps * (layer.in_features + layer.out_features) <= layer.in_features * layer.out_features:
            a, g = (torch.cat(a_parts, 1), torch.cat(g_parts, 1)) if len(a_parts) > 1 else (a_parts[0], g_parts[0])
            norm_sq = norm_sq + (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
        else:
            per_sample = torch.bmm(g_parts[0].transpose(1, 2), a_parts[0])
            for a, g in zip(a_parts[1:], g_parts[1:]):
                per_sample.baddbmm_(g.transpose(1, 2), a)
            norm_sq = norm_sq + per_sample.pow(2).sum((1, 2))
    g_sum = torch.stack([g.sum(1) for g in g_parts]).sum(0) if (b is not None and b.requires_grad) else None
    if g_sum is not None:
        norm_sq = norm_sq + g_sum.pow(2).sum(-1)

    def clipped(coef: torch.Tensor) -> dict[torch.Tensor, _Grad]:
        c = coef.to(norm_sq.dtype)
        out: dict[torch.Tensor, _Grad] = {}
        if per_sample is not None:
            out[w] = torch.einsum("b,boi->oi", c, per_sample).to(w.dtype)
        elif w.requires_grad:
            total = torch.zeros(w.shape, dtype=c.dtype, device=c.device)
            for a, g in zip(a_parts, g_parts):
                total.addmm_((g * c.view(-1, 1, 1)).reshape(-1, layer.out_features).t(), a.reshape(-1, layer.in_features))
            out[w] = total.to(w.dtype)
        if g_sum is not None:
            out[b] = (g_sum * c.view(-1, 1)).sum(0).to(b.dtype)
        return out

    return norm_sq, clipped


def _opacus_rule(name: str, layer: nn.Module, calls: list[_Call], grads: list[torch.Tensor], batch: int) -> _Work:
    """Layers with a grad sampler registered in Opacus: dense per-sample gradients per layer."""
    from opacus.grad_sample import GradSampleModule

    sampler = GradSampleModule.GRAD_SAMPLERS[type(layer)]
    per_sample: dict[nn.Parameter, torch.Tensor] = {}
    for call, g in zip(calls, grads):
        acts = [t for t in call.args if isinstance(t, torch.Tensor)]
        for t in acts[:1]:
            _batch_check(name, t, batch, "inputs")
        _batch_check(name, g, batch, "output gradient")
        for p, gs in sampler(layer, acts, g).items():
            if p.requires_grad:
                per_sample[p] = per_sample[p] + gs if p in per_sample else gs
    norm_sq = grads[0].new_zeros(batch)
    for gs in per_sample.values():
        norm_sq = norm_sq + gs.reshape(batch, -1).pow(2).sum(1)

    def clipped(coef: torch.Tensor) -> dict[torch.Tensor, _Grad]:
        return {p: torch.einsum("i,i...", coef.to(gs.dtype), gs).to(p.dtype) for p, gs in per_sample.items()}

    return norm_sq, clipped


_RULES: dict[type, Callable[..., _Work]] = {
    nn.Embedding: _embedding_rule,
    PackedEmbedding: _embedding_rule,
    nn.EmbeddingBag: _embedding_bag_rule,
    nn.Linear: _linear_rule,
}


def _rule_for(layer: nn.Module) -> Callable[..., _Work] | None:
    if type(layer) in _RULES:
        return _RULES[type(layer)]
    from opacus.grad_sample import GradSampleModule

    if type(layer) in GradSampleModule.GRAD_SAMPLERS:
        return _opacus_rule
    return None


def _trainable_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in module.named_modules() if any(p.requires_grad for p in m.parameters(recurse=False))]


def tied_parameters(module: nn.Module) -> list[str]:
    """Names of trainable parameters owned by more than one layer (weight tying)."""
    owners: dict[int, dict[int, str]] = {}
    for name, m in module.named_modules(remove_duplicate=False):
        for pname, p in m.named_parameters(recurse=False):
            if p.requires_grad:
                owners.setdefault(id(p), {}).setdefault(id(m), f"{name}.{pname}" if name else pname)
    return sorted(min(names.values()) for names in owners.values() if len(names) > 1)


def unsupported_layers(module: nn.Module) -> list[str]:
    """Why each trainable layer cannot go through this engine (empty when all can)."""
    out = []
    for name, m in _trainable_layers(module):
        rule = _rule_for(m)
        if rule is None:
            out.append(f"{name or '<root>'} ({type(m).__name__}: no rule and no Opacus grad sampler)")
        elif isinstance(m, nn.Embedding) and m.scale_grad_by_freq:
            out.append(f"{name} (Embedding with scale_grad_by_freq=True couples the samples of a batch)")
        elif isinstance(m, nn.EmbeddingBag) and (m.mode not in ("sum", "mean") or m.scale_grad_by_freq):
            out.append(f"{name} (EmbeddingBag mode={m.mode!r} / scale_grad_by_freq: only sum and mean)")
    for p in tied_parameters(module):
        out.append(f"{p} (parameter shared by several layers)")
    return out


class BookKeepingClipper:
    """Computes clipped, summed per-sample gradients of a module in one backward pass.

    Attach once; each training forward (grad enabled) is recorded until ``clipped_sum``
    consumes it. Evaluate under ``torch.no_grad()`` so evaluation passes are not recorded.

    Raises:
        UnsupportedModelError: at construction, a trainable layer without a rule, or tied
            parameters; in ``clipped_sum``, inputs that are not batch-first or an output
            modified in place after the layer ran.
    """

    def __init__(self, module: nn.Module, *, max_grad_norm: float) -> None:
        problems = unsupported_layers(module)
        if problems:
            raise UnsupportedModelError(
                "clipping='embedding' cannot handle: "
                + "; ".join(problems)
                + ". Use clipping='ghost' or 'default' (Opacus) for this model."
            )
        self.max_grad_norm = float(max_grad_norm)
        # every rule is found: unsupported_layers() refused the layers without one above
        self._layers = [(name, m, rule) for name, m in _trainable_layers(module) if (rule := _rule_for(m)) is not None]
        self._params_of = {m: [p for p in m.parameters(recurse=False) if p.requires_grad] for _, m, _ in self._layers}
        self._calls: dict[nn.Module, list[_Call]] = {}
        # layers whose output downstream code gets as is (no copy), fixed at attach
        self._tables = {m for _, m, _ in self._layers if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
        self._handles = [m.register_forward_hook(self._capture, with_kwargs=True) for _, m, _ in self._layers]
        self.last_norms: torch.Tensor | None = None

    def _capture(self, layer: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not (isinstance(output, torch.Tensor) and output.requires_grad and torch.is_grad_enabled()):
            return None
        # a layer input as recorded: tensors that carry a graph are detached (indices need not be)
        detached = tuple([a.detach() if isinstance(a, torch.Tensor) and a.requires_grad else a for a in args])
        call = _Call(detached, {k: _detached(v) for k, v in kwargs.items()} if kwargs else kwargs, output, output._version)
        calls = self._calls.get(layer)
        if calls is None:
            self._calls[layer] = [call]
        else:
            calls.append(call)
        if layer in self._tables:
            return None  # rarely modified in place; if it is, clipped_sum says so
        # Downstream code gets a copy, so an in-place op after the layer (ReLU(inplace=True),
        # ``x *= scale``) cannot change the tensor whose gradient is the layer's own; the
        # copy is cheap next to the layer's own matmul.
        return output.clone()

    @property
    def parameters(self) -> list[nn.Parameter]:
        return [p for ps in self._params_of.values() for p in ps]

    def discard(self) -> None:
        """Forget the recorded forward passes (for an empty batch)."""
        self._calls = {}

    def accumulate(
        self,
        per_sample_loss: torch.Tensor,
        into: Mapping[torch.Tensor, torch.Tensor],
        *,
        scale: float | Mapping[torch.Tensor, float] = 1.0,
    ) -> torch.Tensor:
        """Add ``scale * sum_i clip(grad loss_i)`` into ``into[p]`` for every parameter in ``into``.

        Targets are parameter-shaped tensors. ``scale`` is one factor, or one per parameter
        (the lazy-noise SGD step adds ``-lr / B`` times the clipped sum straight into a
        table); it multiplies the clip factors, so a scaled target costs no extra pass.

        Consumes the forward passes recorded since the last call. Returns the per-sample
        gradient norms before clipping (also kept as ``last_norms``).
        """
        calls, self._calls = self._calls, {}
        batch = per_sample_loss.shape[0]
        layers: list[nn.Module] = []
        recorded: list[_Call] = []
        for layer, cs in calls.items():
            for c in cs:
                if c.output._version != c.version:
                    name = next(n for n, m, _ in self._layers if m is layer)
                    raise UnsupportedModelError(
                        f"the output of layer {name!r} was modified in place after the layer ran; "
                        f"clipping='embedding' needs the layer's own output gradient. Use clipping='ghost'."
                    )
                layers.append(layer)
                recorded.append(c)
        outs = [c.output for c in recorded]
        # the gradient of sum_i loss_i: ones as the loss's output gradient (no sum node, the same gradients)
        grads = torch.autograd.grad(per_sample_loss, outs, torch.ones_like(per_sample_loss), allow_unused=True) if outs else ()
        by_layer: dict[nn.Module, tuple[list[_Call], list[torch.Tensor]]] = {}
        for layer, c, g in zip(layers, recorded, grads):
            if g is None:
                continue
            entry = by_layer.get(layer)
            if entry is None:
                by_layer[layer] = ([c], [g])
            else:
                entry[0].append(c)
                entry[1].append(g)
        used = [entry for entry in self._layers if entry[1] in by_layer]
        works = [rule(name, layer, *by_layer[layer], batch) for name, layer, rule in used]
        dtype = per_sample_loss.dtype
        if not works:
            norms = per_sample_loss.detach().new_zeros(batch)
        elif len(works) == 1:
            norms = _as(works[0][0], dtype).clamp(min=0).sqrt_()
        else:  # the first sum is a fresh tensor, the rest is added in place
            norm_sq = _as(works[0][0], dtype) + _as(works[1][0], dtype)
            for ns, _ in works[2:]:
                norm_sq.add_(_as(ns, dtype))
            norms = norm_sq.clamp_(min=0).sqrt_()
        self.last_norms = norms
        inverse = norms.add(1e-6).reciprocal_()
        coefs: dict[float, torch.Tensor] = {}
        columns: dict[tuple[float, torch.dtype], torch.Tensor] = {}  # coefs as (B, 1) columns, per gradient dtype
        per_param = isinstance(scale, Mapping)  # else one float for every parameter
        max_grad_norm = self.max_grad_norm
        for (_, layer, _), (_, clipped) in zip(used, works):
            if per_param:
                params = self._params_of[layer]
                if len(params) == 1:  # one scale by construction (tables, biasless layers)
                    if params[0] not in into:
                        continue
                    shared = scale[params[0]]  # type: ignore[index]
                else:
                    scales = {scale[p] for p in params if p in into}  # type: ignore[index]
                    shared = scales.pop() if len(scales) == 1 else None
            else:
                shared = scale
            s = 1.0 if shared is None else shared
            coef = coefs.get(s)
            if coef is None:  # Opacus's clip factor min(1, C / (norm + 1e-6)), times ``s``
                # for s < 0, max(a * (C s), s) is -min(a * (C |s|), |s|) exactly: the sign folded in, no negation pass
                coef = inverse.mul(max_grad_norm * s)
                coef = coefs[s] = coef.clamp_(min=s) if s < 0 else coef.clamp_(max=s)
            if shared is not None and type(clipped) is _ScaledRows:  # one row per sample: the shared column
                target = into.get(clipped.weight)
                if target is not None:
                    key = (s, clipped.grads.dtype)
                    column = columns.get(key)
                    if column is None:
                        column = columns[key] = _as(coef, clipped.grads.dtype).unsqueeze(1)
                    target.index_add_(0, clipped.rows, clipped.scaled(column))
                continue
            for p, grad in clipped(coef).items():
                target = into.get(p)
                if target is None:
                    continue
                alpha = 1.0 if shared is not None else scale[p]  # type: ignore[index]
                if isinstance(grad, tuple):  # alpha=1.0 passed explicitly costs torch a slower kernel
                    target.index_add_(0, grad[0], grad[1]) if alpha == 1.0 else target.index_add_(0, *grad, alpha=alpha)
                else:
                    target.add_(grad, alpha=alpha)
        return norms

    def clipped_sum(self, per_sample_loss: torch.Tensor) -> dict[torch.Tensor, torch.Tensor]:
        """``sum_i clip(grad loss_i)`` for every trainable parameter (zeros where unused)."""
        out: dict[torch.Tensor, torch.Tensor] = {p: torch.zeros_like(p) for p in self.parameters}
        self.accumulate(per_sample_loss, out)
        return out

    def remove(self) -> None:
        """Remove the hooks and forget recorded passes."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._calls = {}
