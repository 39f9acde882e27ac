"""The e-commerce case: "Recommended IND" from review text with the MiniLM encoder.

Data: the 22,641 reviews of the Women's Clothing E-Commerce Reviews that have a review text; the
input is the review title and text ("title. text"), the label "Recommended IND". A fixed
held-out split: stratified 80/20 with seed 42 (scikit-learn ``train_test_split``).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..datasets import ClothingReviews, default_cache_dir
from ..partition import by_column, distinct_values, nested_silo_members
from ..task import ClientData, move_to
from ._batching import PreBatched
from ._lora import HiddenStates, LoraEncoderTop, LoraSpec, cached_hidden_states
from ._text import EMBEDDING_DIM, cached_text_embeddings, load_minilm, load_minilm_tokenizer, mean_pool

__all__ = [
    "ClothingConfig",
    "ClothingTask",
    "MiniLMClassifier",
    "LoraClassifier",
    "TokenizedReviews",
    "EmbeddedReviews",
    "ClothingFederation",
    "clothing_texts",
    "clothing_split",
    "clothing_federation",
]

_NUM_ENCODER_LAYERS = 6


@dataclass(frozen=True)
class ClothingConfig:
    """How the review classifier is built.

    Attributes:
        trainable_layers: ``0`` (frozen encoder, trainable head), ``k`` in 1..6 (top ``k``
            transformer layers plus head) or ``"all"`` (embeddings and every layer).
        max_length: tokens per review (truncation); short by default to be fast on CPU.
        cached_features: with ``trainable_layers=0``, encode every review once (cached on disk)
            and train the head on the pooled embeddings: the model is then the head alone.
        dropout: dropout before the head.
        eval_batch_size: reviews per batch in evaluation.
        adapter: LoRA adapters on the layers it names instead of whole trainable layers (needs
            ``trainable_layers=0``): the model is then the adapted top of MiniLM and the head,
            over the cached output of the frozen layers below.
    """

    trainable_layers: int | str = 1
    max_length: int = 64
    cached_features: bool = False
    dropout: float = 0.1
    eval_batch_size: int = 128
    adapter: LoraSpec | None = None

    def __post_init__(self) -> None:
        layers = self.trainable_layers
        if layers != "all" and (
            isinstance(layers, bool) or not isinstance(layers, int) or not 0 <= layers <= _NUM_ENCODER_LAYERS
        ):
            raise ValueError(f"trainable_layers must be an int in [0, {_NUM_ENCODER_LAYERS}] or 'all', got {layers!r}")
        if self.max_length < 8:
            raise ValueError(f"max_length must be >= 8, got {self.max_length!r}")
        if self.cached_features and layers != 0:
            raise ValueError(f"cached_features needs trainable_layers=0 (a frozen encoder), got {layers!r}")
        if self.adapter is not None and not isinstance(self.adapter, LoraSpec):
            raise ValueError(f"adapter must be a LoraSpec or None, got {self.adapter!r}")
        if self.adapter is not None and (layers != 0 or self.cached_features):
            raise ValueError(
                f"adapter needs trainable_layers=0 and cached_features=False (the adapters are what is trained), "
                f"got trainable_layers={layers!r}, cached_features={self.cached_features!r}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size!r}")


class MiniLMClassifier(nn.Module):
    """MiniLM encoder, mean pooling over tokens, dropout and a linear head giving one logit.

    Only the top ``trainable_layers`` encoder layers (or all parameters) and the head require
    gradients; the pooler is never used and stays frozen.
    """

    def __init__(self, encoder: nn.Module, *, trainable_layers: int | str = 1, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(EMBEDDING_DIM, 1)
        for param in self.encoder.parameters():
            param.requires_grad_(trainable_layers == "all")
        pooler = getattr(self.encoder, "pooler", None)
        if pooler is not None:
            for param in pooler.parameters():
                param.requires_grad_(False)
        if isinstance(trainable_layers, int) and trainable_layers > 0:
            blocks = self.encoder.get_submodule("encoder.layer")
            if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
                raise TypeError(f"encoder.encoder.layer must be a list of transformer blocks, got {type(blocks).__name__}")
            for layer in list(blocks)[-trainable_layers:]:
                for param in layer.parameters():
                    param.requires_grad_(True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(self.dropout(mean_pool(hidden, attention_mask))).squeeze(-1)


class LoraClassifier(nn.Module):
    """MiniLM's top layers with LoRA adapters, mean pooling, dropout and a linear head (one logit).

    Reads the cached input of the lowest adapted layer (:class:`~fedcore.workloads.recsys.HiddenStates`).
    Trainable: the adapters (``B`` alone under FFA-LoRA) and the head; every pretrained weight is
    frozen, so nothing else enters the update.
    """

    def __init__(self, encoder: nn.Module, spec: LoraSpec, *, dropout: float = 0.1) -> None:
        super().__init__()
        self.top = LoraEncoderTop(encoder, spec)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(EMBEDDING_DIM, 1)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.top.pooled(hidden, attention_mask))).squeeze(-1)


class _Head(nn.Module):
    """The classifier head alone, over cached pooled embeddings."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(EMBEDDING_DIM, 1)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(embedding)).squeeze(-1)


