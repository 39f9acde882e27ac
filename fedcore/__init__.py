"""Federated core: parameters, clients, server, rounds, strategies, executors, workloads.

Composes :mod:`secagg` (how updates are protected) and :mod:`dp` (how privacy is spent and
accounted) into federated experiments.
"""

from .asynchronous import (
    AsyncFederation,
    ConstantStaleness,
    FedAsync,
    FedBuff,
    HingeStaleness,
    PolynomialStaleness,
    VirtualClock,
)
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .client import Client, ClientResult, Workspace
from .costs import CostEstimate, CostWarning
from .cuda import CudaSum, CudaUnavailableError
from .errors import ConfigError, DataUnavailableError, FedcoreError, RoundFailedError
from .executors import Executor, InProcessExecutor
from .layout import ParameterLayout
from .observability import JsonlLogger, MetricsLogger, MultiLogger, TensorBoardLogger, WandbLogger
from .pipeline import UpdatePipeline
from .sampling import AllClients, FixedCountSampler, PoissonSampler
from .server import DropoutSimulator, Federation, Reveal
from .simple import SimpleTask, federate_data
from .strategies import (
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
from .task import ClientData, Task
from .training import EarlyStopping, TrainConfig, TrainResult, train_local

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
    # private hyperparameter search (fedcore.tuning, loaded on first use: it needs flaml)
    "tune",
    "SearchSpace",
    "parse_search_space",
    "load_search_space",
]

_TUNING = ("tune", "SearchSpace", "parse_search_space", "load_search_space")


def __getattr__(name: str):  # PEP 562: ``fedcore.tune(config, space)`` without importing flaml up front
    if name in _TUNING:
        from . import tuning

        return getattr(tuning, name)
    raise AttributeError(f"module 'fedcore' has no attribute {name!r}")
