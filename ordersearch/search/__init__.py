"""Searchers: find the order of a bank's frozen blocks that suits new data, on Optuna studies.

Implements the order search of Zhmoginov, Bashkirova and Sandler, "Compositional Models:
Multi-Task Learning and Knowledge Transfer with Modular Networks" (arXiv 2107.10963): every
searcher proposes orders in batches scored by the engine and records every trial in an Optuna
study (SQLite, PostgreSQL or in memory), from which it resumes.

Example:
    >>> import ordersearch, torch
    >>> from ordersearch.evalset import EvalSet
    >>> from ordersearch.search import search
    >>> bank = ordersearch.load_bank("isoresnet:width=8,blocks=3,classes=10")
    >>> data = EvalSet(torch.randn(40, 1, 16, 16), torch.arange(40) % 4)
    >>> result = search(bank, data, "probe", searcher="evolution", n_trials=8, batch_size=4, seed=0)
    >>> result.trials["order"][0]
    '0-1-2'
"""

from __future__ import annotations

from ._base import (
    SamplerSearcher,
    SearchContext,
    Searcher,
    SearchError,
    get_searcher,
    list_searchers,
    register_searcher,
)
from ._beam import BeamSearcher
from ._differentiable import DifferentiableSearcher, MixOutputs, MixWeights
from ._encoding import OrderEncoding, order_of
from ._evidence import Interval, paired_bootstrap, verdict_of
from ._evolution import EvolutionSampler, EvolutionSearcher
from ._exhaustive import ExhaustiveSearcher
from ._job import RESULT_KEY, Finalist, JobResult, SearchJob, SelectionConfig, Splits, held_out, make_splits
from ._local import LocalSearcher
from ._mutations import (
    DEFAULT_MUTATIONS,
    Crossover,
    Delete,
    Duplicate,
    Insert,
    Mutation,
    OnePoint,
    Replace,
    Swap,
    TwoPoint,
    mutate,
    neighbours,
)
from ._optuna import GPSearcher, NSGA2Searcher, TPESearcher
from ._random import OrderSampler, RandomSearcher, UniformSampler
from ._result import SearchResult, best_trials, pareto_trials, trials_table
from ._search import search
from ._sources import SourcesSearcher
from ._study import make_storage, sqlite_url

__all__ = [
    "RESULT_KEY",
    "BeamSearcher",
    "Crossover",
    "DEFAULT_MUTATIONS",
    "Delete",
    "DifferentiableSearcher",
    "Duplicate",
    "EvolutionSampler",
    "EvolutionSearcher",
    "ExhaustiveSearcher",
    "Finalist",
    "GPSearcher",
    "Insert",
    "Interval",
    "JobResult",
    "LocalSearcher",
    "MixOutputs",
    "MixWeights",
    "Mutation",
    "NSGA2Searcher",
    "OnePoint",
    "OrderEncoding",
    "OrderSampler",
    "RandomSearcher",
    "Replace",
    "SamplerSearcher",
    "SearchJob",
    "SearchContext",
    "SearchError",
    "SearchResult",
    "SelectionConfig",
    "Searcher",
    "SourcesSearcher",
    "Splits",
    "Swap",
    "TPESearcher",
    "TwoPoint",
    "UniformSampler",
    "best_trials",
    "get_searcher",
    "held_out",
    "list_searchers",
    "make_splits",
    "make_storage",
    "mutate",
    "neighbours",
    "order_of",
    "paired_bootstrap",
    "pareto_trials",
    "register_searcher",
    "search",
    "sqlite_url",
    "trials_table",
    "verdict_of",
]