class TokenizedReviews(Dataset):
    """Review texts with their 0/1 label, tokenized (truncated to ``max_length``) batch by batch.

    ``__getitems__`` tokenizes a whole batch at once and pads it to its longest review; a single
    item is unpadded token ids. Building the dataset costs nothing; tokenizing is fast and happens
    where the encoder's forward pass dwarfs it.
    """

    def __init__(self, texts: list[str], labels: np.ndarray, *, tokenizer: Any, max_length: int) -> None:
        if len(texts) != len(labels):
            raise ValueError(f"texts and labels must have the same length, got {len(texts)} and {len(labels)}")
        self._texts = list(texts)
        self.labels = np.asarray(labels, dtype=np.float32)
        self._tokenizer = tokenizer
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self._texts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([index]).batch
        n = int(batch["attention_mask"][0].sum())
        return {"input_ids": batch["input_ids"][0, :n], "label": batch["label"][0]}

    def __getitems__(self, indices: list[int]) -> PreBatched:
        idx = [int(i) for i in indices]
        labels = torch.from_numpy(self.labels[idx]) if idx else torch.zeros(0)
        if not idx:
            empty = torch.zeros(0, 1, dtype=torch.long)
            return PreBatched({"input_ids": empty, "attention_mask": empty.clone(), "label": labels}, 0)
        enc = self._tokenizer(
            [self._texts[i] for i in idx], truncation=True, max_length=self.max_length, padding=True, return_tensors="pt"
        )
        batch = {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long(), "label": labels}
        return PreBatched(batch, len(idx))


class EmbeddedReviews(Dataset):
    """Reviews as frozen pooled MiniLM embeddings ``(384,)`` with their 0/1 label."""

    def __init__(self, embeddings: np.ndarray, labels: np.ndarray) -> None:
        if len(embeddings) != len(labels):
            raise ValueError(f"embeddings and labels must have the same length, got {len(embeddings)} and {len(labels)}")
        self._emb = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        self.labels = np.asarray(labels, dtype=np.float32)

    def __len__(self) -> int:
        return int(self._emb.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"embedding": self._emb[index], "label": torch.tensor(self.labels[index])}


