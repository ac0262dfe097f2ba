"""ordersearch: adapt pretrained isometric networks by searching the order of their blocks.

Implements Zhmoginov, Bashkirova and Sandler, "Compositional Models: Multi-Task Learning and
Knowledge Transfer with Modular Networks" (arXiv 2107.10963).
"""

from __future__ import annotations

import logging

from .adapters import bank_from_model, list_adapters, load_bank, register_adapter
from .bank import Bank
from .build import OrderedModel, build_model
from .evalset import EvalSet
from .errors import BankError, DataError, OrderError, OrderSearchError, SpecError
from .isoresnet import IsoResNet, IsoResNetConfig
from .order import SKIP, Order
from .space import OrderSpace
from .spec import OrderSpec, load_order, save_order

__version__ = "0.1.0"

from . import data  # noqa: E402  (ordersearch.data after a plain `import ordersearch`)

logging.getLogger("ordersearch").addHandler(logging.NullHandler())

__all__ = [
    "Bank",
    "BankError",
    "DataError",
    "EvalSet",
    "IsoResNet",
    "IsoResNetConfig",
    "Order",
    "OrderError",
    "OrderSearchError",
    "OrderSpace",
    "OrderSpec",
    "OrderedModel",
    "SKIP",
    "SpecError",
    "bank_from_model",
    "build_model",
    "list_adapters",
    "load_bank",
    "load_order",
    "register_adapter",
    "save_order",
]
