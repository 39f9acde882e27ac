"""User-level DP-SGD inside a silo: each step clips one person's whole contribution.

A recommendation silo holds many ratings of each person; record-level DP protects one rating,
not the person a compliance team protects. Here the unit of privacy is a user:

- sampling: every step Poisson-samples the silo's *users*, each with probability
  ``q = 1 / len(data_loader)`` (the steps per epoch of the record-level loader), and takes all of
  a sampled user's examples;
- clipping: the gradient of the user's loss (the sum of its per-example losses, so the sum of its
  per-example gradients) is clipped to ``max_grad_norm`` as one sample: a user with 500 ratings
  moves the released parameters no more than a user with one;
- accounting: the subsampled Gaussian mechanism at rate ``q`` over the silo's users, composed per
  silo; the ledger event says ``unit="user"``.

It is ``SampleLevelDP`` run on the dataset grouped by user: the dataset's ``by_user()`` returns
one item per user holding all of its examples, a batch has one row per user, and the task's loss
returns one value per user, so per-sample clipping is per-user clipping.

User-owned parameters (``user_parameters``, e.g. an MF user embedding whose row ``i`` only user
``i``'s examples read) are trained by that user's own gradient, unclipped and un-noised, and must
never leave the client (in ``fedcore``: the task's ``local_only``). Why the released parameters
keep the guarantee: take neighbouring silos that differ in user ``u``'s data. By induction over
steps, given the same released history, every other user's row is the same function of that
history and of that user's own data in both silos (its gradient reads nothing else, and the
optimizer's state is per element). A step's released update is the noised sum over sampled users
of each one's clipped gradient of the shared parameters; only ``u``'s term differs, and its norm
is at most ``max_grad_norm`` whatever ``u``'s row holds. So each step is the subsampled Gaussian
mechanism with sensitivity ``max_grad_norm`` on what is released, adaptively composed; what others
compute from it and their own data (their rows, their recommendations) is post-processing (joint
DP: Kearns et al. ITCS 2014; Jain et al. NeurIPS 2021, "Differentially private model
personalization"). Not covered: row ``u`` itself and what is computed from it (``u``'s own scores
and metrics): it is a function of ``u``'s data and stays with ``u``'s silo. ``step`` checks that
each user-owned table reads exactly one distinct row per batch row.

Across silos (``clipped_user_gradients``): the same per-user clipping, without noise, gives a
silo's share of one DP-FedSGD step over every silo's users; the noise is added once to the sum
over silos (``fedcore``: privacy level ``client`` with unit ``user``), so about 190 users per silo
no longer each need a silo's worth of noise. The argument above carries over with the sum over
silos as the released quantity, provided each user sits in one silo.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import nn

from . import _checks as chk
from ._errors import DPTypeError, DPValueError
from ._events import SampleLevelEvent
from ._fastclip import BookKeepingClipper
from ._opacus import PrivateTraining, SampleLevelDP, resolve_clipping

__all__ = ["UserLevelDP", "UserLevelTraining", "clipped_user_gradients"]

# Optimizers whose update and state are per element, so a user's row depends on that row alone.
_ELEMENTWISE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad, torch.optim.RMSprop)


@dataclass(frozen=True, kw_only=True)
class UserLevelDP(SampleLevelDP):
    """DP-SGD whose unit of privacy is a user of the silo (all of that user's examples).

    Attributes (besides ``SampleLevelDP``'s, with ``max_grad_norm`` now the per-user bound):
        user_parameters: names of ``nn.Embedding`` submodules whose row ``i`` belongs to the
            user of batch row ``i`` alone (e.g. ``("user_embedding",)``); trained unclipped and
            un-noised, never released (see the module docstring for why that is sound).
            They need ``clipping`` resolving to ``"embedding"``.
        unit: ``"user"`` (what the report states as the unit of privacy).
    """

    user_parameters: tuple[str, ...] = ()
    unit: ClassVar[str] = "user"

    def __post_init__(self) -> None:
        super().__post_init__()
        names = self.user_parameters
        if isinstance(names, str) or not isinstance(names, (tuple, list)) or not all(isinstance(n, str) and n for n in names):
            raise DPTypeError(f"user_parameters must be a tuple of submodule names, got {names!r}")
        object.__setattr__(self, "user_parameters", tuple(names))

    def attach(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: torch.utils.data.DataLoader,
        *,
        generator: torch.Generator | None = None,
    ) -> UserLevelTraining:
        """Make ``module``'s training differentially private per user.

        Args:
            module: the user's model; a batch of the grouped dataset has one row per user.
            optimizer: an optimizer over (a subset of) ``module``'s parameters.
            data_loader: a loader over examples whose dataset has ``by_user()``; its number of
                batches sets the user sampling rate ``1 / len(data_loader)``, its ``collate_fn``
                collates the grouped batches.
            generator: seeds Poisson sampling of users and the noise.

        Raises:
            DPTypeError: a dataset without ``by_user()``.
            DPValueError: fewer users than steps per epoch, a user parameter that is not an
                embedding table of ``module``, or one with another clipping mode or an
                optimizer that couples elements.
        """
        return UserLevelTraining(self, module, optimizer, data_loader, generator=generator)


class _UserBatches(torch.utils.data.Sampler):
    """``steps`` shuffled batches of near-equal size over ``n`` users (for ``poisson_sampling=False``)."""

    def __init__(self, n: int, steps: int, generator: torch.Generator | None) -> None:
        self.n, self.steps, self.generator = n, steps, generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator).numpy()
        for part in np.array_split(order, self.steps):
            yield part.tolist()


class _GroupedPoissonLoader:
    """The Poisson batches of users of Opacus's loader, collated by the grouped dataset itself.

    Opacus's loader answers an empty first batch with a list of zero tensors, which a task's loss
    cannot read; with a few dozen users per step an empty batch is not rare. Here every batch,
    empty or not, is what ``collate_fn(dataset.__getitems__(indices))`` makes of it.
    """

    def __init__(self, loader: torch.utils.data.DataLoader, users: torch.utils.data.Dataset, collate_fn: Any) -> None:
        self.loader, self.dataset, self.collate_fn = loader, users, collate_fn

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        fetch = getattr(self.dataset, "__getitems__", None)
        for indices in self.loader.batch_sampler:
            indices = list(indices)
            yield self.collate_fn(fetch(indices) if fetch is not None else [self.dataset[i] for i in indices])


class UserLevelTraining:
    """A ``PrivateTraining`` over users; made by ``UserLevelDP.attach``.

    Attributes:
        module: the user's own module (never wrapped).
        data_loader: the Poisson loader over users to iterate over (batches may be empty).
        sample_rate: per-step sampling probability of a user.
        expected_batch_size: expected users per step (the averaging denominator).
        users: users in the silo.
        unit: ``"user"``.
    """

    unit = "user"

    def __init__(
        self,
        config: UserLevelDP,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: torch.utils.data.DataLoader,
        *,
        generator: torch.Generator | None,
    ) -> None:
        if not isinstance(data_loader, torch.utils.data.DataLoader):
            raise DPTypeError(f"data_loader must be a torch DataLoader, got {type(data_loader).__name__}")
        by_user = getattr(data_loader.dataset, "by_user", None)
        if not callable(by_user):
            raise DPTypeError(
                "user-level DP needs data_loader.dataset to have by_user() (one item per user holding all of "
                f"its examples), got {type(data_loader.dataset).__name__}"
            )
        users = by_user()
        steps = len(data_loader)
        self.users = len(users)
        if steps == 0:
            raise DPValueError("data_loader must yield at least one batch, got an empty loader")
        if self.users < steps:
            raise DPValueError(
                f"user-level DP samples each of the {self.users} users with probability 1/len(data_loader) = 1/{steps}: "
                "fewer than one user per step; use fewer, larger batches (batch_size)"
            )
        tables = _user_tables(module, config.user_parameters)
        if tables:
            _check_user_optimizer(optimizer)
        loader = torch.utils.data.DataLoader(
            users, batch_sampler=_UserBatches(self.users, steps, generator), collate_fn=data_loader.collate_fn
        )
        frozen = [t.weight for _, t in tables if t.weight.requires_grad]
        for w in frozen:  # so that the per-sample machinery neither clips nor noises them
            w.requires_grad_(False)
        try:
            if tables and resolve_clipping(module, config.clipping) != "embedding":
                raise DPValueError(
                    f"user_parameters {config.user_parameters!r} need clipping 'embedding', but clipping={config.clipping!r} "
                    f"resolves to {resolve_clipping(module, config.clipping)!r} for this module"
                )
            self._inner = PrivateTraining(config, module, optimizer, loader, generator=generator)
        finally:
            for w in frozen:
                w.requires_grad_(True)
        self._loader = (
            _GroupedPoissonLoader(self._inner.data_loader, users, data_loader.collate_fn)
            if config.poisson_sampling else self._inner.data_loader
        )  # fmt: skip
        self._tables = [(name, t) for name, t in tables if t.weight.requires_grad]
        self._reads = _RowReads(self._tables)

    # ----------------------------------------------------------------------------- delegated

    @property
    def module(self) -> nn.Module:
        return self._inner.module

    @property
    def data_loader(self) -> Any:
        return self._loader

    @property
    def steps(self) -> int:
        return self._inner.steps

    @property
    def sample_rate(self) -> float:
        return self._inner.sample_rate

    @property
    def expected_batch_size(self) -> int:
        return self._inner.expected_batch_size

    @property
    def clipping(self) -> str:
        return self._inner.clipping

    @property
    def noise_multiplier(self) -> float:
        return self._inner.noise_multiplier

    @property
    def max_grad_norm(self) -> float:
        return self._inner.max_grad_norm

    @property
    def last_norms(self) -> torch.Tensor | None:
        """Per-user gradient norms (of the clipped parameters) of the last step, before clipping."""
        clipper = self._inner._clipper
        return None if clipper is None else clipper.last_norms

    def flush(self) -> None:
        self._inner.flush()

    def opacus_epsilon(self, *, delta: float) -> float:
        return self._inner.opacus_epsilon(delta=delta)

    # ----------------------------------------------------------------------------- training

    def step(self, per_sample_loss: torch.Tensor) -> None:
        """One step: user-owned rows take their own gradient, the rest per-user clipped DP-SGD.

        Args:
            per_sample_loss: shape ``(U,)``, one loss per user of the batch (the sum of the
                user's example losses); empty for an empty Poisson batch.
        """
        try:
            if (
                self._tables and isinstance(per_sample_loss, torch.Tensor) and per_sample_loss.dim() == 1
                and per_sample_loss.numel() > 0 and per_sample_loss.requires_grad
            ):  # fmt: skip
                grads = self._reads.own_gradients(per_sample_loss)
                scale = 1.0 / float(self._inner.expected_batch_size)
                for (_, t), g in zip(self._tables, grads.values()):
                    t.weight.grad = None if g is None else g.mul_(scale)
        finally:
            self._reads.forget()
        self._inner.step(per_sample_loss)

    def event(self, *, client_id: str, round_index: int) -> SampleLevelEvent:
        """The ledger event for this silo's run so far: per-user rate, ``unit="user"``."""
        return dataclasses.replace(self._inner.event(client_id=client_id, round_index=round_index), unit="user")

    def detach(self) -> nn.Module:
        """Remove every hook; return the user's own module (see ``PrivateTraining.detach``)."""
        self._reads.remove()
        return self._inner.detach()

    def __repr__(self) -> str:
        return f"UserLevelTraining(users={self.users}, {self._inner!r})"


def _user_tables(module: nn.Module, names: tuple[str, ...]) -> list[tuple[str, nn.Embedding]]:
    subs = dict(module.named_modules())
    out = []
    for name in names:
        table = subs.get(name)
        if not isinstance(table, nn.Embedding):
            found = type(table).__name__ if table is not None else "no such submodule"
            raise DPValueError(f"user_parameters entry {name!r} must name an nn.Embedding of module, got {found}")
        out.append((name, table))
    return out


def _check_user_optimizer(optimizer: torch.optim.Optimizer) -> None:
    if not isinstance(optimizer, _ELEMENTWISE):
        allowed = ", ".join(c.__name__ for c in _ELEMENTWISE)
        raise DPValueError(
            f"user_parameters need an optimizer known to update each element on its own ({allowed}), so that one "
            f"user's row depends on that user alone; got {type(optimizer).__name__}"
        )


class _RowReads:
    """Records which rows the user tables read, so a step can check that row ``i`` is batch row ``i``'s own."""

    def __init__(self, tables: list[tuple[str, nn.Embedding]]) -> None:
        self.tables = tables
        self._lookups: dict[str, list[torch.Tensor]] = {}
        self._handles = [t.register_forward_hook(self._record(name)) for name, t in tables]

    def _record(self, name: str):
        def hook(layer: nn.Module, args: tuple, output: Any) -> None:
            if torch.is_grad_enabled() and args:
                self._lookups.setdefault(name, []).append(args[0].detach())

        return hook

    def own_gradients(self, per_user_loss: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Each table's gradient of the summed losses, after checking every user read only its own row.

        Raises:
            DPValueError: a table read rows other than one distinct row per user.
        """
        batch = per_user_loss.shape[0]
        for name, calls in self._lookups.items():
            first = calls[0]
            ok = first.dim() == 1 and first.shape[0] == batch and torch.unique(first).numel() == batch
            if not ok or any(not torch.equal(c, first) for c in calls[1:]):
                raise DPValueError(
                    f"user parameter {name!r} must read one distinct row per user (indices of shape ({batch},), the same "
                    f"in every call), got indices of shape {tuple(first.shape)} in {len(calls)} call(s): another user's "
                    "row would then learn from this user's data"
                )
        weights = [t.weight for _, t in self.tables]
        grads = torch.autograd.grad(per_user_loss.sum(), weights, retain_graph=True, allow_unused=True) if weights else ()
        return {name: g for (name, _), g in zip(self.tables, grads)}

    def forget(self) -> None:
        self._lookups = {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._lookups = {}


def clipped_user_gradients(
    module: nn.Module,
    per_user_loss: Callable[[nn.Module], torch.Tensor],
    *,
    max_grad_norm: float,
    user_parameters: tuple[str, ...] = (),
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
    """A silo's half of user-level DP across silos: the sum of its users' clipped gradients.

    Each user's gradient of the shared parameters (every trainable parameter outside the user
    tables) is clipped to ``max_grad_norm`` over all of them together, and the clipped gradients
    are summed; adding or removing one user moves the sum by at most ``max_grad_norm``. The noise
    is not added here: it is added once to the sum over all silos (central, or in shares by the
    silos before masking), which is what makes the silos' users share one noise draw. The user
    tables' gradients come back unclipped: row ``i`` is read by user ``i``'s examples alone and
    never leaves the silo (the module docstring says why that keeps the guarantee).

    Args:
        module: the model; ``per_user_loss(module)`` runs its forward on a batch grouped by
            user and returns one loss per user, shape ``(U,)``, row ``i``'s from user ``i``'s data
            alone (a loss that mixes rows, such as one centred on the batch mean, breaks the
            bound). In training mode it must draw no randomness of its own (dropout): the
            masks of a shared stream depend on each user's position in the batch, so removing
            one user would change the others' gradients.
        max_grad_norm: the per-user L2 bound (the sensitivity of the sum).
        user_parameters: names of the ``nn.Embedding`` tables whose row ``i`` is user ``i``'s.

    Returns:
        ``(shared, own)``: parameter name to the clipped sum, and table name to its gradient.

    Raises:
        DPValueError: a bad bound, a loss not of shape ``(U,)``, a user table that is not an
            embedding of ``module`` or that reads rows not one per user, active dropout.
        UnsupportedModelError: a layer the per-user clipping has no rule for.
    """
    bound = chk.positive("max_grad_norm", max_grad_norm)
    random = [name or "the module" for name, m in module.named_modules() if _draws_randomness(m)] if module.training else []
    if random:
        raise DPValueError(
            f"clipped_user_gradients needs a module that draws no randomness in training mode, but {random} apply "
            "dropout: its masks follow each user's position in the batch, so removing one user would change the "
            "others' gradients; set their dropout to 0"
        )
    tables = [(n, t) for n, t in _user_tables(module, tuple(user_parameters)) if t.weight.requires_grad]
    for _, t in tables:  # so that the clipper neither clips them nor sums them
        t.weight.requires_grad_(False)
    try:
        clipper = BookKeepingClipper(module, max_grad_norm=bound)
    finally:
        for _, t in tables:
            t.weight.requires_grad_(True)
    reads = _RowReads(tables)
    try:
        losses = per_user_loss(module)
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise DPValueError(f"per_user_loss must return one loss per user, shape (U,), got {shape}")
        own = reads.own_gradients(losses)
        sums = clipper.clipped_sum(losses)
    finally:
        reads.remove()
        clipper.remove()
    names = {id(p): n for n, p in module.named_parameters()}
    return {names[id(p)]: g for p, g in sums.items()}, own


_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _draws_randomness(m: nn.Module) -> bool:
    """Dropout layers with p > 0, and attention whose functional dropout is on."""
    if isinstance(m, _DROPOUTS):
        return m.p > 0
    return isinstance(m, nn.MultiheadAttention) and m.dropout > 0