class ClothingTask:
    """Binary "Recommended IND" classification as a :class:`fedcore.workloads.task.Task`.

    Loss: per-review binary cross-entropy on the logit. Metrics: ``accuracy`` (threshold 0.5),
    ``auc`` (ROC AUC, scikit-learn; NaN when the data hold one class only) and ``bce``.
    The pretrained weights are read once per process and copied into every model built.
    """

    primary_metric = "auc"
    higher_is_better = True
    local_only: tuple[str, ...] = ()

    def __init__(self, config: ClothingConfig = ClothingConfig()) -> None:
        self.config = config
        layers = config.trainable_layers
        self.name = "clothing-minilm-" + ("cached-head" if config.cached_features else f"train-{layers}")
        if config.adapter is not None:
            a = config.adapter
            kind = "ffa-lora" if a.ffa else "lora"
            self.name = f"clothing-minilm-{kind}-r{a.rank}-layers{'.'.join(map(str, a.layers))}"

    @property
    def tokenizer(self) -> Any:
        """The MiniLM tokenizer, loaded once from the offline model package."""
        return load_minilm_tokenizer()

    @property
    def full_model_parameters(self) -> int:
        """Parameters a full fine-tune would send: the whole MiniLM encoder and the head."""
        _, encoder = load_minilm()
        return sum(p.numel() for p in encoder.parameters()) + EMBEDDING_DIM + 1

    def build_model(self) -> nn.Module:
        """A fresh classifier: frozen MiniLM features + head, or MiniLM with its top layers trainable."""
        if self.config.cached_features:
            return _Head(self.config.dropout)
        _, encoder = load_minilm()
        if self.config.adapter is not None:
            return LoraClassifier(encoder, self.config.adapter, dropout=self.config.dropout).train()
        model = MiniLMClassifier(
            copy.deepcopy(encoder), trainable_layers=self.config.trainable_layers, dropout=self.config.dropout
        )
        return model.train()  # the shared encoder is in eval mode; a fresh model is in train mode

    def _logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "embedding" in batch:
            return model(batch["embedding"])
        if "hidden" in batch:
            return model(batch["hidden"], batch["attention_mask"])
        return model(batch["input_ids"], batch["attention_mask"])

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-review binary cross-entropy on the logits (one value per example, for DP-SGD)."""
        logits = self._logits(model, batch)
        return nn.functional.binary_cross_entropy_with_logits(logits, batch["label"].to(logits.dtype), reduction="none")

    def predict(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The probability that each review's author recommends the item."""
        return torch.sigmoid(self._logits(model, batch))

    def evaluate(self, model: nn.Module, data: Dataset) -> dict[str, float]:
        """``accuracy``, ``auc`` (NaN on one class) and ``bce`` of ``model`` on ``data``."""
        from sklearn.metrics import roc_auc_score

        if len(data) == 0:  # type: ignore[arg-type]
            raise ValueError("evaluate needs at least one review, got an empty dataset")
        device = next(model.parameters()).device
        loader = DataLoader(data, batch_size=self.config.eval_batch_size, shuffle=False, collate_fn=self.collate)
        was_training = model.training
        model.eval()
        logits, labels = [], []
        with torch.no_grad():
            for batch in loader:
                batch = move_to(batch, device)
                logits.append(self._logits(model, batch).float().cpu())
                labels.append(batch["label"].float().cpu())
        model.train(was_training)
        z, y = torch.cat(logits), torch.cat(labels)
        bce = float(nn.functional.binary_cross_entropy_with_logits(z, y))
        accuracy = float(((z > 0).float() == y).float().mean())
        auc = float(roc_auc_score(y.numpy(), z.numpy())) if 0 < float(y.sum()) < len(y) else float("nan")
        return {"accuracy": accuracy, "auc": auc, "bce": bce}

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack examples into a batch (padded token ids or cached embeddings, and labels)."""
        if isinstance(items, PreBatched):  # tokenized and padded at once by TokenizedReviews
            return items.batch
        if not items:
            raise ValueError("collate needs at least one item")
        if "hidden" in items[0]:
            return HiddenStates.collate(items)
        labels = torch.stack([it["label"] for it in items]).float()
        if "embedding" in items[0]:
            return {"embedding": torch.stack([it["embedding"] for it in items]), "label": labels}
        width = max(int(it["input_ids"].numel()) for it in items)
        ids = torch.zeros(len(items), width, dtype=torch.long)
        mask = torch.zeros(len(items), width, dtype=torch.long)
        for row, it in enumerate(items):
            n = int(it["input_ids"].numel())
            ids[row, :n] = it["input_ids"]
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "label": labels}


@dataclass(frozen=True)
class ClothingFederation:
    """The clothing task, its 10 silos and its centralized twin.

    Attributes:
        task: the task.
        clients: silo name -> data (train: its share of the 80% split; test: its share of the
            fixed 20% held-out split; validation: optional share of its train part).
        central: all training reviews in one client; ``central.test`` is the fixed held-out split
            on which every federated and centralized figure is measured.
        reviews: the reviews used (with text), in file order; row positions index them.
        client_rows: silo name -> positions (in ``reviews``) of its training reviews.
        partition_rule: the partition, stated in words.
    """

    task: ClothingTask
    clients: dict[str, ClientData]
    central: ClientData
    reviews: pd.DataFrame = field(repr=False)
    client_rows: dict[str, np.ndarray] = field(repr=False)
    partition_rule: str = ""


def clothing_texts(reviews: pd.DataFrame) -> list[str]:
    """``"title. text"`` of each review (the text alone when the title is missing)."""
    out = []
    for title, text in zip(reviews["title"].tolist(), reviews["review_text"].tolist()):
        text = text if isinstance(text, str) else ""
        out.append(f"{title.strip()}. {text}" if isinstance(title, str) and title.strip() else text)
    return out


def _class_groups(reviews: pd.DataFrame) -> tuple[list[np.ndarray], list[str], list[str]]:
    """Review positions per product class, each class's department, and the class labels."""
    classes = reviews["class_name"]
    groups = by_column(classes)
    keys = distinct_values(classes)
    dept_of = {}
    for key, rows in zip(keys, groups):
        dept = reviews["department"].iloc[rows[0]]
        dept_of[key] = dept if isinstance(dept, str) else None
    counts: dict[str, int] = {}
    for key, rows in zip(keys, groups):
        if (dept := dept_of[key]) is not None:
            counts[dept] = counts.get(dept, 0) + rows.size
    smallest = min(counts, key=lambda d: (counts[d], d))
    parents = [dept if (dept := dept_of[k]) is not None else smallest for k in keys]
    labels_of = [str(k) if k is not None else "no-class" for k in keys]
    return groups, parents, labels_of


