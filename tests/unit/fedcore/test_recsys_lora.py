"""LoRA adapters on MiniLM's top layers (the real bundled weights, a handful of texts)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedcore.rounds.training import TrainConfig, train_local
from fedcore.stages.layout import ParameterLayout
from fedcore.workloads.recsys import (
    ClothingConfig,
    HiddenStates,
    LoraEncoderTop,
    LoraSpec,
    _lora,
    cached_hidden_states,
    clothing_federation,
    load_adapters,
    load_minilm,
    minilm_identity,
    save_adapters,
)

from .test_recsys_clothing import BAD, GOOD, synthetic_reviews

TEXTS = GOOD + BAD + ["fine, nothing special about it at all, but the colour is nice"]


@pytest.fixture(scope="module")
def lora_fed(tmp_path_factory):
    spec = LoraSpec(rank=4, layers=(4, 5), targets=("query", "value", "intermediate.dense"))
    config = ClothingConfig(trainable_layers=0, max_length=16, adapter=spec)
    return clothing_federation(synthetic_reviews(40), config=config, num_silos=2, cache_dir=tmp_path_factory.mktemp("c"))


def _pretrained(first_layer: int) -> dict[str, torch.Tensor]:
    _, encoder = load_minilm()
    return {
        f"{i}.{name}": p.detach().clone()
        for i, layer in enumerate(encoder.encoder.layer)
        if i >= first_layer
        for name, p in layer.named_parameters()
    }


def _base_of(model) -> dict[str, torch.Tensor]:
    """Every pretrained weight of the adapted top, under the name it has in the encoder."""
    out = {}
    for name, p in model.top.named_parameters():
        if ".lora_" in name:
            continue
        _, index, rest = name.split(".", 2)
        out[f"{index}.{rest.replace('.base_layer', '')}"] = p
    return out


def test_fresh_adapters_compute_the_pretrained_encoder_from_the_cached_layer_input(tmp_path):
    tokenizer, encoder = load_minilm()
    spec = LoraSpec(layers=(3, 5), targets=("key", "attention.output.dense"))
    hidden, mask = cached_hidden_states(TEXTS, layer=spec.first_layer, max_length=12, cache_dir=tmp_path)
    assert hidden.shape == (len(TEXTS), 12, 384) and mask.shape == (len(TEXTS), 12)
    top = LoraEncoderTop(encoder, spec).eval()
    data = HiddenStates(hidden, mask, np.zeros(len(TEXTS)))
    batch = HiddenStates.collate([data[i] for i in range(len(TEXTS))])
    assert batch["hidden"].shape[1] == int(mask.sum(1).max())  # trimmed to the longest review
    enc = tokenizer(TEXTS, padding=True, truncation=True, max_length=12, return_tensors="pt")
    with torch.no_grad():
        expected = encoder(**enc).last_hidden_state
        got = top(batch["hidden"], batch["attention_mask"])
    assert torch.equal(batch["attention_mask"], enc["attention_mask"])
    keep = enc["attention_mask"].bool()
    assert torch.allclose(got[keep], expected[keep], atol=1e-5)
    # adapters sit where the spec says and nowhere else
    adapted = {n.rsplit(".lora_", 1)[0] for n, _ in top.named_parameters() if ".lora_" in n}
    assert adapted == {"layer.3.attention.self.key", "layer.3.attention.output.dense",
                       "layer.5.attention.self.key", "layer.5.attention.output.dense"}  # fmt: skip


def test_cached_hidden_states_are_computed_once_per_weights_layer_length_and_texts(tmp_path, monkeypatch):
    calls = []
    real = _lora._encode_hidden

    def counting(texts, **kw):
        calls.append(kw)
        return real(texts, **kw)

    monkeypatch.setattr(_lora, "_encode_hidden", counting)
    first = cached_hidden_states(TEXTS[:3], layer=5, max_length=8, cache_dir=tmp_path)
    again = cached_hidden_states(TEXTS[:3], layer=5, max_length=8, cache_dir=tmp_path)
    assert len(calls) == 1 and np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    for kw in ({"layer": 4, "max_length": 8}, {"layer": 5, "max_length": 9}):
        cached_hidden_states(TEXTS[:3], cache_dir=tmp_path, **kw)
    cached_hidden_states(TEXTS[1:4], layer=5, max_length=8, cache_dir=tmp_path)
    assert len(calls) == 4
    monkeypatch.setattr(_lora, "minilm_identity", lambda: {"sha256": "other weights"})
    cached_hidden_states(TEXTS[:3], layer=5, max_length=8, cache_dir=tmp_path)
    assert len(calls) == 5


@pytest.mark.parametrize("ffa", [False, True])
def test_only_adapters_and_head_are_shared_and_the_base_never_moves(lora_fed, ffa):
    spec = lora_fed.task.config.adapter
    task = type(lora_fed.task)(
        ClothingConfig(trainable_layers=0, max_length=16, adapter=LoraSpec(**{**spec.__dict__, "ffa": ffa}))
    )
    model = task.build_model()
    layout = ParameterLayout(model)
    kinds = {"lora_B", "head"} if ffa else {"lora_A", "lora_B", "head"}
    assert {("head" if n.startswith("head.") else n.split(".")[-3]) for n in layout.names} == kinds
    rank, per_layer = spec.rank, 2 * 384 + (384 + 1536)  # in + out features of query, value, intermediate
    a_size = 2 * rank * (384 + 384 + 384)
    b_size = 2 * rank * (384 + 384 + 1536)
    assert layout.size == b_size + 385 + (0 if ffa else a_size)
    assert per_layer and layout.size < 0.01 * sum(p.numel() for p in load_minilm()[1].parameters())

    factors_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n}
    vector_before = layout.flatten(model)
    train_local(model, task=task, data=lora_fed.central, config=TrainConfig(lr=0.05, epochs=2, batch_size=8),
                generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert not torch.equal(layout.flatten(model), vector_before)  # the adapters learned
    pretrained = _pretrained(spec.first_layer)
    base = _base_of(model)
    assert set(base) == set(pretrained)
    assert all(torch.equal(base[k], pretrained[k]) for k in pretrained)  # bit-identical
    assert not any(p.requires_grad for p in base.values())
    moved = [n for n, p in model.named_parameters() if ".lora_A." in n and not torch.equal(p, factors_before[n])]
    assert (moved == []) == ffa  # FFA-LoRA: A frozen; plain LoRA trains it
    # every party draws the same A from the shared seed (FFA-LoRA never sends it)
    other = task.build_model()
    assert all(torch.equal(p, factors_before[n]) for n, p in other.named_parameters() if ".lora_A." in n)


def test_adapters_round_trip_through_safetensors(lora_fed, tmp_path, monkeypatch):
    task = lora_fed.task
    model = task.build_model()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    path = tmp_path / "adapters.safetensors"
    save_adapters(model, path)
    fresh = task.build_model()
    load_adapters(fresh, path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))

    ffa = type(task)(ClothingConfig(trainable_layers=0, max_length=16, adapter=LoraSpec(rank=4, layers=(4, 5), ffa=True)))
    with pytest.raises(ValueError, match=r"adapter names differ: file has \[.*lora_A.*\] extra"):
        load_adapters(ffa.build_model(), path)
    wide = type(task)(ClothingConfig(trainable_layers=0, max_length=16,
                                     adapter=LoraSpec(rank=8, layers=(4, 5), targets=("query", "value", "intermediate.dense"))))  # fmt: skip
    with pytest.raises(
        ValueError, match=r"has shape \(8, 384\), the model expects \(4, 384\)|has shape \(4, 384\), the model expects \(8, 384\)"
    ):
        load_adapters(wide.build_model(), path)
    monkeypatch.setattr(_lora, "minilm_identity", lambda: {"sha256": "other"})
    with pytest.raises(ValueError, match=f"were trained on base '{minilm_identity()['sha256']}', not 'other'"):
        load_adapters(fresh, path)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_lora_per_sample_gradients_match_a_per_sample_loop(lora_fed):
    from opacus import GradSampleModule

    task = lora_fed.task
    model = task.build_model()  # Opacus records activations in train mode only
    for module in model.modules():  # no dropout: the two computations see the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    with torch.no_grad():  # B != 0, so gradients reach A as well
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    data = lora_fed.central.train
    items = [data[i] for i in range(5)]
    batch = task.collate(items)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # reviews of different lengths
    wrapped = GradSampleModule(model, loss_reduction="sum")
    task.loss(wrapped, batch).sum().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any(".lora_A." in n for n, _ in trainable) and any(".lora_B." in n for n, _ in trainable)
    per_sample = {n: p.grad_sample.detach().clone() for n, p in trainable}
    wrapped._close()
    for i, item in enumerate(items):
        model.zero_grad(set_to_none=True)
        task.loss(model, task.collate([item])).sum().backward()
        for n, p in trainable:
            assert torch.allclose(per_sample[n][i], p.grad, atol=1e-6, rtol=1e-4), (n, i)


def test_lora_spec_and_config_errors():
    for kwargs, message in (
        ({"rank": 0}, "rank must be an integer >= 1, got 0"),
        ({"alpha": -1.0}, "alpha must be a number > 0, got -1.0"),
        ({"layers": (6,)}, r"layers must be a non-empty list of integers in \[0, 5\], got \(6,\)"),
        ({"layers": (5, 5)}, r"layers must not repeat a layer, got \(5, 5\)"),
        ({"targets": ("output.dense",)}, r"targets must be distinct names from \['query', .*\], got \('output.dense',\)"),
        ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ):
        with pytest.raises(ValueError, match=message):
            LoraSpec(**kwargs)
    with pytest.raises(ValueError, match="adapter needs trainable_layers=0 and cached_features=False"):
        ClothingConfig(trainable_layers=1, adapter=LoraSpec())
    with pytest.raises(ValueError, match=r"adapter must be a LoraSpec or None, got 'lora'"):
        ClothingConfig(trainable_layers=0, adapter="lora")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="layer must be an integer in"):
        cached_hidden_states(["a"], layer=6, max_length=8, cache_dir=".")


@pytest.mark.parametrize(
    ("workload", "message"),
    [
        ({"adapter": "LoRA"}, r"workload.adapter must be one of \['none', 'lora', 'ffa-lora'\], got 'LoRA'"),
        (
            {"adapter": "none", "lora_rank": 4},
            "workload.lora_rank applies to workload.adapter 'lora' or 'ffa-lora', got adapter 'none'",
        ),
        (
            {"model": "frozen"},
            "workload.adapter 'lora' applies to case 'clothing' with model 'finetune', got case 'clothing' and model 'frozen'",
        ),
        (
            {"trainable_layers": 1},
            "workload.trainable_layers=1 trains whole layers; with workload.adapter 'lora' the adapted layers are workload.lora_layers",
        ),
        ({"lora_rank": 0}, "workload.lora_rank must be an integer > 0, got 0"),
        ({"lora_alpha": "big"}, "workload.lora_alpha must be a number > 0, got 'big'"),
        (
            {"lora_layers": [6]},
            r"workload.lora_layers must be a non-empty list of distinct values from \[0, 1, 2, 3, 4, 5\], got \[6\]",
        ),
        ({"lora_layers": []}, r"workload.lora_layers must be a non-empty list .*, got \[\]"),
        (
            {"lora_targets": ["output.dense"]},
            r"workload.lora_targets must be a non-empty list of distinct values from \['query', .*\], got \['output.dense'\]",
        ),
        ({"lora_targets": "query"}, r"workload.lora_targets must be a non-empty list .*, got 'query'"),
    ],
)
def test_config_keys_for_adapters_refuse_bad_values(workload, message):
    from fedcore.errors import ConfigError
    from fedcore.experiments.config import parse_config

    base = {"case": "clothing", "model": "finetune", "adapter": "lora"}
    with pytest.raises(ConfigError, match=message):
        parse_config({"workload": {**base, **workload}})


def test_example_config_builds_the_adapter_it_names():
    from fedcore.experiments.config import load_config
    from fedcore.experiments.experiment import lora_spec

    config = load_config("examples/clothing_lora.toml")
    spec = lora_spec(config.workload, seed=config.seed)
    assert spec == LoraSpec(rank=8, alpha=16.0, layers=(5,), targets=("query", "value", "intermediate.dense"), ffa=False, seed=0)
    ffa = load_config("examples/clothing_lora.toml", overrides={"workload.adapter": "ffa-lora", "seed": 3})
    assert lora_spec(ffa.workload, seed=ffa.seed) == LoraSpec(**{**spec.__dict__, "ffa": True, "seed": 3})
    assert lora_spec(load_config("examples/main.toml").workload, seed=0) is None
