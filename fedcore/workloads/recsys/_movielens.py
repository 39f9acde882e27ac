"""The video-platform case: MovieLens-100K datasets, task, and federated inputs.

Clients hold whole users: a user's training interactions, validation item (optional) and held-out
test item all live on the client of that user, and the MF user embedding table is local-only.

Unit of privacy of sample-level DP (``unit``): at record level each training example is built from
one rating and the run's randomness alone (negatives uniform over the catalogue), so removing a
rating removes exactly its example; the transformer refuses it (its history window copies each
rating into later examples). At user level a sample is all of one user's examples
(:class:`UserExamples`, clipped together by ``dp.UserLevelDP``), and an example may read the user's
other ratings (negatives among the unrated items). Evaluation (leave-one-out, 99 fixed negatives
from never-rated items) reads no training example and is the same for both.
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
    "UserExamples",
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
        num_train_negatives: items drawn per training positive (uniformly among items the user
            did not interact with in training, or over all items for record-level DP: see
            :class:`InteractionDataset`).
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


_NEGATIVE_RULES = ("unrated", "uniform")
_UNITS = ("record", "user")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele, Lea, Flood, OOPSLA 2014): a bijection of uint64 scrambling every bit.

    Used as a counter-based generator: an example's negatives are a function of the batch's key
    and of that example's own record, never of its position in the batch or of other records.
    """
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64 is the point
        x = np.asarray(x, dtype=np.uint64) + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class InteractionDataset(Dataset):
    """Training examples of some users: (user, recent history, positive item, sampled negatives).

    One example per training interaction (the transformer skips each user's first one, which has
    no history). Negatives are drawn at access time, keyed by this dataset's seed, a per-batch key
    from torch's RNG, and the example's own (user, item) record:

    - ``negatives="unrated"``: uniformly among the items the user did not interact with in
      training (the held-out items are not consulted). An example then depends on the user's other
      records: fine at user level, not at record level.
    - ``negatives="uniform"``: uniformly over the whole catalogue, so an example is built from its
      own record and the run's randomness alone (what record-level DP needs); a negative may be one
      of the user's positives (label noise, about ``rated / num_items`` of the draws).

    ``__getitems__`` draws a whole batch at once (the DataLoader uses it), which is much faster;
    :meth:`by_user` gives the same examples grouped by user (one item per user, for user-level DP).
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
        negatives: str = "unrated",
        seed: int | np.random.SeedSequence = 0,
    ) -> None:
        if holdout not in (1, 2):
            raise ValueError(f"holdout must be 1 (test) or 2 (validation and test), got {holdout!r}")
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {num_negatives!r}")
        if negatives not in _NEGATIVE_RULES:
            raise ValueError(f"negatives must be one of {_NEGATIVE_RULES}, got {negatives!r}")
        users = np.asarray(users, dtype=np.int64)
        self.num_items = split.num_items
        self.history_length = history_length
        self.num_negatives = num_negatives
        self.negatives = negatives
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
        if negatives == "unrated" and full.size:
            raise ValueError(f"user index {int(users[full[0]])} rated every item: no negative can be drawn")
        self._users = users
        self._user_keys = split.user_ids[users].astype(np.uint64)  # original ids: stable when other users leave
        self._row = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        self._pos = np.concatenate(positions) if positions else np.zeros(0, dtype=np.int64)
        self._seed = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
        self._seed_key = self._seed.generate_state(1, np.uint64)[0]

    def __len__(self) -> int:
        return int(self._row.size)

    @property
    def users(self) -> np.ndarray:
        """The user indices this dataset holds, one per row of :meth:`by_user`."""
        return self._users

    def _batch_key(self) -> np.uint64:
        """One batch's key, from this dataset's seed and torch's RNG.

        Drawing it from torch's (seeded) generator keeps the dataset stateless: a client seeded
        the same way draws the same negatives, whichever federation, executor or resumed run it
        trains in.
        """
        salt = np.uint64(int(torch.randint(0, 2**62, (1,)).item()))
        return np.uint64(_mix64(self._seed_key ^ salt))

    def _draw_negatives(self, row: np.ndarray, item: np.ndarray, key: np.uint64) -> np.ndarray:
        """``(B, num_negatives)`` negatives, each a function of ``key`` and its own (user id, item) only.

        ``"unrated"`` also reads the user's training items (redrawing along each draw's hash chain).
        """
        record = _mix64(_mix64(key ^ self._user_keys[row]) ^ item.astype(np.uint64))
        draws = _mix64(record[:, None] ^ (np.arange(1, self.num_negatives + 1, dtype=np.uint64) * _GOLDEN))
        negatives = (draws % np.uint64(self.num_items)).astype(np.int64)
        if self.negatives == "unrated":
            clash = self._rated[row[:, None], negatives]
            while clash.any():
                draws[clash] = _mix64(draws[clash])
                negatives[clash] = (draws[clash] % np.uint64(self.num_items)).astype(np.int64)
                clash = self._rated[row[:, None], negatives]
        return negatives

    def _examples(self, idx: np.ndarray, key: np.uint64) -> dict[str, np.ndarray]:
        row, pos = self._row[idx], self._pos[idx]
        window = pos[:, None] + np.arange(self.history_length)  # the L items before pos
        item = self._padded[row, pos + self.history_length]
        return {
            "user": self._users[row],
            "history": self._padded[row[:, None], window],
            "item": item,
            "negatives": self._draw_negatives(row, item, key),
        }

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([index]).batch
        return {key: value[0] for key, value in batch.items()}

    def __getitems__(self, indices: list[int]) -> PreBatched:
        idx = np.asarray(indices, dtype=np.int64)
        batch = {k: torch.from_numpy(v) for k, v in self._examples(idx, self._batch_key()).items()}
        return PreBatched(batch, idx.size)

    def by_user(self) -> UserExamples:
        """The same examples grouped by user: item ``r`` is every example of user ``users[r]``."""
        return UserExamples(self)


class UserExamples(Dataset):
    """An :class:`InteractionDataset` grouped by user: one item per user, holding all its examples.

    For user-level DP (``dp.UserLevelDP``): one "sample" is one person, so per-sample clipping
    clips the user's whole contribution. A batch of ``U`` users holding ``E`` examples in all is
    packed, not padded to its longest user (a heavy user has 7 times the mean's ratings):
    ``user`` ``(U,)``; per example ``sample`` ``(E,)`` (the batch row of its user), ``slot``
    ``(E,)`` (its position among that user's examples), ``history`` ``(E, L)``, ``item`` ``(E,)``
    and ``negatives`` ``(E, K)``. An item depends on that user's records alone.
    """

    def __init__(self, examples: InteractionDataset) -> None:
        self.examples = examples
        order = np.argsort(examples._row, kind="stable")
        bounds = np.searchsorted(examples._row[order], np.arange(examples.users.size + 1))
        self._of_user = [order[bounds[r] : bounds[r + 1]] for r in range(examples.users.size)]

    def __len__(self) -> int:
        return len(self._of_user)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """The batch of user ``index`` alone."""
        return self.__getitems__([index]).batch

    def __getitems__(self, indices: list[int]) -> PreBatched:
        ex = self.examples
        parts = [self._of_user[int(r)] for r in indices]
        counts = [p.size for p in parts]
        flat = ex._examples(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64), ex._batch_key())
        batch = {
            "user": torch.from_numpy(ex.users[np.asarray(indices, dtype=np.int64)]),
            "sample": torch.from_numpy(np.repeat(np.arange(len(parts), dtype=np.int64), counts)),
            "slot": torch.from_numpy(
                np.concatenate([np.arange(n, dtype=np.int64) for n in counts]) if parts else np.zeros(0, dtype=np.int64)
            ),
            "history": torch.from_numpy(flat["history"]),
            "item": torch.from_numpy(flat["item"]),
            "negatives": torch.from_numpy(flat["negatives"]),
        }
        return PreBatched(batch, len(parts))


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
        self._history = (
            np.stack(
                [_history(split.sequences[u], split.sequences[u].size - offset, history_length, split.num_items) for u in users]
            )
            if users.size
            else np.zeros((0, history_length), dtype=np.int64)
        )
        targets = np.array([split.sequences[u][-offset] for u in users], dtype=np.int64)
        self._candidates = (
            np.concatenate([targets[:, None], split.negatives[users]], axis=1)
            if users.size
            else np.zeros((0, 1 + split.negatives.shape[1]), dtype=np.int64)
        )

    def __len__(self) -> int:
        return int(self.users.size)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "user": torch.tensor(int(self.users[index]), dtype=torch.long),
            "history": torch.from_numpy(self._history[index]),
            "candidates": torch.from_numpy(self._candidates[index]),
        }


class MovieLensTask:
    """MovieLens recommendation as a :class:`fedcore.workloads.task.Task`.

    Loss: per training example, BCE of the positive against each sampled negative (or a sampled
    softmax). Metrics: ``hr@10`` and ``ndcg@10`` over the 100 candidates of each user in the given
    :class:`CandidateDataset` (leave-one-out protocol of :mod:`fedcore.workloads.recsys._protocol`).
    With MF, ``user_embedding.*`` is local-only: the server never sees it, so MF is evaluated by
    each client on its own users (the mean over all users is the user-weighted mean of clients').
    """

    primary_metric = "hr@10"
    higher_is_better = True

    def __init__(
        self, config: RecommenderConfig, *, num_users: int, num_items: int, item_features: np.ndarray | torch.Tensor | None = None
    ) -> None:
        if config.needs_text and item_features is None:
            raise ValueError(f"model {config.model!r} needs item_features of shape ({num_items}, F), got None")
        self.config = config
        self.num_users = int(num_users)
        self.num_items = int(num_items)
        self.item_features = None if item_features is None else torch.as_tensor(np.asarray(item_features), dtype=torch.float32)
        self.name = f"movielens100k-{config.model}"
        mf = config.model in ("mf", "mf_text")
        self.local_only: tuple[str, ...] = ("user_embedding.*",) if mf else ()
        # Row u of the MF user table is read by user u's examples alone (dp.UserLevelDP's user_parameters).
        self.user_parameters: tuple[str, ...] = ("user_embedding",) if mf else ()

    def build_model(self) -> nn.Module:
        """A fresh recommender of the configured kind."""
        cfg = self.config
        if cfg.model == "transformer":
            assert self.item_features is not None  # __init__ refuses a text model without item_features
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
        """Per-positive loss against its sampled negatives (BCE or sampled softmax), one value per example.

        A batch grouped by user (:class:`UserExamples`, with ``sample``) gives one value per user:
        the sum of that user's example losses, computed with one batch row per user in every layer,
        so that per-sample clipping clips the user's whole contribution.
        """
        if "sample" not in batch:
            items = torch.cat([batch["item"].reshape(-1, 1), batch["negatives"]], dim=1)
            return self._example_loss(model(batch["user"], batch["history"], items))
        sample, users = batch["sample"], batch["user"]
        items = torch.cat([batch["item"].unsqueeze(-1), batch["negatives"]], dim=1)  # (E, 1 + K)
        if isinstance(model, MatrixFactorization) and model.packs:  # the user's examples, packed
            per_example = self._example_loss(model(users, batch["history"], items, sample))
        else:  # every layer needs one row per user: pad each user's examples to the longest
            slot = batch["slot"]
            rows = (users.shape[0], int(slot.max()) + 1 if slot.numel() else 0)
            padded = items.new_zeros(*rows, items.shape[1]).index_put_((sample, slot), items)
            if self.config.model == "transformer":  # one history per example: (U, N, L)
                history = batch["history"].new_zeros(*rows, batch["history"].shape[1])  # item 0: never all-masked
                scores = model(users, history.index_put_((sample, slot), batch["history"]), padded)
            else:  # one vector per user: score its examples' candidates in one row
                scores = model(users, batch["history"], padded.reshape(rows[0], -1)).reshape(padded.shape)
            per_example = self._example_loss(scores)[sample, slot]
        return per_example.new_zeros(users.shape[0]).index_add(0, sample, per_example)

    def _example_loss(self, scores: torch.Tensor) -> torch.Tensor:
        """Loss of the positive (last axis position 0) against the negatives after it."""
        if self.config.loss == "softmax":
            return torch.logsumexp(scores, dim=-1) - scores[..., 0]
        return nn.functional.softplus(-scores[..., 0]) + nn.functional.softplus(scores[..., 1:]).sum(dim=-1)

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
        units: the DP units of privacy its training examples support: ``"record"`` where each
            example is built from one rating alone (uniform negatives, no history), and ``"user"``.
    """

    task: MovieLensTask
    clients: dict[str, ClientData]
    central: ClientData
    split: LeaveOneOut
    client_users: dict[str, np.ndarray] = field(repr=False)
    partition_rule: str = ""
    units: tuple[str, ...] = ()

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
    unit: str | None = None,
) -> MovieLensFederation:
    """Build the MovieLens task, its clients and its centralized twin under the exact protocol.

    Partitions (whole users per client, so each user's test item is on the user's client):
        ``"regions"``: cross-silo, ``num_silos`` regional platforms (5 by default). Users are
            grouped by the first digit of their ZIP code (US postal regions 0..9, east to west),
            then non-US codes; the ordered groups are cut into ``num_silos`` contiguous runs of
            near-equal user counts (:func:`fedcore.workloads.partition.merge_groups`, rule "contiguous").
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
        unit: the unit of privacy the examples are built for: ``"record"`` (negatives uniform over
            all items, so an example depends on its own rating alone), ``"user"`` or ``None``
            (negatives among the user's unrated items: an example depends on that user's data).

    Raises:
        ValueError: an unknown partition or unit, ``num_silos`` or ``max_users`` out of range, or
            ``unit="record"`` with the transformer (its history window puts each rating into up to
            ``history_length`` other examples).
    """
    if partition not in _PARTITIONS:
        raise ValueError(f"partition must be one of {_PARTITIONS}, got {partition!r}")
    if unit is not None and unit not in _UNITS:
        raise ValueError(f"unit must be one of {_UNITS} or None, got {unit!r}")
    if unit == "record" and config.model == "transformer":
        raise ValueError(f"privacy unit 'record' (privacy.unit) is not supported for model 'transformer': its history "
                         f"window puts each rating into up to {config.history_length} other examples; use unit 'user'")  # fmt: skip
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
            min_history=min_history, negatives="uniform" if unit == "record" else "unrated", seed=stream,
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
        units=("record", "user") if unit == "record" else ("user",),
    )
