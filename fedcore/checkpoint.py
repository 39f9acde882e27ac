"""Checkpoints after every round: plain arrays and JSON in a folder, written atomically.

Format ``fedcore-checkpoint/1`` (no pickle anywhere, so a checkpoint is safe to load):

- ``state.json``: format, round index, seed, history (list of round records), ledger (JSON),
  strategy name, and whatever the caller adds under ``extra``.
- ``global.npy``: the global float32 vector.
- ``strategy.npz``: the server optimizer state (may be empty).
- ``clients.npz``: the simulated clients' local-only parameters, keyed ``"<client>\\x1f<param>"``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from .errors import ConfigError

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "FORMAT"]

FORMAT = "fedcore-checkpoint/1"
_SEP = "\x1f"


@dataclass(frozen=True)
class Checkpoint:
    """Everything needed to resume a run bit for bit."""

    round_index: int
    seed: int
    global_vector: np.ndarray
    strategy_state: dict[str, np.ndarray]
    client_states: dict[str, dict[str, np.ndarray]]
    history: list[dict[str, Any]]
    ledger_json: str | None
    extra: dict[str, Any]


def save_checkpoint(folder: str | Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` to ``folder`` atomically (a crash leaves the previous one intact)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ckpt-", dir=folder.parent))
    try:
        np.save(tmp / "global.npy", checkpoint.global_vector, allow_pickle=False)
        np.savez(tmp / "strategy.npz", **checkpoint.strategy_state)
        flat = {f"{cid}{_SEP}{name}": arr for cid, params in checkpoint.client_states.items() for name, arr in params.items()}
        np.savez(tmp / "clients.npz", **flat)
        state = {
            "format": FORMAT,
            "round": checkpoint.round_index,
            "seed": checkpoint.seed,
            "history": checkpoint.history,
            "ledger": checkpoint.ledger_json,
            "extra": checkpoint.extra,
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=1, sort_keys=True), encoding="utf-8")
        old = folder.with_name(folder.name + ".old")
        if folder.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _read(path: Path, reader: Callable[[Path], Any]) -> Any:
    """Read one checkpoint file; a missing, truncated or damaged file becomes a ConfigError naming it."""
    try:
        return reader(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"checkpoint file {str(path)!r} is missing or damaged: {type(exc).__name__}: {exc}") from None


def load_checkpoint(folder: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        ConfigError: the folder holds no checkpoint, one of another format, or a damaged file.
    """
    folder = Path(folder)
    state_path = folder / "state.json"
    if not state_path.is_file():
        old = folder.with_name(folder.name + ".old")
        if (old / "state.json").is_file():
            folder, state_path = old, old / "state.json"
        else:
            raise ConfigError(f"no checkpoint at {str(folder)!r} (state.json missing)")
    state = _read(state_path, lambda p: json.loads(p.read_text(encoding="utf-8")))
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ConfigError(f"checkpoint format {found!r} is not {FORMAT!r}")
    missing = [k for k in ("round", "seed", "history") if k not in state]
    if missing:
        raise ConfigError(f"checkpoint file {str(state_path)!r} lacks the fields {missing}")
    global_vector = _read(folder / "global.npy", lambda p: np.load(p, allow_pickle=False))
    strategy_state = _read(folder / "strategy.npz", _arrays)
    client_states: dict[str, dict[str, np.ndarray]] = {}
    for key, value in _read(folder / "clients.npz", _arrays).items():
        cid, name = key.split(_SEP, 1)
        client_states.setdefault(cid, {})[name] = value
    return Checkpoint(
        round_index=int(state["round"]),
        seed=int(state["seed"]),
        global_vector=global_vector,
        strategy_state=strategy_state,
        client_states=client_states,
        history=list(state["history"]),
        ledger_json=state.get("ledger"),
        extra=dict(state.get("extra") or {}),
    )


