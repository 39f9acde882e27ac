import pytest
import torch

from fedcore import ConfigError, EarlyStopping, TrainConfig, train_local

from .toy import ToyTask, toy_clients


def _run(config, data=None, seed=0):
    task = ToyTask()
    torch.manual_seed(0)
    model = task.build_model()
    data = data or toy_clients(1)["client-0"]
    result = train_local(model, task=task, data=data, config=config, generator=torch.Generator().manual_seed(seed))
    return model, result


def test_training_reduces_loss_and_reports_validation_metrics():
    task = ToyTask()
    data = toy_clients(1, per_client=200)["client-0"]
    torch.manual_seed(0)
    before = task.evaluate(task.build_model(), data.validation)["loss"]
    model, result = _run(TrainConfig(lr=0.05, epochs=5, batch_size=16), data)
    assert result.metrics["loss"] < before
    assert result.steps == 5 * 13 and result.epochs == 5 and result.examples == 200


def test_max_steps_caps_training():
    _, result = _run(TrainConfig(lr=0.01, epochs=10, batch_size=8, max_steps=3))
    assert result.steps == 3 and result.epochs == 1


def test_same_seed_same_model():
    a, _ = _run(TrainConfig(lr=0.05, epochs=2, batch_size=8), seed=3)
    b, _ = _run(TrainConfig(lr=0.05, epochs=2, batch_size=8), seed=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_early_stopping_stops_and_restores_best_epoch():
    # a huge learning rate makes validation loss worsen after the first epoch
    stop = EarlyStopping(metric="loss", min_delta=0.0, patience=2, higher_is_better=False)
    model, result = _run(TrainConfig(optimizer="sgd", lr=50.0, epochs=30, batch_size=4, early_stopping=stop))
    assert result.stopped_early and result.epochs < 30


def test_early_stopping_needs_validation_and_known_metric():
    data = toy_clients(1)["client-0"]
    no_val = type(data)(train=data.train)
    with pytest.raises(ConfigError, match="early_stopping needs validation data"):
        _run(TrainConfig(early_stopping=EarlyStopping(metric="loss")), no_val)
    with pytest.raises(ConfigError, match=r"'auc' is not among the task's metrics \['accuracy', 'loss'\]"):
        _run(TrainConfig(early_stopping=EarlyStopping(metric="auc")))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"optimizer": "lbfgs"}, r"optimizer must be one of \['adam', 'adamw', 'sgd'\], got 'lbfgs'"),
        ({"lr": 0.0}, "lr must be a finite number > 0, got 0.0"),
        ({"epochs": 0}, "epochs must be >= 1, got 0"),
        ({"max_steps": 0}, "max_steps must be >= 1 or None, got 0"),
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"device": "gpu7"}, "device must name a torch device"),
        ({"optimizer": "sgd", "momentum": -0.1}, r"momentum must be a number in \[0, 1\), got -0.1"),
        ({"optimizer": "sgd", "momentum": 1.0}, r"momentum must be a number in \[0, 1\), got 1.0"),
        (
            {"optimizer": "adam", "momentum": 0.9},
            "momentum applies to optimizer 'sgd' only, got optimizer 'adam' with momentum 0.9",
        ),
    ],
)
def test_bad_train_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"min_delta": -1.0}, "min_delta must be >= 0, got -1.0"), ({"patience": 0}, "patience must be >= 1, got 0")],
)
def test_bad_early_stopping(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        EarlyStopping(metric="loss", **kwargs)
