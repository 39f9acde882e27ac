"""Bring your own model and data: a task from a model factory, a per-example loss and metrics.

:class:`SimpleTask` implements the :class:`~fedcore.workloads.task.Task` protocol for data whose items are
``(features, label)`` pairs (what :func:`federate_data` makes), so a researcher writes no class.
:func:`federate_data` splits tensors, NumPy arrays, a pandas DataFrame or a Hugging Face
``datasets.Dataset`` into clients with one of the partitioners of :mod:`fedcore.workloads.partition`,
then splits each client's share into train, validation and test inside that client.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..errors import ConfigError
from ..workloads import partition as part
from ..workloads.task import ClientData

__all__ = ["SimpleTask", "federate_data", "PARTITIONS"]

PARTITIONS = ("iid", "dirichlet", "column")

Metric = Callable[[torch.Tensor, torch.Tensor], Any]


class SimpleTask:
    """A :class:`~fedcore.workloads.task.Task` from a model factory, a per-example loss and metrics.

    Batches are ``(features, labels)``; the model maps features to outputs; the loss maps
    ``(outputs, labels)`` to one loss per example (``reduction="none"``), which the federation
    averages and DP-SGD clips example by example. Metrics map ``(outputs, labels)`` of a whole
    split to a number (so AUC-like metrics see all examples); ``loss`` is always reported too.

    Args:
        model: builds a fresh model (called once per party, after torch is seeded).
        loss: per-example loss, e.g. ``torch.nn.CrossEntropyLoss(reduction="none")``.
        metrics: name -> metric; the first one is the primary metric (default: ``loss``).
        local_only: glob patterns of parameter names that never leave a client.
        higher_is_better: direction of the primary metric (``loss``: lower is better).
        name: shown in logs and reports.

    Raises:
        ConfigError: a model factory that does not build an ``nn.Module``, a loss or metric that
            is not callable, or a metric named ``loss``.
    """

    def __init__(
        self,
        *,
        model: Callable[[], nn.Module],
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        metrics: Mapping[str, Metric] | None = None,
        local_only: Sequence[str] = (),
        higher_is_better: bool = True,
        name: str = "task",
    ) -> None:
        if not callable(model) or isinstance(model, nn.Module):
            raise ConfigError(
                f"model must be a factory that builds a fresh nn.Module (e.g. lambda: nn.Linear(4, 2)), got {type(model).__name__}"
            )
        if not callable(loss):
            raise ConfigError(f"loss must be a callable (outputs, labels) -> per-example losses, got {type(loss).__name__}")
        metrics = dict(metrics or {})
        for key, fn in metrics.items():
            if not isinstance(key, str) or not key or key == "loss":
                raise ConfigError(f"metric names must be non-empty strings other than 'loss' (always reported), got {key!r}")
            if not callable(fn):
                raise ConfigError(f"metrics[{key!r}] must be a callable (outputs, labels) -> number, got {type(fn).__name__}")
        if isinstance(local_only, str):
            raise ConfigError(f"local_only must be a tuple of name patterns, got the string {local_only!r}")
        self._factory = model
        self._loss = loss
        self._metrics = metrics
        self.name = name
        self.local_only = tuple(local_only)
        self.primary_metric = next(iter(metrics), "loss")
        self.higher_is_better = bool(higher_is_better) if metrics else False

    @property
    def metric_names(self) -> tuple[str, ...]:
        """The names :meth:`evaluate` reports."""
        return ("loss", *self._metrics)

    def build_model(self) -> nn.Module:
        """A fresh model from the factory."""
        model = self._factory()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model() must return an nn.Module, got {type(model).__name__}")
        return model

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-example losses of ``batch``, shape ``(batch_size,)``.

        Raises:
            ConfigError: the loss returned anything else (a reduced scalar, or a shape that is
                not one value per example).
        """
        x, y = batch
        losses = self._loss(model(x), y)
        if not isinstance(losses, torch.Tensor) or losses.shape != (len(y),):
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ConfigError(
                f"loss must return one loss per example, shape ({len(y)},) for this batch, got {shape}: "
                "pass an unreduced loss, e.g. nn.CrossEntropyLoss(reduction='none')"
            )
        return losses

    def evaluate(self, model: nn.Module, data: Dataset) -> dict[str, float]:
        """The mean loss and every metric on ``data`` (all its examples at once)."""
        outputs, labels = [], []
        with torch.no_grad():
            for x, y in DataLoader(data, batch_size=1024, collate_fn=self.collate):
                outputs.append(model(x))
                labels.append(y)
        out, y = torch.cat(outputs), torch.cat(labels)
        scores = {"loss": float(self._loss(out, y).mean())}
        scores.update({k: float(fn(out, y)) for k, fn in self._metrics.items()})
        return scores

    def predict(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The model's outputs for ``batch`` (output ensembles average them)."""
        return model(batch[0])

    def collate(self, items: list[Any]) -> Any:
        """Stack ``(features, label)`` items into a batch."""
        xs, ys = zip(*items)
        return torch.stack(xs), torch.stack(ys)


def federate_data(
    features: Any,
    labels: Any = None,
    *,
    clients: int | None,
    partition: str = "iid",
    alpha: float | None = None,
    column: Any = None,
    label: str | None = None,
    feature_columns: Sequence[str] | None = None,
    validation: float = 0.0,
    test: float = 0.0,
    seed: int = 0,
) -> dict[str, ClientData]:
    """Split a data set into clients, then each client's share into train, validation and test.

    Args:
        features: a tensor or array of shape ``(n, ...)``, or a pandas DataFrame / Hugging Face
            ``datasets.Dataset`` (then name the ``label`` column; the features are
            ``feature_columns``, by default every other numeric column but ``column``).
        labels: ``(n,)`` labels for tensor or array features (integers become class indices,
            anything else float32 targets).
        clients: how many clients; with ``partition="column"`` None gives one per value.
        partition: ``"iid"`` (a shuffle cut into equal parts), ``"dirichlet"`` (label skew,
            each label spread by Dirichlet(``alpha``) shares) or ``"column"`` (natural groups: one
            per value of ``column``, merged largest first into ``clients`` when given).
        alpha: the Dirichlet concentration (small: strongly non-IID); only with ``"dirichlet"``.
        column: with ``"column"``: a column name (DataFrame / Dataset) or ``(n,)`` values.
        validation / test: fractions of each client's examples held out (in ``[0, 1)``, together
            below 1); split inside the client, with ``seed``.
        seed: fixes the partition and the splits.

    Returns:
        ``{client_id: ClientData}``: ids ``client-0``... or, for a column partition with one
        client per value, ``"<column>=<value>"``.

    Raises:
        ConfigError: a parameter out of range or not fitting the others, naming it, its value
            and what is allowed.
    """
    if partition not in PARTITIONS:
        raise ConfigError(f"partition must be one of {PARTITIONS}, got {partition!r}")
    if alpha is not None and partition != "dirichlet":
        raise ConfigError(f"alpha applies to partition='dirichlet' only, got alpha={alpha!r} with partition={partition!r}")
    if column is not None and partition != "column":
        raise ConfigError(f"column applies to partition='column' only, got column={column!r} with partition={partition!r}")
    for name, value in (("validation", validation), ("test", test)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise ConfigError(f"{name} must be a fraction in [0, 1), got {value!r}")
    if validation + test >= 1:
        raise ConfigError(f"validation + test must be < 1 so that clients keep training data, got {validation!r} + {test!r}")
    if clients is not None and (isinstance(clients, bool) or not isinstance(clients, int) or clients < 1):
        raise ConfigError(f"clients must be an int >= 1, got {clients!r}")
    if clients is None and partition != "column":
        raise ConfigError(f"clients=None (one client per value) needs partition='column', got partition={partition!r}")
    x, y, groups, group_name = _arrays(features, labels, label=label, feature_columns=feature_columns, column=column)
    rng = np.random.default_rng(seed)
    try:
        if partition == "iid":
            parts = part.iid(len(y), clients, rng)  # type: ignore[arg-type]
        elif partition == "dirichlet":
            if alpha is None:
                raise ConfigError("partition='dirichlet' needs alpha (the Dirichlet concentration, e.g. 0.5), got None")
            if y.is_floating_point():
                raise ConfigError("partition='dirichlet' skews class labels, but the labels are floats; use 'iid' or 'column'")
            parts = part.dirichlet_by_label(y.numpy(), clients, alpha, rng)  # type: ignore[arg-type]
        else:
            if groups is None:
                raise ConfigError("partition='column' needs column= (a column name, or one value per example)")
            parts = part.by_column(groups)
            keys = part.distinct_values(groups)
            if clients is not None:
                parts = part.merge_groups(parts, clients)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"cannot partition {len(y)} examples with partition={partition!r}: {exc}") from exc
    if partition == "column" and clients is None:
        ids = [f"{group_name}={k}" for k in keys]
    else:
        ids = [f"client-{i}" for i in range(len(parts))]
    return {cid: _client(x, y, idx, validation=validation, test=test, rng=rng, cid=cid) for cid, idx in zip(ids, parts)}


def _client(x: torch.Tensor, y: torch.Tensor, idx: np.ndarray, *, validation: float, test: float, rng, cid: str) -> ClientData:
    idx = rng.permutation(idx)
    n_test, n_val = int(round(test * idx.size)), int(round(validation * idx.size))
    if idx.size - n_test - n_val < 1:
        raise ConfigError(f"client {cid!r} holds {idx.size} examples, none left for training after validation and test")

    def subset(i: np.ndarray) -> TensorDataset | None:
        t = torch.from_numpy(np.sort(i))
        return TensorDataset(x[t], y[t]) if i.size else None

    train = subset(idx[n_test + n_val :])
    assert train is not None
    return ClientData(train=train, validation=subset(idx[n_test : n_test + n_val]), test=subset(idx[:n_test]))


def _arrays(
    features: Any, labels: Any, *, label: str | None, feature_columns: Sequence[str] | None, column: Any
) -> tuple[torch.Tensor, torch.Tensor, Any, str]:
    """Features as a float32 tensor, labels as a tensor, and the partition column's values."""
    table = _table(features)
    group_name = column if isinstance(column, str) else "group"
    if table is not None:
        if labels is not None:
            raise ConfigError("labels: for a DataFrame or Dataset name the label column with label=, not labels=")
        if label is None or label not in table.columns:
            raise ConfigError(f"label must name a column of the table, got {label!r}; columns: {list(table.columns)}")
        if column is not None and not isinstance(column, str):
            raise ConfigError(f"column must name a column of the table, got {type(column).__name__}")
        if isinstance(column, str) and column not in table.columns:
            raise ConfigError(f"column must name a column of the table, got {column!r}; columns: {list(table.columns)}")
        if feature_columns is None:
            feature_columns = [c for c in table.columns if c not in (label, column)]
        missing = [c for c in feature_columns if c not in table.columns]
        if missing or not feature_columns:
            raise ConfigError(f"feature_columns must name columns of the table, got {list(feature_columns)}")
        x = np.concatenate([_column(table[c], c).reshape(len(table), -1) for c in feature_columns], axis=1)
        y_raw = np.asarray(table[label])
        groups = None if column is None else table[column]
    else:
        if feature_columns is not None or label is not None:
            raise ConfigError("label and feature_columns name table columns: pass a DataFrame or Dataset, or labels=")
        if labels is None:
            raise ConfigError("labels must be given with tensor or array features (one label per example)")
        x = _numpy(features, "features").astype(np.float32)
        y_raw = _numpy(labels, "labels")
        groups = None if column is None else _numpy(column, "column")
        if groups is not None and groups.shape != (len(x),):
            raise ConfigError(f"column must hold one value per example, shape ({len(x)},), got {groups.shape}")
    if x.ndim < 1 or len(x) == 0:
        raise ConfigError(f"features must hold at least one example, got shape {x.shape}")
    if y_raw.shape != (len(x),):
        raise ConfigError(f"labels must hold one label per example, shape ({len(x)},), got {y_raw.shape}")
    if not np.all(np.isfinite(x)):
        raise ConfigError("features must be finite numbers, got NaN or infinity")
    if np.issubdtype(y_raw.dtype, np.integer) or np.issubdtype(y_raw.dtype, np.bool_):
        y = torch.from_numpy(y_raw.astype(np.int64))
    elif np.issubdtype(y_raw.dtype, np.floating):
        y = torch.from_numpy(y_raw.astype(np.float32))
    else:
        raise ConfigError(f"labels must be integers (classes) or floats (targets), got dtype {y_raw.dtype}")
    return torch.from_numpy(np.ascontiguousarray(x)), y, groups, group_name


def _table(data: Any) -> pd.DataFrame | None:
    """A pandas view of a DataFrame or a Hugging Face ``datasets.Dataset`` (None for arrays)."""
    if isinstance(data, pd.DataFrame):
        return data.reset_index(drop=True)
    if type(data).__module__.split(".")[0] == "datasets" and hasattr(data, "to_pandas"):
        return data.to_pandas()
    return None


def _column(values: pd.Series, name: str) -> np.ndarray:
    if values.dtype == object:  # e.g. a Dataset's list-valued feature column
        try:
            return np.stack([np.asarray(v, dtype=np.float32) for v in values])
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"feature column {name!r} must hold numbers or equal-length number lists") from exc
    if not pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        raise ConfigError(f"feature column {name!r} must be numeric, got dtype {values.dtype}; encode it or leave it out")
    return values.to_numpy(dtype=np.float32)


def _numpy(data: Any, name: str) -> np.ndarray:
    if isinstance(data, torch.Tensor):
        return data.detach().cpu().numpy()
    if isinstance(data, (np.ndarray, list, tuple, pd.Series)):
        return np.asarray(data)
    raise ConfigError(f"{name} must be a torch tensor, NumPy array, DataFrame or datasets.Dataset, got {type(data).__name__}")
