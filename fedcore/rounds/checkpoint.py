"""Checkpoints after every round: plain arrays and JSON in a folder, written atomically.

Format ``fedcore-checkpoint/2`` (no pickle anywhere, so a checkpoint is safe to load), the server
party's folder:

- ``state.json``: format, round index, seed, history (list of round records), ledger (JSON),
  strategy name, whatever the caller adds under ``extra``, and the SHA-256 of the two array files.
- ``global.npy``: the global float32 vector.
- ``strategy.npz``: the server optimizer state (may be empty).

Local-only parameters never enter it: each client party keeps its own in a file of its own
(:func:`save_local_state`, one ``<client>.npz`` per client in the client's folder).

Beside the folder, ``<folder>.begun.json`` is the write-ahead record of a round that began after
the checkpoint (:func:`save_begun_round`): its number and the privacy events it planned. A round
interrupted by a crash may have released noised updates to the server; the resumed run charges
those events instead of running the round again under the same number.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, cast

import numpy as np

from ..errors import ConfigError

__all__ = [
    "Checkpoint",
    "BegunRound",
    "save_checkpoint",
    "load_checkpoint",
    "save_local_state",
    "load_local_states",
    "save_client_ledger",
    "load_client_ledger",
    "load_client_ledgers",
    "saved_client_ids",
    "save_begun_round",
    "load_begun_round",
    "clear_begun_round",
    "FORMAT",
]

FORMAT = "fedcore-checkpoint/2"
_ARRAY_FILES = ("global.npy", "strategy.npz")


@dataclass(frozen=True)
class Checkpoint:
    """Everything needed to resume a run bit for bit."""

    round_index: int
    seed: int
    global_vector: np.ndarray
    strategy_state: dict[str, np.ndarray]
    history: list[dict[str, Any]]
    ledger_json: str | None
    extra: dict[str, Any]


@dataclass(frozen=True)
class BegunRound:
    """A round that began after the last checkpoint: its number and its planned ledger events (as dicts)."""

    round_index: int
    events: list[dict[str, Any]]


def _begun_path(folder: str | Path) -> Path:
    folder = Path(folder)
    return folder.with_name(folder.name + ".begun.json")


def save_begun_round(folder: str | Path, begun: BegunRound) -> Path:
    """Write the write-ahead record of ``begun`` beside checkpoint ``folder``, atomically."""
    path = _begun_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    record = {"format": FORMAT, "round": begun.round_index, "events": begun.events}
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_begun_round(folder: str | Path) -> BegunRound | None:
    """The write-ahead record beside checkpoint ``folder`` (None if there is none).

    Raises:
        ConfigError: the record is damaged or of another format.
    """
    path = _begun_path(folder)
    if not path.exists():
        return None
    record = _read(path, lambda p: json.loads(p.read_text(encoding="utf-8")))
    if not isinstance(record, dict) or record.get("format") != FORMAT or not isinstance(record.get("events"), list):
        raise ConfigError(f"write-ahead record {str(path)!r} is damaged or not of format {FORMAT!r}")
    return BegunRound(round_index=int(record["round"]), events=list(record["events"]))


def clear_begun_round(folder: str | Path) -> None:
    """Remove the write-ahead record beside ``folder`` (its round is in the checkpoint now)."""
    _begun_path(folder).unlink(missing_ok=True)


def save_checkpoint(folder: str | Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` to ``folder`` atomically (a crash leaves the previous one intact)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ckpt-", dir=folder.parent))
    try:
        np.save(tmp / "global.npy", checkpoint.global_vector, allow_pickle=False)
        np.savez(tmp / "strategy.npz", **cast("dict[str, Any]", checkpoint.strategy_state))
        state = {
            "sha256": {name: _digest(tmp / name) for name in _ARRAY_FILES},
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


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
    digests = state.get("sha256")
    for name in _ARRAY_FILES:
        found = _read(folder / name, _digest)
        if not isinstance(digests, dict) or digests.get(name) != found:
            raise ConfigError(f"checkpoint file {str(folder / name)!r} does not match the SHA-256 in state.json: it was changed")
    global_vector = _read(folder / "global.npy", lambda p: np.load(p, allow_pickle=False))
    strategy_state = _read(folder / "strategy.npz", _arrays)
    return Checkpoint(
        round_index=int(state["round"]),
        seed=int(state["seed"]),
        global_vector=global_vector,
        strategy_state=strategy_state,
        history=list(state["history"]),
        ledger_json=state.get("ledger"),
        extra=dict(state.get("extra") or {}),
    )


def save_local_state(folder: str | Path, client_id: str, params: Mapping[str, np.ndarray]) -> Path:
    """Write one client's local-only parameters to its own file, ``<folder>/<client_id>.npz``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{client_id}.npz"
    tmp = folder / f".{client_id}.npz.tmp"
    with open(tmp, "wb") as fh:
        np.savez(fh, **cast("dict[str, Any]", params))
    os.replace(tmp, path)
    return path


def load_local_states(folder: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """Every client's local-only parameters saved in ``folder`` (none if it does not exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {path.stem: _read(path, _arrays) for path in sorted(folder.glob("*.npz"))}


def save_client_ledger(folder: str | Path, client_id: str, ledger_json: str) -> Path:
    """Write one client's own ledger (the updates it released) to ``<folder>/<client_id>.ledger.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{client_id}.ledger.json"
    tmp = folder / f".{client_id}.ledger.json.tmp"
    tmp.write_text(ledger_json, encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_client_ledger(folder: str | Path, client_id: str) -> str | None:
    """One client's own ledger (JSON) saved in ``folder``, or None."""
    path = Path(folder) / f"{client_id}.ledger.json"
    return _read(path, lambda p: p.read_text(encoding="utf-8")) if path.exists() else None


def load_client_ledgers(folder: str | Path) -> dict[str, str]:
    """Every client's own ledger (JSON) saved in ``folder`` (none if it does not exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    suffix = ".ledger.json"
    return {
        path.name[: -len(suffix)]: _read(path, lambda p: p.read_text(encoding="utf-8"))
        for path in sorted(folder.glob(f"*{suffix}"))
    }


def saved_client_ids(folder: str | Path) -> set[str]:
    """The clients that have a local-state or ledger file in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return set()
    return {p.stem for p in folder.glob("*.npz")} | {p.name[: -len(".ledger.json")] for p in folder.glob("*.ledger.json")}
