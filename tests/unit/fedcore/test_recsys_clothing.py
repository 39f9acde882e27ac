"""Clothing task and the MiniLM encoder on a handful of texts (the real bundled weights)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fedcore.rounds.training import TrainConfig, train_local
from fedcore.stages.layout import ParameterLayout
from fedcore.workloads.datasets import ClothingReviews
from fedcore.workloads.recsys import (
    ClothingConfig,
    ClothingTask,
    _text,
    cached_text_embeddings,
    clothing_federation,
    clothing_split,
    clothing_texts,
    encode_texts,
    load_minilm,
)
from fedcore.workloads.task import Task

GOOD = ["love it, fits perfectly", "gorgeous and comfortable", "great quality, flattering", "so soft, wear it daily"]
BAD = ["cheap fabric, returned it", "runs tiny and itchy", "poor quality, fell apart", "awful fit, sent it back"]


def synthetic_reviews(n: int = 120) -> ClothingReviews:
    rng = np.random.default_rng(0)
    label = (np.arange(n) % 5 != 0).astype(np.int64)  # 80% recommended
    text = [GOOD[i % 4] if y else BAD[i % 4] for i, y in enumerate(label)]
    departments = np.array(["Tops", "Tops", "Dresses", "Bottoms", "Bottoms", "Tops"])
    classes = np.array(["Knits", "Blouses", "Dresses", "Pants", "Jeans", "Sweaters"])
    pick = rng.integers(0, 6, size=n)
    frame = pd.DataFrame(
        {
            "clothing_id": np.arange(n),
            "age": 40,
            "title": [None if i % 3 else "Title" for i in range(n)],
            "review_text": text,
            "rating": 4,
            "recommended": label,
            "positive_feedback_count": 0,
            "division": "General",
            "department": departments[pick],
            "class_name": classes[pick],
        }
    )
    frame.loc[n - 1, ["department", "class_name"]] = None
    frame.loc[n - 2, "review_text"] = None  # dropped: no text
    return ClothingReviews(reviews=frame)


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


def test_encode_texts_is_normalised_and_order_preserving(minilm):
    tok, model = minilm
    texts = ["a red dress", "terrible zipper, broke on day one", "a red dress"]
    emb = encode_texts(texts, tokenizer=tok, model=model, batch_size=2)
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert np.allclose(emb[0], emb[2], atol=1e-5) and not np.allclose(emb[0], emb[1], atol=1e-2)
    with pytest.raises(ValueError, match="texts\\[1\\] must be a str, got int"):
        encode_texts(["x", 3], tokenizer=tok, model=model)


def test_cached_text_embeddings_compute_once(tmp_path, monkeypatch, minilm):
    calls = []

    def fake(texts, **kwargs):
        calls.append(len(texts))
        return np.ones((len(texts), 384), dtype=np.float32)

    monkeypatch.setattr(_text, "encode_texts", fake)
    first = cached_text_embeddings(["a", "b"], cache_dir=tmp_path, max_length=16)
    second = cached_text_embeddings(["a", "b"], cache_dir=tmp_path, max_length=16)
    third = cached_text_embeddings(["a", "b"], cache_dir=tmp_path, max_length=32)
    assert calls == [2, 2] and np.array_equal(first, second) and third.shape == (2, 384)
    assert len(list((tmp_path / "features").glob("minilm-*.npy"))) == 2


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        (0, {"head"}),
        (1, {"head", "encoder.encoder.layer.5"}),
        (2, {"head", "encoder.encoder.layer.4", "encoder.encoder.layer.5"}),
    ],
)
def test_trainable_layers_select_the_top_of_the_encoder(layers, expected):
    task = ClothingTask(ClothingConfig(trainable_layers=layers))
    net = task.build_model()
    prefixes = {
        ".".join(n.split(".")[:4]) if n.startswith("encoder.encoder.layer") else n.split(".")[0]
        for n, p in net.named_parameters()
        if p.requires_grad
    }
    assert prefixes == expected
    layout = ParameterLayout(net, local_only=task.local_only)
    assert layout.size == sum(p.numel() for p in net.parameters() if p.requires_grad)


def test_all_layers_trainable_except_the_unused_pooler():
    net = ClothingTask(ClothingConfig(trainable_layers="all")).build_model()
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("encoder.pooler") for n in frozen)
    assert net.encoder.embeddings.word_embeddings.weight.requires_grad


def test_federation_split_silos_and_a_short_fine_tuning_run():
    data = synthetic_reviews(60)
    reviews, train, test = clothing_split(data)
    assert len(reviews) == 59 and len(train) + len(test) == 59 and len(test) == 12
    fed = clothing_federation(data, config=ClothingConfig(trainable_layers=1, max_length=12), num_silos=4)
    assert isinstance(fed.task, Task)
    names = sorted(fed.clients)  # Tops (the largest department) is split by class; the others stay whole
    assert len(names) == 4 and {"dresses", "bottoms"} <= set(names)
    tops = {"knits", "blouses", "sweaters"}
    assert set("+".join(n for n in names if n not in ("dresses", "bottoms")).split("+")) == tops
    rows = np.concatenate(list(fed.client_rows.values()))
    assert np.array_equal(np.sort(rows), np.sort(train))  # every training review in exactly one shop
    assert "no-class" not in " ".join(fed.clients)  # the review without a class joined the smallest department
    batch = fed.task.collate([fed.central.train[i] for i in range(3)])
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[1] <= 16
    torch.manual_seed(0)
    net = fed.task.build_model()
    assert fed.task.loss(net, batch).shape == (3,)
    train_local(
        net,
        task=fed.task,
        data=fed.central,
        config=TrainConfig(lr=3e-3, epochs=2, batch_size=16),
        generator=torch.Generator().manual_seed(0),
    )
    metrics = fed.task.evaluate(net, fed.central.test)
    assert set(metrics) == {"accuracy", "auc", "bce"}
    assert metrics["auc"] > 0.9  # the synthetic texts are separable


def test_cached_feature_head(tmp_path):
    data = synthetic_reviews(60)
    fed = clothing_federation(
        data, config=ClothingConfig(trainable_layers=0, cached_features=True, max_length=16), num_silos=2, cache_dir=tmp_path
    )
    net = fed.task.build_model()
    assert [n for n, _ in net.named_parameters()] == ["head.weight", "head.bias"]
    item = fed.central.train[0]
    assert item["embedding"].shape == (384,)
    torch.manual_seed(0)
    train_local(
        net,
        task=fed.task,
        data=fed.central,
        config=TrainConfig(lr=0.05, epochs=20, batch_size=16),
        generator=torch.Generator().manual_seed(0),
    )
    assert fed.task.evaluate(net, fed.central.test)["auc"] > 0.9


def test_texts_and_config_errors():
    frame = pd.DataFrame({"title": ["Nice", None, "  "], "review_text": ["fits", "ok", "meh"]})
    assert clothing_texts(frame) == ["Nice. fits", "ok", "meh"]
    with pytest.raises(ValueError, match=r"trainable_layers must be an int in \[0, 6\] or 'all', got 7"):
        ClothingConfig(trainable_layers=7)
    with pytest.raises(ValueError, match="cached_features needs trainable_layers=0"):
        ClothingConfig(trainable_layers=1, cached_features=True)
    with pytest.raises(ValueError, match="max_length must be >= 8, got 4"):
        ClothingConfig(max_length=4)
    with pytest.raises(ValueError, match=r"num_silos must be in \[1, 7\]"):
        clothing_federation(synthetic_reviews(), num_silos=8)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_top_layer_model_works_with_opacus_per_sample_gradients():
    from opacus import GradSampleModule

    task = ClothingTask(ClothingConfig(trainable_layers=1, max_length=12))
    data = synthetic_reviews(20)
    fed = clothing_federation(data, config=task.config, num_silos=2)
    wrapped = GradSampleModule(fed.task.build_model())
    batch = fed.task.collate(fed.central.train.__getitems__([0, 1, 2]))
    fed.task.loss(wrapped, batch).sum().backward()
    trainable = [(n, p) for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad_sample is not None and p.grad_sample.shape[0] == 3 for _, p in trainable)


def test_classifier_refuses_an_encoder_without_a_list_of_blocks():
    """Fine-tuning the top layers reads ``encoder.encoder.layer``; anything but a list of modules is refused by name."""
    from fedcore.workloads.recsys import MiniLMClassifier

    encoder = torch.nn.Module()
    encoder.encoder = torch.nn.Module()
    encoder.encoder.layer = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="encoder.encoder.layer must be a list of transformer blocks, got Linear"):
        MiniLMClassifier(encoder, trainable_layers=1)
    encoder.encoder.layer = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
    net = MiniLMClassifier(encoder, trainable_layers=1)
    assert [p.requires_grad for p in net.encoder.parameters()] == [False, False, True, True]
