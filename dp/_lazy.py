"""Deferred DP-SGD noise for embedding tables trained by plain SGD (opt-in).

DP-SGD adds Gaussian noise to every row of an embedding table at every step, which for a
recommender costs more than the whole non-private step. With plain SGD (no momentum, no
weight decay) the update is linear, so the noise a row receives over ``k`` steps is one
Gaussian with the summed variance ``sum_s (lr_s * sigma * C / B)^2``. This module keeps,
per table, the running total of that variance and, per row, the total at which the row
last received its noise; a row gets its pending noise in one draw just before anything
reads it through the table's forward (a forward pre-hook), and every row does on
``flush()``, ``state_dict()`` and ``detach()``. Tables under ``MIN_DEFERRED_COORDINATES``
keep eager noise, drawn in the step.

Every value the model computes with, and the final parameters, have exactly the
distribution of eager DP-SGD (independent Gaussians add up), so the privacy guarantee and
the accounting are unchanged. What is not covered: code that reads ``table.weight``
directly (not through the embedding's forward) between steps sees rows without their
pending noise; call ``PrivateTraining.flush()`` first. Releasing such values would break
the guarantee, which is why the adapter flushes before ``event()`` and ``detach()``.
"""

from __future__ import annotations

import math
from typing import Any, Container

import torch
import torch.nn as nn

from ._errors import DPValueError

__all__ = [
    "LazyTableNoise",
    "check_lazy_optimizer",
    "plain_sgd_params",
    "update_stddev",
    "worth_deferring",
    "MIN_DEFERRED_COORDINATES",
]

Table = nn.Embedding | nn.EmbeddingBag
"""An embedding table whose noise may be deferred."""

MIN_DEFERRED_COORDINATES = 32768
"""Smaller tables get their noise eagerly, in the step: a deferred draw costs about a dozen
tensor operations per read (measured: 70 microseconds on the benchmark machine, the time of
about 17,000 normal draws), more than a small table's whole dense noise."""


def worth_deferring(table: Table) -> bool:
    """Whether deferring this table's noise saves time (see ``MIN_DEFERRED_COORDINATES``)."""
    return table.weight.numel() >= MIN_DEFERRED_COORDINATES


_PLAIN_SGD = (("momentum", 0), ("weight_decay", 0), ("nesterov", False), ("maximize", False))
"""The SGD options that must keep these values for the update to be linear in the noise."""


def _nonlinear_option(group: dict) -> tuple[str, Any] | None:
    """The first option of ``group`` that makes its SGD update nonlinear, with its required value."""
    for key, ok in _PLAIN_SGD:  # a loop, not next(generator): read at every step
        if group.get(key, ok) != ok:
            return key, ok
    return None


def _refuse_nonlinear(group: dict, *, note: str = "") -> None:
    bad = _nonlinear_option(group)
    if bad is not None:
        key, ok = bad
        raise DPValueError(
            f"lazy_noise=True needs plain SGD for embedding tables: {key} must be {ok!r}, got {group[key]!r}{note}"
        )


def check_lazy_optimizer(optimizer: torch.optim.Optimizer, tables: list[Table]) -> dict[Table, dict]:
    """The param group of each table's weight; refuses anything but plain SGD for them.

    Raises:
        DPValueError: the optimizer is not ``torch.optim.SGD`` or a table's group uses
            momentum, weight decay, Nesterov or ``maximize``.
    """
    if type(optimizer) is not torch.optim.SGD:
        raise DPValueError(
            f"lazy_noise=True needs torch.optim.SGD (its update is linear in the noise), got {type(optimizer).__name__}"
        )
    groups: dict[Table, dict] = {}
    for table in tables:
        for group in optimizer.param_groups:
            if any(p is table.weight for p in group["params"]):
                _refuse_nonlinear(group)
                groups[table] = group
    return groups


def plain_sgd_params(optimizer: torch.optim.Optimizer, deferred: Container[torch.Tensor]) -> dict[torch.Tensor, dict]:
    """Each trainable parameter in a group that is plain SGD at this step, with its group.

    Their update ``p -= lr * grad`` is applied by the DP step itself (no ``p.grad``, no optimizer
    step when every group is plain). Read at every step: a group's options can change after
    attach (a learning-rate scheduler cycling momentum); the other groups go to the optimizer.

    Raises:
        DPValueError: a group holding a ``deferred`` table weight is no longer plain SGD.
    """
    out: dict[torch.Tensor, dict] = {}
    for group in optimizer.param_groups:
        if _nonlinear_option(group) is None:
            for p in group["params"]:
                if p.requires_grad:
                    out[p] = group
        elif any(p in deferred for p in group["params"] if p.requires_grad):
            _refuse_nonlinear(group, note=" (changed after attach, e.g. by a learning-rate scheduler)")
    return out


