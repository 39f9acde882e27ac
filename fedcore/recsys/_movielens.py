"""The video-platform case: MovieLens-100K datasets, task, and federated inputs.

Clients hold whole users: a user's training interactions, validation item (optional) and held-out
test item all live on the client of that user, and the MF user embedding table is local-only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..datasets import GENRES, MovieLens100K, default_cache_dir
from ..partition import merge_groups
from ..task import ClientData, move_to
from ._batching import PreBatched
from ._models import MatrixFactorization, SequenceRecommender
from ._protocol import LeaveOneOut, leave_one_out, per_user_hit_ndcg
from ._text import cached_text_embeddings

__all__ = [
    "RecommenderConfig",
    "InteractionDataset",
    "CandidateDataset",
    "MovieLensTask",
    "MovieLensFederation",
    "movielens_item_texts",
    "movielens_item_features",
    "movielens_federation",
    "zip_regions",
]

_MODELS = ("mf", "mf_text", "transformer")
_LOSSES = ("bce", "softmax")
_PARTITIONS = ("regions", "users")


@dataclass(frozen=True)
class RecommenderConfig:
    """Which MovieLens model to train, and how.

    Attributes:
        model: ``"mf"`` (matrix factorisation, private user table), ``"mf_text"`` (MF whose item
            vectors add a projection of frozen MiniLM title+genre features) or ``"transformer"``
            (MiniLM item tower + adapter, self-attention user tower over the last items).
        dim: embedding dimension.
        history_length: items the transformer's user tower reads (ignored by MF).
        heads: attention heads of the user tower.
        dropout: dropout of the transformer.
        num_train_negatives: items drawn per training positive, uniformly among items the user
            did not interact with in training.
        loss: ``"bce"`` (positive vs. each negative) or ``"softmax"`` (sampled softmax over them).
        use_item_ids: whether the transformer's item tower adds a trainable item-id embedding.
        eval_batch_size: users scored per batch in evaluation.
    """

    model: str = "mf"
    dim: int = 32
    history_length: int = 20
    heads: int = 2
    dropout: float = 0.1
    num_train_negatives: int = 8
    loss: str = "bce"
    use_item_ids: bool = True
    eval_batch_size: int = 512

    def __post_init__(self) -> None:
        if self.model not in _MODELS:
            raise ValueError(f"model must be one of {_MODELS}, got {self.model!r}")
        if self.loss not in _LOSSES:
            raise ValueError(f"loss must be one of {_LOSSES}, got {self.loss!r}")
        for name in ("dim", "history_length", "heads", "num_train_negatives", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def needs_text(self) -> bool:
        """Whether the model reads the MiniLM title+genre features."""
        return self.model in ("mf_text", "transformer")

    @property
    def reads_history(self) -> int:
        """History columns the datasets must provide (0 for MF)."""
        return self.history_length if self.model == "transformer" else 0


def _history(seq: np.ndarray, end: int, length: int, pad: int) -> np.ndarray:
    """The ``length`` items of ``seq`` before position ``end``, left-padded with ``pad``."""
    out = np.full(length, pad, dtype=np.int64)
    if length:
        part = seq[max(0, end - length) : end]
        if part.size:
            out[-part.size :] = part
    return out


class InteractionDataset(Dataset):
    """Training examples of some users: (user, recent history, positive item, sampled negatives).

    One example per training interaction (the transformer skips each user's first one, which has
    no history). Negatives are drawn at access time from a generator seeded once, uniformly among
    the items the user did not interact with in training (the held-out items are not consulted).
    ``__getitems__`` draws a whole batch at once (the DataLoader uses it), which is much faster.
    """

    def __init__(
        self,
        split: LeaveOneOut,
        users: np.ndarray,
        *,
        holdout: int = 1,
        history_length: int = 0,
        num_negatives: int = 4,
        min_history: int = 0,
        seed: int | np.random.SeedSequence = 0,
    ) -> None:
        if holdout not in (1, 2):
            raise ValueError(f"holdout must be 1 (test) or 2 (validation and test), got {holdout!r}")
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {num_negatives!r}")
        users = np.asarray(users, dtype=np.int64)
        self.num_items = split.num_items
        self.history_length = history_length
        self.num_negatives = num_negatives
        seqs = [split.sequences[int(u)][:-holdout] for u in users]
        longest = max((q.size for q in seqs), default=0)
        # Row r: history_length pads, then user r's training items, then pads.
        self._padded = np.full((users.size, history_length + longest), split.num_items, dtype=np.int64)
        self._rated = np.zeros((users.size, split.num_items), dtype=bool)
        rows, positions = [], []
        for r, q in enumerate(seqs):
            self._padded[r, history_length : history_length + q.size] = q
            self._rated[r, q] = True
            pos = np.arange(min(min_history, q.size), q.size)
            rows.append(np.full(pos.size, r, dtype=np.int64))
            positions.append(pos)
        full = np.flatnonzero(self._rated.all(axis=1))
        if full.size:
            raise ValueError(f"user index {int(users[full[0]])} rated every item: no negative can be drawn")
        self._users = users
        self._row = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        self._pos = np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64)
        self._seed = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)

    def __len__(self) -> int:
        return int(self._row.size)

    def _batch_rng(self) -> np.random.Generator:
        """A generator for one batch's negatives, keyed by this dataset's seed and torch's RNG.

        Drawing the key from torch's (seeded) generator keeps the dataset stateless: a client
        seeded the same way draws the same negatives, whichever federation, executor or resumed
        run it trains in.
        """
        salt = int(torch.randint(0, 2**62, (1,)).item())
        return np.random.default_rng(
            np.random.SeedSequence(self._seed.entropy, spawn_key=tuple(self._seed.spawn_key) + (salt,))
        )

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([index]).batch
        return {key: value[0] for key, value in batch.items()}

    def __getitems__(self, indices: list[int]) -> PreBatched:
        idx = np.asarray(indices, dtype=np.int64)
        row, pos = self._row[idx], self._pos[idx]
        rng = self._batch_rng()
        negatives = rng.integers(0, self.num_items, size=(idx.size, self.num_negatives))
        clash = self._rated[row[:, None], negatives]
        while clash.any():
            negatives[clash] = rng.integers(0, self.num_items, size=int(clash.sum()))
            clash = self._rated[row[:, None], negatives]
        window = pos[:, None] + np.arange(self.history_length)  # the L items before pos
        batch = {
            "user": torch.from_numpy(self._users[row]),
            "history": torch.from_numpy(self._padded[row[:, None], window]),
            "item": torch.from_numpy(self._padded[row, pos + self.history_length]),
            "negatives": torch.from_numpy(negatives),
        }
        return PreBatched(batch, idx.size)


class CandidateDataset(Dataset):
    """Evaluation rows, one per user: (user, history before the target, 1 + 99 candidates).

    ``target="test"`` scores the held-out last item; ``target="validation"`` the item before it
    (with the same never-rated negatives). Candidate 0 is always the target.
    """

    def __init__(self, split: LeaveOneOut, users: np.ndarray, *, target: str = "test", history_length: int = 0) -> None:
        if target not in ("test", "validation"):
            raise ValueError(f"target must be 'test' or 'validation', got {target!r}")
        users = np.asarray(users, dtype=np.int64)
        offset = 1 if target == "test" else 2
        self.users = users
        self._history = np.stack(
            [_history(split.sequences[u], split.sequences[u].size - offset, history_length, split.num_items) for u in users]
        ) if users.size else np.zeros((0, history_length), dtype=np.int64)
        targets = np.array([split.sequences[u][-offset] for u in users], dtype=np.int64)
        self._candidates = np.concatenate([targets[:, None], split.negatives[users]], axis=1) if users.size else np.zeros((0, 1 + split.negatives.shape[1]), dtype=np.int64)

    def __len__(self) -> int:
        return int(self.users.size)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "user": torch.tensor(int(self.users[index]), dtype=torch.long),
            "history": torch.from_numpy(self._history[index]),
            "candidates": torch.from_numpy(self._candidates[index]),
        }


class MovieLensTask:
    """MovieLens recommendation as a :class:`fedcore.task.Task`.

    Loss: per training example, BCE of the positive against each sampled negative (or a sampled
    softmax). Metrics: ``hr@10`` and ``ndcg@10`` over the 100 candidates of each user in the given
    :class:`CandidateDataset` (leave-one-out protocol of :mod:`fedcore.recsys._protocol`).
    With MF, ``user_embedding.*`` is local-only: the server never sees it, so MF is evaluated by
    each client on its own users (the mean over all users is the user-weighted mean of clients').
    """

    primary_metric = "hr@10"
    higher_is_better = True

    def __init__(self, config: RecommenderConfig, *, num_users: int, num_items: int, item_features: np.ndarray | torch.Tensor | None = None) -> None:
        if config.needs_text and item_features is None:
            raise ValueError(f"model {config.model!r} needs item_features of shape ({num_items}, F), got None")
        self.config = config
        self.num_users = int(num_users)
        self.num_items = int(num_items)
        self.item_features = None if item_features is None else torch.as_tensor(np.asarray(item_features), dtype=torch.float32)
        self.name = f"movielens100k-{config.model}"
        self.local_only: tuple[str, ...] = ("user_embedding.*",) if config.model in ("mf", "mf_text") else ()

    def build_model(self) -> nn.Module:
        """A fresh recommender of the configured kind."""
        cfg = self.config
        if cfg.model == "transformer":
            return SequenceRecommender(
                self.num_items,
                item_features=self.item_features,
                history_length=cfg.history_length,
                dim=cfg.dim,
                heads=cfg.heads,
                dropout=cfg.dropout,
                use_item_ids=cfg.use_item_ids,
            )
        features = self.item_features if cfg.model == "mf_text" else None
        return MatrixFactorization(self.num_users, self.num_items, dim=cfg.dim, item_features=features)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-positive loss against its sampled negatives (BCE or sampled softmax), one value per example."""
        items = torch.cat([batch["item"].reshape(-1, 1), batch["negatives"]], dim=1)
        scores = model(batch["user"], batch["history"], items)
        if self.config.loss == "softmax":
            return torch.logsumexp(scores, dim=1) - scores[:, 0]
        return nn.functional.softplus(-scores[:, 0]) + nn.functional.softplus(scores[:, 1:]).sum(dim=1)

    def predict(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scores of the batch's candidate items for its users."""
        if "candidates" in batch:
            items = batch["candidates"]
        else:
            items = torch.cat([batch["item"].reshape(-1, 1), batch["negatives"]], dim=1)
        return model(batch["user"], batch["history"], items)

    def evaluate(self, model: nn.Module, data: Dataset) -> dict[str, float]:
        """HR@10 and NDCG@10 of ``model`` on ``data`` (held-out item against its 99 negatives)."""
        if len(data) == 0:  # type: ignore[arg-type]
            raise ValueError("evaluate needs at least one user, got an empty dataset")
        device = next(model.parameters()).device
        loader = DataLoader(data, batch_size=self.config.eval_batch_size, shuffle=False, collate_fn=self.collate)
        was_training = model.training
        model.eval()
        hits, gains = [], []
        with torch.no_grad():
            for batch in loader:
                scores = self.predict(model, move_to(batch, device))
                h, g = per_user_hit_ndcg(scores.float().cpu().numpy(), 10)
                hits.append(h)
                gains.append(g)
        model.train(was_training)
        return {"hr@10": float(np.concatenate(hits).mean()), "ndcg@10": float(np.concatenate(gains).mean())}

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack examples into a batch of index tensors."""
        if isinstance(items, PreBatched):  # a batch drawn at once by InteractionDataset.__getitems__
            return items.batch
        if not items:
            raise ValueError("collate needs at least one item")
        return {key: torch.stack([it[key] for it in items]) for key in items[0]}


@dataclass(frozen=True)
class MovieLensFederation:
    """Everything a federated MovieLens run needs, and its centralized twin.

    Attributes:
        task: the task (model, loss, metrics).
        clients: client name -> its data (train, optional validation, test = its users' held-out items).
        central: all kept users' data in one client: the centralized baseline trains on
            ``central.train`` and every figure is evaluated on ``central.test``.
        split: the leave-one-out split (indices, negatives).
        client_users: client name -> user indices it holds.
        partition_rule: the partition, stated in words.
    """

    task: MovieLensTask
    clients: dict[str, ClientData]
    central: ClientData
    split: LeaveOneOut
    client_users: dict[str, np.ndarray] = field(repr=False)
    partition_rule: str = ""

    @property
    def protocol(self) -> str:
        """The evaluation protocol in words, for every table."""
        return self.split.protocol


def movielens_item_texts(data: MovieLens100K) -> list[str]:
    """``"title | genre, genre"`` of every movie, in ``movie_id`` order (the split's item order)."""
    items = data.items.sort_values("movie_id", kind="stable")
    texts = []
    for _, row in items.iterrows():
        genres = [g for g in GENRES if int(row[g]) == 1 and g != "unknown"]
        title = row["title"] if isinstance(row["title"], str) else "unknown title"
        texts.append(f"{title} | {', '.join(genres) if genres else 'unknown genre'}")
    return texts


def movielens_item_features(data: MovieLens100K, *, cache_dir: str | os.PathLike[str] | None = None) -> np.ndarray:
    """Frozen MiniLM embeddings of :func:`movielens_item_texts`, ``(1682, 384)``, cached on disk."""
    root = default_cache_dir() if cache_dir is None else cache_dir
    return cached_text_embeddings(movielens_item_texts(data), cache_dir=root, max_length=64)


def zip_regions(zip_codes: list[str] | np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    """Group users by US postal region: the first ZIP digit 0..9 in order, then non-US codes.

    Returns the region keys ("0".."9", "non-US") present and the user positions in each.
    """
    keys = ["non-US" if not (isinstance(z, str) and z[:1].isdigit()) else z[0] for z in zip_codes]
    order = [k for k in [str(d) for d in range(10)] + ["non-US"] if k in set(keys)]
    keys_arr = np.array(keys, dtype=object)
    return order, [np.flatnonzero(keys_arr == k).astype(np.int64) for k in order]


def movielens_federation(
    data: MovieLens100K,
    *,
    config: RecommenderConfig = RecommenderConfig(),
    partition: str = "regions",
    num_silos: int = 5,
    max_users: int | None = None,
    validation: bool = False,
    negative_seed: int = 0,
    sampling_seed: int = 0,
    item_features: np.ndarray | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> MovieLensFederation:
    """Build the MovieLens task, its clients and its centralized twin under the exact protocol.

    Partitions (whole users per client, so each user's test item is on the user's client):
        ``"regions"``: cross-silo, ``num_silos`` regional platforms (5 by default). Users are
            grouped by the first digit of their ZIP code (US postal regions 0..9, east to west),
            then non-US codes; the ordered groups are cut into ``num_silos`` contiguous runs of
            near-equal user counts (:func:`fedcore.partition.merge_groups`, rule "contiguous").
            On the full data: ZIP 0-1 (193 users), 2-3 (163), 4-5 (198), 6-8 (201), 9+non-US (188).
        ``"users"``: cross-device, one client per user (943 on the full data).

    Args:
        data: the loaded MovieLens-100K.
        config: the model and loss.
        max_users: keep only the first ``max_users`` users by id (a slice for tests and quick runs;
            their negatives are those of the full protocol).
        validation: hold out each user's second-to-last item as validation (fewer training items).
        negative_seed: seed of the 99 evaluation negatives (the protocol's fixed seed).
        sampling_seed: seed of the training negatives (each client derives its own stream).
        item_features: ``(1682, F)`` item text features; computed with MiniLM and cached when the
            model needs them and none are given.

    Raises:
        ValueError: an unknown partition, ``num_silos`` or ``max_users`` out of range.
    """
    if partition not in _PARTITIONS:
        raise ValueError(f"partition must be one of {_PARTITIONS}, got {partition!r}")
    split = leave_one_out(data.ratings, 99, negative_seed, item_ids=data.items["movie_id"].to_numpy())
    n_users = split.num_users
    if max_users is not None:
        if not 1 <= max_users:
            raise ValueError(f"max_users must be >= 1 or None, got {max_users!r}")
        n_users = min(n_users, int(max_users))
    kept = np.arange(n_users, dtype=np.int64)
    if config.needs_text and item_features is None:
        item_features = movielens_item_features(data, cache_dir=cache_dir)
    task = MovieLensTask(config, num_users=split.num_users, num_items=split.num_items, item_features=item_features)

    if partition == "users":
        groups = [np.array([u]) for u in kept]
        names = [f"user-{int(split.user_ids[u]):04d}" for u in kept]
        rule = f"one client per user ({n_users} clients, cross-device)"
    else:
        zips = data.users.set_index("user_id").loc[split.user_ids[kept], "zip_code"].tolist()
        keys, regions = zip_regions(zips)
        if not 1 <= num_silos <= len(regions):
            raise ValueError(f"num_silos must be in [1, {len(regions)}] (the regions present), got {num_silos!r}")
        groups = merge_groups(regions, num_silos, rule="contiguous")
        names = []
        for g in groups:
            members = [k for k, r in zip(keys, regions) if np.isin(r, g).all()]
            names.append("zip-" + "+".join(members))
        groups = [kept[g] for g in groups]
        sizes = ", ".join(f"{n} ({g.size} users)" for n, g in zip(names, groups))
        rule = (f"{num_silos} regional silos: users grouped by first ZIP digit (then non-US), "
                f"ordered groups cut into contiguous runs of near-equal user counts: {sizes}")  # fmt: skip

    holdout = 2 if validation else 1
    min_history = 1 if config.model == "transformer" else 0
    hist = config.reads_history

    def client_data(users: np.ndarray, stream: np.random.SeedSequence) -> ClientData:
        train = InteractionDataset(
            split, users, holdout=holdout, history_length=hist, num_negatives=config.num_train_negatives,
            min_history=min_history, seed=stream,
        )  # fmt: skip
        val = CandidateDataset(split, users, target="validation", history_length=hist) if validation else None
        return ClientData(train=train, validation=val, test=CandidateDataset(split, users, target="test", history_length=hist))

    streams = np.random.SeedSequence(sampling_seed).spawn(len(groups) + 1)
    clients = {name: client_data(g, s) for name, g, s in zip(names, groups, streams)}
    central = client_data(kept, streams[-1])
    return MovieLensFederation(
        task=task,
        clients=clients,
        central=central,
        split=split,
        client_users=dict(zip(names, groups)),
        partition_rule=rule,
    )
