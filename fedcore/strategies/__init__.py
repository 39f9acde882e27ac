"""Strategies: how the server turns the round's sum (or revealed models) into the next global model; robust rules and attacks."""

from ._strategies import (
    Aggregate,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedSGD,
    FedYogi,
    LocalModel,
    ModelSelection,
    OutputEnsemble,
    RevealingStrategy,
    Strategy,
)

__all__ = [
    "Aggregate",
    "LocalModel",
    "Strategy",
    "RevealingStrategy",
    "FedAvg",
    "FedSGD",
    "FedAdam",
    "FedYogi",
    "FedAdagrad",
    "ModelSelection",
    "OutputEnsemble",
]
