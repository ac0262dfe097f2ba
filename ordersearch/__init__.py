"""ordersearch: adapt pretrained isometric networks by searching the order of their blocks.

Implements Zhmoginov, Bashkirova and Sandler, "Compositional Models: Multi-Task Learning and
Knowledge Transfer with Modular Networks" (arXiv 2107.10963).
"""

from __future__ import annotations

import logging

from .adapters import bank_from_model, list_adapters, load_bank, register_adapter
from .bank import Bank
from .build import OrderedModel, build_model
from .engine import Engine, EngineConfig, EngineStats, Objective, Score, get_objective, list_objectives
from .errors import BankError, DataError, OrderError, OrderSearchError, SearchError, SpecError
from .evalset import EvalSet
from .isoresnet import IsoResNet, IsoResNetConfig
from .order import SKIP, Order
from .search import (
    JobResult,
    SearchJob,
    SearchResult,
    SelectionConfig,
    get_searcher,
    list_searchers,
    register_searcher,
    search,
)
from .space import OrderSpace
from .spec import OrderSpec, load_order, save_order
from .train import TrainConfig, train_bank

__version__ = "0.1.0"

from . import data  # noqa: E402, F401  (ordersearch.data after a plain `import ordersearch`)

logging.getLogger("ordersearch").addHandler(logging.NullHandler())

__all__ = [
    "Bank",
    "BankError",
    "DataError",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "EvalSet",
    "IsoResNet",
    "JobResult",
    "Objective",
    "IsoResNetConfig",
    "Order",
    "OrderError",
    "OrderSearchError",
    "OrderSpace",
    "OrderSpec",
    "OrderedModel",
    "SKIP",
    "Score",
    "SearchError",
    "SearchJob",
    "SearchResult",
    "SelectionConfig",
    "SpecError",
    "TrainConfig",
    "bank_from_model",
    "build_model",
    "get_objective",
    "get_searcher",
    "list_adapters",
    "list_objectives",
    "list_searchers",
    "load_bank",
    "load_order",
    "register_adapter",
    "register_searcher",
    "save_order",
    "search",
    "train_bank",
]
