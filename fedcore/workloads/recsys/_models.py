"""Recommendation models: matrix factorisation and a text-aware sequence transformer.

Every model scores candidate items for a batch of users: ``model(users, history, items)`` with
``users`` ``(B,)``, ``history`` ``(B, L)`` (item indices, most recent last, left-padded with
``num_items``) and ``items`` ``(B, C)`` returns scores ``(B, C)``. The models are built from
``nn.Embedding`` (``dp.PackedEmbedding`` where a packed batch reads it), ``nn.Linear`` and
``nn.LayerNorm`` only, so Opacus computes per-sample gradients for them without module
replacement; frozen text features are buffers, never parameters.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import dp

__all__ = ["MatrixFactorization", "SequenceRecommender"]


class MatrixFactorization(nn.Module):
    """Score = <user vector, item vector> + item bias (a GMF / NCF-style factorisation).

    The user table ``user_embedding`` is private: it belongs in a task's ``local_only`` patterns
    and never leaves the client. Item vectors are an id embedding, plus a trainable projection of
    frozen text features when ``item_features`` is given (MF + MiniLM features).
    """

    item_features: torch.Tensor  # a buffer, registered only with item_features

    def __init__(
        self, num_users: int, num_items: int, *, dim: int = 32, item_features: torch.Tensor | None = None, init_std: float = 0.1
    ) -> None:
        super().__init__()
        if num_users < 1 or num_items < 1:
            raise ValueError(f"num_users and num_items must be >= 1, got {num_users!r} and {num_items!r}")
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim!r}")
        self.num_items = num_items
        self.user_embedding = nn.Embedding(num_users, dim)
        self.item_embedding = dp.PackedEmbedding(num_items, dim)
        self.item_bias = dp.PackedEmbedding(num_items, 1)
        nn.init.normal_(self.user_embedding.weight, std=init_std)
        nn.init.normal_(self.item_embedding.weight, std=init_std)
        nn.init.zeros_(self.item_bias.weight)
        self.item_projection: nn.Linear | None = None
        if item_features is not None:
            feats = _check_features(item_features, num_items)
            self.register_buffer("item_features", feats, persistent=False)
            self.item_projection = nn.Linear(feats.shape[1], dim, bias=False)
            nn.init.normal_(self.item_projection.weight, std=init_std / math.sqrt(feats.shape[1]))

    @property
    def packs(self) -> bool:
        """Whether :meth:`forward` takes a packed batch (``sample``): the item tower is tables only."""
        return self.item_projection is None

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """Every item's vector (its embedding, plus the projected text features for ``mf_text``)."""
        vectors = self.item_embedding(items)
        if self.item_projection is not None:
            vectors = vectors + self.item_projection(self.item_features[items])
        return vectors

    def forward(
        self, users: torch.Tensor, history: torch.Tensor, items: torch.Tensor, sample: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scores ``(B, C)``; or, for a packed batch, ``items`` ``(E, C)`` of the users ``users[sample]``: ``(E, C)``."""
        del history  # MF has a per-user vector instead
        user = self.user_embedding(users)
        if sample is None:
            return torch.einsum("bd,bcd->bc", user, self.item_vectors(items)) + self.item_bias(items).squeeze(-1)
        if not self.packs:
            raise ValueError(
                "a packed batch (sample) needs an MF without item_features: the text projection reads batch-first rows"
            )
        scores = torch.einsum("ed,ecd->ec", user[sample], self.item_embedding(items, sample))
        return scores + self.item_bias(items, sample).squeeze(-1)


class _SelfAttentionBlock(nn.Module):
    """Pre-norm transformer encoder block over a padded sequence (padding masked as keys)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim must be divisible by heads, got dim={dim!r}, heads={heads!r}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff1 = nn.Linear(dim, 2 * dim)
        self.ff2 = nn.Linear(2 * dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``x`` ``(..., T, D)``, ``valid`` ``(..., T)``: any leading dims (a batch of users' examples too)."""
        *lead, t, d = x.shape
        h = self.norm1(x)
        split = lambda z: z.reshape(*lead, t, self.heads, d // self.heads).transpose(-3, -2)  # noqa: E731
        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        logits = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        logits = logits.masked_fill(~valid[..., None, None, :], float("-inf"))
        attn = self.dropout(torch.softmax(logits, dim=-1))
        x = x + self.dropout(self.out((attn @ v).transpose(-3, -2).reshape(*lead, t, d)))
        return x + self.dropout(self.ff2(torch.nn.functional.gelu(self.ff1(self.norm2(x)))))


class SequenceRecommender(nn.Module):
    """Two-tower recommender with a text-aware item tower and a transformer user tower.

    Item tower: frozen MiniLM embeddings of "title | genres" (a buffer, computed once) through a
    trainable adapter (linear, GELU, linear), plus a trainable item-id embedding when
    ``use_item_ids``. User tower: the vectors of the user's last ``L`` items plus position
    embeddings, one self-attention block, and the output at the most recent position. No per-user
    parameter exists, so every parameter can be shared (cross-device friendly).
    """

    item_features: torch.Tensor  # a buffer: the frozen text features, plus a zero padding row

    def __init__(
        self,
        num_items: int,
        *,
        item_features: torch.Tensor,
        history_length: int = 20,
        dim: int = 64,
        heads: int = 2,
        dropout: float = 0.1,
        use_item_ids: bool = True,
    ) -> None:
        super().__init__()
        if history_length < 1:
            raise ValueError(f"history_length must be >= 1, got {history_length!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        feats = _check_features(item_features, num_items)
        pad = torch.zeros(1, feats.shape[1], dtype=feats.dtype)
        self.register_buffer("item_features", torch.cat([feats, pad]), persistent=False)
        self.num_items = num_items
        self.history_length = history_length
        self.adapter_in = nn.Linear(feats.shape[1], dim)
        self.adapter_out = nn.Linear(dim, dim)
        self.item_embedding = nn.Embedding(num_items + 1, dim) if use_item_ids else None
        if self.item_embedding is not None:
            nn.init.normal_(self.item_embedding.weight, std=0.02)
        self.item_bias = nn.Embedding(num_items + 1, 1)
        nn.init.zeros_(self.item_bias.weight)
        self.position = nn.Embedding(history_length, dim)
        nn.init.normal_(self.position.weight, std=0.02)
        self.block = _SelfAttentionBlock(dim, heads, dropout)
        self.user_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def item_vectors(self, items: torch.Tensor) -> torch.Tensor:
        """Every item's vector from the item tower (MiniLM features through the adapter, plus item ids)."""
        vectors = self.adapter_out(torch.nn.functional.gelu(self.adapter_in(self.item_features[items])))
        if self.item_embedding is not None:
            vectors = vectors + self.item_embedding(items)
        return vectors

    def user_vectors(self, history: torch.Tensor) -> torch.Tensor:
        """User vectors from the attention user tower over each user's recent items (``(..., L)`` -> ``(..., D)``)."""
        t = history.shape[-1]
        if t != self.history_length:
            raise ValueError(f"history must have {self.history_length} columns, got {t}")
        valid = history != self.num_items
        positions = torch.arange(t, device=history.device).expand(history.shape)
        x = self.dropout(self.item_vectors(history) + self.position(positions))
        x = x * valid.unsqueeze(-1).to(x.dtype)
        # The most recent position is always valid for a non-empty history, so no softmax row is empty.
        valid = valid | (torch.arange(t, device=history.device) == t - 1)
        return self.user_norm(self.block(x, valid)[..., -1, :])

    def forward(self, users: torch.Tensor, history: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores ``(..., C)`` for ``history`` ``(..., L)`` and ``items`` ``(..., C)``.

        Leading dims beyond the batch are allowed: a batch grouped by user, ``(U, N, ...)``, keeps
        one row per user in every layer, which is what per-user clipping needs.
        """
        del users  # no per-user parameter: the history stands for the user
        user = self.user_vectors(history)
        return torch.einsum("...d,...cd->...c", user, self.item_vectors(items)) + self.item_bias(items).squeeze(-1)


def _check_features(features: torch.Tensor, num_items: int) -> torch.Tensor:
    feats = torch.as_tensor(features, dtype=torch.float32)
    if feats.ndim != 2 or feats.shape[0] != num_items:
        raise ValueError(f"item_features must have shape ({num_items}, F), got {tuple(feats.shape)}")
    return feats.clone()
