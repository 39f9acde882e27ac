"""Local training: the loop every client (and every centralized baseline) runs."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..errors import ConfigError
from ..workloads.task import ClientData, Task, move_to

__all__ = ["EarlyStopping", "TrainConfig", "TrainResult", "PrivateTraining", "SampleLevelPrivacy", "train_local"]

_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


@dataclass(frozen=True)
class EarlyStopping:
    """Stop local training when a validation metric stops improving.

    Attributes:
        metric: name of a metric returned by ``Task.evaluate`` on the validation split.
        min_delta: the smallest change that counts as an improvement (the seed's "minimum").
        patience: evaluations without improvement before stopping (the seed's "delay").
        higher_is_better: direction of ``metric``.
    """

    metric: str
    min_delta: float = 0.0
    patience: int = 1
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        if self.min_delta < 0:
            raise ConfigError(f"min_delta must be >= 0, got {self.min_delta!r}")
        if self.patience < 1:
            raise ConfigError(f"patience must be >= 1, got {self.patience!r}")

    def improved(self, value: float, best: float | None) -> bool:
        """Whether ``value`` beats ``best`` by more than ``min_delta`` in the metric's direction."""
        if best is None:
            return True
        gain = value - best if self.higher_is_better else best - value
        return gain > self.min_delta


@dataclass(frozen=True)
class TrainConfig:
    """How a client trains locally in one round.

    Attributes:
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        lr: learning rate.
        epochs: passes over the local training data.
        max_steps: optional cap on optimizer steps (whichever of epochs and steps ends first).
        batch_size: examples per step (expected batch size under DP-SGD's Poisson sampling).
        weight_decay: optimizer weight decay.
        momentum: SGD momentum.
        device: torch device, chosen explicitly (never silently moved to a GPU).
        early_stopping: optional stopping rule, checked after each epoch on validation data.
        user_clip: with FedSGD (update kind ``"gradient"``), user-level DP across silos: the
            client sends the sum over its users of each user's gradient clipped to this L2 bound
            (``dp.clipped_user_gradients``), and moves each user's own rows (the task's
            ``user_parameters``) by plain SGD at ``lr``; the noise is the update pipeline's. It
            takes one full pass, so ``batch_size`` is then users per chunk, and it needs
            ``optimizer="sgd"`` with no momentum, weight decay, early stopping or step cap.
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 32
    weight_decay: float = 0.0
    momentum: float = 0.0
    device: str = "cpu"
    early_stopping: EarlyStopping | None = None
    user_clip: float | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in _OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {sorted(_OPTIMIZERS)}, got {self.optimizer!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a finite number > 0, got {self.lr!r}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1 or None, got {self.max_steps!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if isinstance(self.momentum, bool) or not isinstance(self.momentum, (int, float)) or not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be a number in [0, 1), got {self.momentum!r}")
        if self.momentum and self.optimizer != "sgd":
            raise ConfigError(
                f"momentum applies to optimizer 'sgd' only, got optimizer {self.optimizer!r} with momentum {self.momentum!r}"
            )
        if self.user_clip is not None:
            if isinstance(self.user_clip, bool) or not (
                isinstance(self.user_clip, (int, float)) and math.isfinite(self.user_clip) and self.user_clip > 0
            ):
                raise ConfigError(f"user_clip must be a finite number > 0 or None, got {self.user_clip!r}")
            ignored = {"optimizer": self.optimizer != "sgd", "momentum": self.momentum != 0, "weight_decay": self.weight_decay != 0,
                       "epochs": self.epochs != 1, "max_steps": self.max_steps is not None,
                       "early_stopping": self.early_stopping is not None}  # fmt: skip
            bad = [name for name, differs in ignored.items() if differs]
            if bad:
                raise ConfigError(
                    f"user_clip (one pass of per-user clipped gradients, users' rows moved by plain SGD) cannot honour "
                    f"{', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}; use optimizer='sgd', momentum=0, "
                    "weight_decay=0, epochs=1, no max_steps and no early_stopping"
                )
        try:
            torch.device(self.device)
        except RuntimeError as exc:
            raise ConfigError(f"device must name a torch device such as 'cpu' or 'cuda:0', got {self.device!r}") from exc

    def dp_schedule(self, num_examples: int) -> tuple[int, float]:
        """DP-SGD steps per round and record sampling rate of a client holding ``num_examples``.

        One epoch is ``ceil(num_examples / batch_size)`` Poisson-sampled batches at rate
        ``1 / batches`` (as Opacus derives it from the loader); ``max_steps`` caps the steps.
        Calibration, budget planning and the ledger's events all use this one schedule.
        """
        batches = math.ceil(int(num_examples) / self.batch_size)
        steps = self.epochs * batches
        if self.max_steps is not None:
            steps = min(steps, self.max_steps)
        return steps, 1.0 / batches

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        """A fresh optimizer of the configured kind over ``params``."""
        cls = _OPTIMIZERS[self.optimizer]
        kwargs: dict[str, Any] = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self.optimizer == "sgd":
            kwargs["momentum"] = self.momentum
        return cls(params, **kwargs)


class PrivateTraining(Protocol):
    """A DP-SGD run wrapped around a module, optimizer and loader (see ``dp.SampleLevelDP``)."""

    @property
    def module(self) -> nn.Module:
        """The user's own module, to train."""

    @property
    def data_loader(self) -> Iterable[Any]:
        """The sampled batches to iterate over (users' batches for user-level DP)."""

    @property
    def steps(self) -> int:
        """Steps taken so far."""

    def step(self, per_sample_loss: torch.Tensor) -> None:
        """One DP-SGD step: per-sample clipping, noise, and the optimizer's update."""

    def event(self, *, client_id: str, round_index: int) -> Any:
        """The ledger event for the steps taken so far."""

    def detach(self) -> nn.Module:
        """The plain module again, without the per-sample gradient hooks."""


class SampleLevelPrivacy(Protocol):
    """Makes local training differentially private per example (``dp.SampleLevelDP``)."""

    def attach(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        *,
        generator: torch.Generator | None = None,
    ) -> PrivateTraining:
        """Wrap module, optimizer and loader for DP-SGD (Poisson batches drawn with ``generator``)."""


@dataclass(frozen=True)
class TrainResult:
    """What a local training run did: steps, epochs, last validation metrics, DP event if any."""

    steps: int
    epochs: int
    examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False
    privacy_event: Any = None


def train_local(
    model: nn.Module,
    *,
    task: Task,
    data: ClientData,
    config: TrainConfig,
    generator: torch.Generator,
    privacy: SampleLevelPrivacy | None = None,
    client_id: str = "central",
    round_index: int = 0,
) -> TrainResult:
    """Train ``model`` in place on ``data.train``; return what happened.

    With early stopping, the weights of the best validation epoch are restored at the end.
    With ``privacy``, the optimizer, loader and backward pass go through DP-SGD and the result
    carries the ledger event of this client's run.

    Raises:
        ConfigError: early stopping without validation data, or a metric the task does not report.
    """
    device = torch.device(config.device)
    model.to(device)
    model.train()
    stopping = config.early_stopping
    if stopping is not None and data.validation is None:
        raise ConfigError("early_stopping needs validation data, but this client has none")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = config.make_optimizer(trainable)
    loader = DataLoader(
        data.train,
        batch_size=config.batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=task.collate,
        drop_last=False,
    )
    private = privacy.attach(model, optimizer, loader, generator=generator) if privacy is not None else None
    train_module = private.module if private is not None else model
    train_loader = private.data_loader if private is not None else loader

    event = None
    try:  # a client that raises mid DP-SGD must leave no Opacus state on the shared model
        steps = 0
        epochs_run = 0
        best_value: float | None = None
        best_state: dict[str, torch.Tensor] | None = None
        bad_epochs = 0
        metrics: dict[str, float] = {}
        stopped_early = False
        for _ in range(config.epochs):
            train_module.train()
            for batch in train_loader:
                batch = move_to(batch, device)
                per_sample = task.loss(train_module, batch)
                if private is not None:
                    private.step(per_sample)
                else:
                    optimizer.zero_grad(set_to_none=True)
                    per_sample.mean().backward()
                    optimizer.step()
                steps += 1
                if config.max_steps is not None and steps >= config.max_steps:
                    break
            epochs_run += 1
            if stopping is not None:
                metrics = _validate(model, task, data)
                value = _metric(metrics, stopping.metric)
                if stopping.improved(value, best_value):
                    best_value, bad_epochs = value, 0
                    best_state = copy.deepcopy(model.state_dict())
                else:
                    bad_epochs += 1
                    if bad_epochs >= stopping.patience:
                        stopped_early = True
                        break
            if config.max_steps is not None and steps >= config.max_steps:
                break
        if private is not None:
            event = private.event(client_id=client_id, round_index=round_index)
    finally:
        if private is not None:
            private.detach()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    if stopping is None and data.validation is not None:
        metrics = _validate(model, task, data)
    return TrainResult(
        steps=steps,
        epochs=epochs_run,
        examples=data.num_train,
        metrics=metrics,
        stopped_early=stopped_early,
        privacy_event=event,
    )


def _validate(model: nn.Module, task: Task, data: ClientData) -> dict[str, float]:
    assert data.validation is not None
    model.eval()
    with torch.no_grad():
        return dict(task.evaluate(model, data.validation))


def _metric(metrics: dict[str, float], name: str) -> float:
    if name not in metrics:
        raise ConfigError(f"early_stopping.metric {name!r} is not among the task's metrics {sorted(metrics)}")
    return float(metrics[name])