def clothing_split(
    data: ClothingReviews, *, test_size: float = 0.2, seed: int = 42
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """The reviews with a text and the fixed stratified split: ``(reviews, train_rows, test_rows)``.

    Rows are positions in the returned frame, in ``train_test_split``'s shuffled order.
    """
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size!r}")
    reviews = data.reviews[data.reviews["review_text"].notna()].reset_index(drop=True)
    rows = np.arange(len(reviews))
    train, test = train_test_split(rows, test_size=test_size, stratify=reviews["recommended"].to_numpy(), random_state=seed)
    return reviews, np.asarray(train, dtype=np.int64), np.asarray(test, dtype=np.int64)


def clothing_federation(
    data: ClothingReviews,
    *,
    config: ClothingConfig = ClothingConfig(),
    num_silos: int = 10,
    max_reviews: int | None = None,
    validation_fraction: float = 0.0,
    seed: int = 42,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ClothingFederation:
    """Build the clothing task, its silos and its centralized twin.

    Partition (natural, non-IID): one shop per department; while there are fewer than
    ``num_silos`` shops, the largest shop holding two or more product classes is split in two
    by class, balancing review counts (:func:`fedcore.workloads.partition.nested_silos`; counts taken on all
    reviews with a text). The 13 reviews without department and class join the smallest
    department. No class is split. With 10 shops: Knits, Blouses, Sweaters, Fine gauge (the four
    classes of Tops), Pants + Shorts + Casual bottoms and Jeans + Skirts (Bottoms in two), Dresses,
    Intimate, Jackets (with Outerwear), Trend (+ the 13). The label rate, the vocabulary and the
    shop sizes (112 to 4,917 training reviews) differ.

    Args:
        data: the loaded reviews.
        config: the encoder set-up.
        max_reviews: keep only the first ``0.8 * max_reviews`` training and ``0.2 * max_reviews``
            held-out reviews of the shuffled fixed split (a slice for tests and quick runs).
        validation_fraction: share of each client's training reviews held out as its validation.
        seed: seed of the fixed 80/20 split (42) and of the validation draw.

    Raises:
        ValueError: ``num_silos``, ``max_reviews`` or ``validation_fraction`` out of range.
    """
    if max_reviews is not None and max_reviews < 10:
        raise ValueError(f"max_reviews must be >= 10 or None, got {max_reviews!r}")
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}")
    reviews, train_rows, test_rows = clothing_split(data, seed=seed)
    groups, parents, labels_of = _class_groups(reviews)
    if not 1 <= num_silos <= len(groups):
        raise ValueError(f"num_silos must be in [1, {len(groups)}] (the product classes), got {num_silos!r}")
    members = nested_silo_members(groups, parents, num_silos)
    silos = [np.concatenate([groups[g] for g in m]) for m in members]
    names = []
    for m in members:
        parts: list[str] = []
        for parent in dict.fromkeys(parents[g] for g in m):
            mine = [g for g in m if parents[g] == parent]
            whole = len(mine) == sum(1 for p in parents if p == parent)
            parts += [parent] if whole else [labels_of[g] for g in mine]
        names.append("+".join(p.lower().replace(" ", "-") for p in parts))
    owner = np.full(len(reviews), -1, dtype=np.int64)
    for j, silo in enumerate(silos):
        owner[silo] = j
    if max_reviews is not None:
        n_train = max(1, int(round(0.8 * max_reviews)))
        train_rows, test_rows = train_rows[:n_train], test_rows[: max(1, int(max_reviews) - n_train)]

    task = ClothingTask(config)
    labels = reviews["recommended"].to_numpy()
    texts = clothing_texts(reviews)
    needed = np.concatenate([train_rows, test_rows])
    if config.cached_features:
        root = default_cache_dir() if cache_dir is None else cache_dir
        emb = cached_text_embeddings([texts[i] for i in needed], cache_dir=root, max_length=config.max_length)
        table = dict(zip(needed.tolist(), emb))

        def make(rows: np.ndarray) -> Dataset:
            features = np.stack([table[int(r)] for r in rows]) if rows.size else np.zeros((0, EMBEDDING_DIM), np.float32)
            return EmbeddedReviews(features, labels[rows])
    elif config.adapter is not None:
        root = default_cache_dir() if cache_dir is None else cache_dir
        hidden, mask = cached_hidden_states(
            [texts[i] for i in needed], layer=config.adapter.first_layer, max_length=config.max_length, cache_dir=root
        )
        position = {int(r): j for j, r in enumerate(needed)}

        def make(rows: np.ndarray) -> Dataset:
            at = np.array([position[int(r)] for r in rows], dtype=np.int64)
            return HiddenStates(hidden[at], mask[at], labels[rows])
    else:

        def make(rows: np.ndarray) -> Dataset:
            return TokenizedReviews(
                [texts[int(r)] for r in rows], labels[rows], tokenizer=task.tokenizer, max_length=config.max_length
            )

    rng = np.random.default_rng(seed)

    def client_data(train: np.ndarray, test: np.ndarray) -> ClientData:
        val = None
        if validation_fraction > 0 and train.size > 1:
            n_val = max(1, int(round(validation_fraction * train.size)))
            perm = rng.permutation(train.size)
            val, train = train[np.sort(perm[:n_val])], train[np.sort(perm[n_val:])]
        return ClientData(
            train=make(train),
            validation=make(val) if val is not None else None,
            test=make(test) if test.size else None,
        )

    clients: dict[str, ClientData] = {}
    client_rows: dict[str, np.ndarray] = {}
    sizes = []
    for j, name in enumerate(names):
        tr = np.sort(train_rows[owner[train_rows] == j])
        te = np.sort(test_rows[owner[test_rows] == j])
        sizes.append(f"{name} ({tr.size} train, {labels[tr].mean() if tr.size else float('nan'):.3f} recommended)")
        if tr.size == 0:
            continue  # a small slice can leave a shop without reviews
        clients[name] = client_data(tr, te)
        client_rows[name] = tr
    central = client_data(np.sort(train_rows), np.sort(test_rows))
    rule = (f"{num_silos} shops: one per department, the largest departments split by product class "
            f"(fedcore.workloads.partition.nested_silos; reviews without a class join the smallest department); "
            + "; ".join(sizes))  # fmt: skip
    return ClothingFederation(
        task=task, clients=clients, central=central, reviews=reviews, client_rows=client_rows, partition_rule=rule
    )
