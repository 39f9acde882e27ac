"""Mapping between a model's shared trainable parameters and one flat float32 vector."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

__all__ = ["ParameterLayout", "ParameterSlot"]

LocalOnly = Sequence[str] | Callable[[str], bool]


@dataclass(frozen=True)
class ParameterSlot:
    """Where one parameter lives in the flat vector."""

    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


class ParameterLayout:
    """Flattens the shared trainable parameters of a model, and writes a vector back.

    Only parameters that require gradients and are not local-only enter the vector; local-only
    parameters (private user embeddings, say) are named by glob patterns such as
    ``"user_embedding.*"`` or by a predicate on the parameter name, and never leave the client.
    The mapping is exact: every shared parameter must be float32.

    Raises:
        TypeError: a shared parameter is not float32, or ``local_only`` has the wrong type.
        ValueError: no parameter is shared, or a model given later does not fit the layout.
    """

    def __init__(self, model: nn.Module, *, local_only: LocalOnly = ()) -> None:
        self._is_local = _local_predicate(local_only)
        slots: list[ParameterSlot] = []
        offset = 0
        for name, param in model.named_parameters():
            if not param.requires_grad or self._is_local(name):
                continue
            if param.dtype != torch.float32:
                raise TypeError(
                    f"shared parameter {name!r} has dtype {param.dtype}; ParameterLayout maps "
                    "float32 parameters exactly, so cast the model with model.float() first"
                )
            slots.append(ParameterSlot(name, tuple(param.shape), offset, param.numel()))
            offset += param.numel()
        if not slots:
            raise ValueError("the model has no shared trainable parameter; check local_only and requires_grad")
        self.slots: tuple[ParameterSlot, ...] = tuple(slots)
        self.size = offset

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the shared parameters, in the order they appear in the flat vector."""
        return tuple(s.name for s in self.slots)

    def is_local(self, name: str) -> bool:
        """Whether a parameter of this name stays on the client."""
        return self._is_local(name)

    def flatten(self, model: nn.Module) -> torch.Tensor:
        """The shared parameters of ``model`` as one new float32 CPU vector."""
        params = self._params(model)
        return torch.cat([params[s.name].detach().reshape(-1).to("cpu") for s in self.slots])

    def load_into(self, model: nn.Module, vector: torch.Tensor) -> None:
        """Copy ``vector`` into the shared parameters of ``model`` in place."""
        self._check_vector(vector)
        params = self._params(model)
        with torch.no_grad():
            for s in self.slots:
                part = vector[s.offset : s.offset + s.numel].view(s.shape)
                params[s.name].copy_(part)

    def to_state_dict(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        """The shared parameters as a state dict of views into ``vector``."""
        self._check_vector(vector)
        return {s.name: vector[s.offset : s.offset + s.numel].view(s.shape) for s in self.slots}

    def from_state_dict(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Gather the shared entries of ``state`` into one vector.

        Raises:
            ValueError: a shared parameter is missing or has another shape.
        """
        parts = []
        for s in self.slots:
            if s.name not in state:
                raise ValueError(f"state dict lacks shared parameter {s.name!r}")
            tensor = state[s.name]
            if tuple(tensor.shape) != s.shape:
                raise ValueError(f"parameter {s.name!r} has shape {tuple(tensor.shape)}, layout expects {s.shape}")
            parts.append(tensor.detach().reshape(-1).to(device="cpu", dtype=torch.float32))
        return torch.cat(parts)

    def local_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Copies of the local-only trainable parameters (kept by the client between rounds)."""
        return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad and self._is_local(name)}

    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(model.named_parameters())
        for s in self.slots:
            p = params.get(s.name)
            if p is None or tuple(p.shape) != s.shape:
                found = None if p is None else tuple(p.shape)
                raise ValueError(f"model does not fit the layout: parameter {s.name!r} expected {s.shape}, found {found}")
        return params

    def _check_vector(self, vector: torch.Tensor) -> None:
        if not isinstance(vector, torch.Tensor):
            raise TypeError(f"vector must be a torch.Tensor, got {type(vector).__name__}")
        if vector.dtype != torch.float32 or vector.ndim != 1 or vector.numel() != self.size:
            raise ValueError(
                f"vector must be 1-D float32 of length {self.size}, got dtype {vector.dtype} and shape {tuple(vector.shape)}"
            )


def _local_predicate(local_only: LocalOnly) -> Callable[[str], bool]:
    if callable(local_only):
        return local_only
    if isinstance(local_only, str) or not isinstance(local_only, Iterable):
        raise TypeError(f"local_only must be a sequence of glob patterns or a predicate on names, got {local_only!r}")
    patterns = tuple(local_only)
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)
