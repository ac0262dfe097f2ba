"""The evaluation engine: prefix-trie activation cache and objectives.

Scores batches of candidate block orders (Zhmoginov, Bashkirova and Sandler, arXiv
2107.10963) paying once per distinct order prefix: see :class:`Engine`.
"""

from __future__ import annotations

from ._cache import GDSF, LRU, CachePolicy
from ._config import EngineConfig
from ._engine import Engine
from ._ensemble import Ensemble
from ._transfer import Knn, LogME
from ._trie import count_distinct_prefixes
from ._types import EngineStats, Score
from ._unsupervised import BNM, SND
from .objectives import (
    DEFAULT_LABELLED,
    DEFAULT_UNLABELLED,
    Entropy,
    Head,
    Infomax,
    Objective,
    Probe,
    get_objective,
    list_objectives,
    register_objective,
)

__all__ = [
    "DEFAULT_LABELLED",
    "DEFAULT_UNLABELLED",
    "BNM",
    "Ensemble",
    "Knn",
    "LogME",
    "SND",
    "CachePolicy",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "Entropy",
    "GDSF",
    "Head",
    "Infomax",
    "LRU",
    "Objective",
    "Probe",
    "Score",
    "count_distinct_prefixes",
    "get_objective",
    "list_objectives",
    "register_objective",
]
