"""Horizontal federated learning: same columns, different rows."""

from tessera.horizontal.aggregation import Aggregation, FitOutcome, PlainAggregation, validate_fit
from tessera.horizontal.client import ClientApp, ClientContext, Mod, TaskClient, client_seed
from tessera.horizontal.server import Server, ServerConfig
from tessera.horizontal.simulation import JobParts, Plugin, initial_params, simulate
from tessera.horizontal.task import SupervisedTask, Task, accuracy

__all__ = [
    "Aggregation", "ClientApp", "ClientContext", "FitOutcome", "JobParts", "Mod", "PlainAggregation",
    "Plugin", "Server", "ServerConfig", "SupervisedTask", "Task", "TaskClient", "accuracy", "client_seed",
    "initial_params", "simulate", "validate_fit",
]
