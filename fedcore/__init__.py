"""Federated core: parameters, clients, server, rounds, strategies, executors, workloads.

Composes :mod:`secagg` (how updates are protected) and :mod:`dp` (how privacy is spent and
accounted) into federated experiments.
"""

from .errors import ConfigError, DataUnavailableError, FedcoreError, RoundFailedError
from .experiments.simple import SimpleTask, federate_data
from .rounds.asynchronous import (
    AsyncFederation,
    ConstantStaleness,
    FedAsync,
    FedBuff,
    HingeStaleness,
    PolynomialStaleness,
    VirtualClock,
)
from .rounds.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .rounds.client import Client, ClientResult, Workspace
from .rounds.costs import CostEstimate, CostWarning
from .rounds.cuda import CudaSum, CudaUnavailableError
from .rounds.executors import Executor, InProcessExecutor
from .rounds.observability import JsonlLogger, MetricsLogger, MultiLogger, TensorBoardLogger, WandbLogger
from .rounds.sampling import AllClients, FixedCountSampler, PoissonSampler
from .rounds.server import DropoutSimulator, Federation, Reveal
from .rounds.training import EarlyStopping, TrainConfig, TrainResult, train_local
from .stages.layout import ParameterLayout
from .stages.pipeline import UpdatePipeline
from .strategies._strategies import (
    Aggregate,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedSGD,
    FedYogi,
    LocalModel,
    ModelSelection,
    OutputEnsemble,
)
from .workloads.task import ClientData, Task

__all__ = [
    "Aggregate",
    "AllClients",
    "AsyncFederation",
    "Checkpoint",
    "Client",
    "ClientData",
    "ClientResult",
    "ConfigError",
    "ConstantStaleness",
    "CostEstimate",
    "CostWarning",
    "CudaSum",
    "CudaUnavailableError",
    "DataUnavailableError",
    "DropoutSimulator",
    "EarlyStopping",
    "Executor",
    "FedAdagrad",
    "FedAdam",
    "FedAsync",
    "federate_data",
    "FedAvg",
    "FedBuff",
    "FedcoreError",
    "Federation",
    "FedSGD",
    "FedYogi",
    "FixedCountSampler",
    "HingeStaleness",
    "InProcessExecutor",
    "JsonlLogger",
    "load_checkpoint",
    "LocalModel",
    "MetricsLogger",
    "ModelSelection",
    "MultiLogger",
    "OutputEnsemble",
    "ParameterLayout",
    "PoissonSampler",
    "PolynomialStaleness",
    "Reveal",
    "RoundFailedError",
    "save_checkpoint",
    "SimpleTask",
    "Task",
    "TensorBoardLogger",
    "train_local",
    "TrainConfig",
    "TrainResult",
    "UpdatePipeline",
    "VirtualClock",
    "WandbLogger",
    "Workspace",
    # private hyperparameter search (fedcore.experiments.tuning, loaded on first use: it needs flaml)
    "tune",
    "SearchSpace",
    "parse_search_space",
    "load_search_space",
]

_TUNING = ("tune", "SearchSpace", "parse_search_space", "load_search_space")


def __getattr__(name: str):  # PEP 562: ``fedcore.tune(config, space)`` without importing flaml up front
    if name in _TUNING:
        from .experiments import tuning

        return getattr(tuning, name)
    raise AttributeError(f"module 'fedcore' has no attribute {name!r}")
