"""Metrics per round behind one small logger interface, and progress bars."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol

from tqdm.auto import tqdm

__all__ = ["MetricsLogger", "ConsoleLogger", "JsonlLogger", "TensorBoardLogger", "WandbLogger", "MultiLogger", "progress"]


class MetricsLogger(Protocol):
    """Receives the scalar metrics of each round."""

    def log(self, round_index: int, metrics: Mapping[str, float]) -> None:
        """Record the metrics of round ``round_index`` (non-numeric values are skipped)."""

    def close(self) -> None:
        """Flush and release the logger's resources."""


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class JsonlLogger:
    """One JSON object per round, appended to ``path`` (``{"round": t, ...metrics}``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, round_index: int, metrics: Mapping[str, float]) -> None:
        """Append one JSON line ``{"round": t, metric: value, ...}`` (NaN and Inf as null) and flush it."""
        row: dict[str, float | None] = {"round": round_index}
        row.update({k: (v if math.isfinite(v) else None) for k, v in _scalars(metrics).items()})
        self._file.write(json.dumps(row, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()


class TensorBoardLogger:
    """TensorBoard scalars, one tag per metric, step = round."""

    def __init__(self, logdir: str | Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(logdir))

    def log(self, round_index: int, metrics: Mapping[str, float]) -> None:
        """Write each numeric metric as a scalar at step ``round_index``."""
        for key, value in _scalars(metrics).items():
            self._writer.add_scalar(key, value, global_step=round_index)
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()


class WandbLogger:
    """Weights & Biases, optional; ``mode="offline"`` writes locally without a network.

    Raises:
        ImportError: wandb is not installed (with the command that installs it).
    """

    def __init__(
        self, *, project: str, mode: str = "offline", config: Mapping[str, Any] | None = None, dir: str | None = None
    ) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise ImportError("WandbLogger needs wandb: pip install wandb") from exc
        self._run = wandb.init(project=project, mode=mode, config=dict(config or {}), dir=dir)

    def log(self, round_index: int, metrics: Mapping[str, float]) -> None:
        """Log the numeric metrics to the run at step ``round_index``."""
        self._run.log(_scalars(metrics), step=round_index)

    def close(self) -> None:
        """Finish the run."""
        self._run.finish()


class MultiLogger:
    """Sends each round's metrics to several loggers."""

    def __init__(self, loggers: Iterable[MetricsLogger]) -> None:
        self.loggers = list(loggers)

    def log(self, round_index: int, metrics: Mapping[str, float]) -> None:
        """Pass the metrics to every logger."""
        for logger in self.loggers:
            logger.log(round_index, metrics)

    def close(self) -> None:
        """Close every logger."""
        for logger in self.loggers:
            logger.close()


def _in_kernel() -> bool:
    """Whether this process is a Jupyter kernel (``tqdm.auto``'s class differs from plain tqdm everywhere)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and hasattr(shell, "kernel")


def progress(*, total: int, desc: str, quiet: bool = False, leave: bool = True) -> tqdm:
    """A progress bar: a widget in Jupyter, text on a terminal, silent when asked or elsewhere.

    ``tqdm.auto`` picks the widget bar in a Jupyter kernel where ``ipywidgets`` is installed
    (the ``notebooks`` extra); a kernel's stderr is no terminal, so it is not asked. A text bar
    is drawn only on a terminal: in a log file its carriage returns would be noise.
    """
    disable = quiet or not (_in_kernel() or sys.stderr.isatty())
    return tqdm(total=total, desc=desc, disable=disable, leave=leave, dynamic_ncols=True)


class ConsoleLogger:
    """One line per round on stdout: progress that also shows when stdout is not a terminal."""

    def __init__(self, *, total_rounds: int, keys: tuple[str, ...] = ("test_", "epsilon")) -> None:
        self.total_rounds = total_rounds
        self.keys = keys

    def log(self, round_index: int, metrics: Mapping[str, float]) -> None:
        """Print ``round t/T (seconds)`` and the metrics whose names start with ``keys``."""
        shown = {k: v for k, v in _scalars(metrics).items() if k.startswith(self.keys)}
        text = "  ".join(f"{k}={v:.4f}" for k, v in sorted(shown.items()))
        seconds = metrics.get("round_seconds")
        took = f" ({seconds:.1f}s)" if isinstance(seconds, (int, float)) else ""
        print(f"round {round_index}/{self.total_rounds}{took}  {text}", flush=True)

    def close(self) -> None:
        """Nothing to release."""
        pass