class LazyTableNoise:
    """Pending-noise bookkeeping for the embedding tables of one ``PrivateTraining``."""

    def __init__(self, tables: dict[Table, dict], *, generator: Any, secure_mode: bool) -> None:
        self._groups = tables
        self._gen = generator
        self._secure = secure_mode
        self._total = {t: 0.0 for t in tables}
        # per row, the total at its last noise: a (rows, 1) column read by the flush, a (rows,) view of it elsewhere
        self._last_col = {t: torch.zeros(t.weight.shape[0], 1, dtype=torch.float64) for t in tables}
        self._last = {t: col.view(-1) for t, col in self._last_col.items()}
        self._touched = {t: torch.zeros(t.weight.shape[0], dtype=torch.bool) for t in tables}
        self._handles = [t.register_forward_pre_hook(self._before_read, with_kwargs=True) for t in tables]

    @property
    def tables(self) -> list[Table]:
        return list(self._groups)

    def add_dp_step(self, *, noise_multiplier: float, max_grad_norm: float, expected_batch_size: int) -> None:
        """Record one DP-SGD step's noise, not yet drawn: per table ``update_stddev`` at its group's current lr."""
        total = self._total
        for table, group in self._groups.items():
            std = update_stddev(
                lr=float(group["lr"]),
                noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm,
                expected_batch_size=expected_batch_size,
            )
            total[table] += std * std

    def _normal(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        if self._secure:
            from opacus.optimizers.optimizer import _generate_noise

            return _generate_noise(std=1.0, reference=torch.empty(shape, dtype=like.dtype), generator=self._gen, secure_mode=True)
        # randn is empty(shape).normal_(0, 1): the same draws, in one call
        return torch.randn(shape, generator=self._gen, dtype=like.dtype, device=like.device)

    def _flush_rows(self, table: Table, rows: torch.Tensor) -> None:
        total = self._total[table]
        if total == 0.0:
            return
        # each row read once, in row order: a mask over the table's rows instead of a sort
        touched = self._touched[table]
        if rows.dim() != 1:
            rows = rows.reshape(-1)
        if rows.dtype != torch.int64:
            rows = rows.long()  # index_fill_ takes int64 only
        touched.index_fill_(0, rows, True)
        rows = touched.nonzero().squeeze_(1)
        touched.zero_()
        last = self._last_col[table]
        # totals only grow, so total - last >= 0 exactly; .data: the update is not part of the graph
        w = table.weight.data
        std = torch.rsub(last.index_select(0, rows), total).sqrt_()  # (rows, 1): one per row, broadcast over the row
        if std.dtype != w.dtype:
            std = std.to(w.dtype)
        w.index_add_(0, rows, self._normal((rows.numel(), w.shape[1]), w).mul_(std))
        last.index_fill_(0, rows, total)

    def _before_read(self, table: Table, args: tuple, kwargs: dict) -> None:
        idx = args[0] if args else kwargs.get("input")
        if isinstance(idx, torch.Tensor) and idx.numel():
            self._flush_rows(table, idx)

    @torch.no_grad()
    def flush(self) -> None:
        """Give every row its pending noise."""
        for table in self._groups:
            pending = (self._total[table] - self._last[table]).clamp_(min=0.0)
            if not bool((pending > 0).any()):
                continue
            w = table.weight
            noise = self._normal(tuple(w.shape), w) * pending.sqrt().to(w.dtype).unsqueeze(1)
            w.add_(noise)
            self._last[table].fill_(self._total[table])

    def pending_variance(self, table: Table) -> torch.Tensor:
        """Per row, the noise variance not yet drawn (for tests and diagnostics)."""
        return (self._total[table] - self._last[table]).clamp(min=0.0)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def update_stddev(*, lr: float, noise_multiplier: float, max_grad_norm: float, expected_batch_size: int) -> float:
    """Standard deviation of one step's noise in the SGD update: ``lr * sigma * C / B``."""
    return math.fabs(lr) * noise_multiplier * max_grad_norm / expected_batch_size
