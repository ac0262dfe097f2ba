"""Adapters: turn a model into a :class:`~ordersearch.Bank` of frozen, same-shaped blocks."""

from __future__ import annotations

from . import compositional as _compositional  # noqa: F401  (registers the adapter and source scheme)
from . import isoresnet as _isoresnet  # noqa: F401  (registers the adapter)
from . import timm_models as _timm_models  # noqa: F401  (registers the adapters)
from ._load import (
    build_source_model,
    file_sha256,
    load_bank,
    parse_model_args,
    read_bank_header,
    register_source,
)
from ._registry import Adapter, bank_from_model, get_adapter, list_adapters, register_adapter

__all__ = [
    "Adapter",
    "bank_from_model",
    "build_source_model",
    "file_sha256",
    "get_adapter",
    "list_adapters",
    "load_bank",
    "parse_model_args",
    "read_bank_header",
    "register_adapter",
    "register_source",
]
