"""The one interface every searcher speaks, and the context a search hands it.

A searcher proposes orders of an :class:`~ordersearch.OrderSpace` as trials of an Optuna study,
in batches that the engine scores together (so prefix sharing works for every searcher).
Like Optuna's ``BaseSampler`` it has few abstract methods: :meth:`Searcher.ask`, plus optional
hooks (:meth:`Searcher.make_sampler`, :meth:`Searcher.prepare`, :meth:`Searcher.retain`). Its
state lives in the study (trial parameters and user attributes), so a search resumes from
its storage alone.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import optuna
from optuna.trial import FrozenTrial, TrialState

from .._registry import Registry
from ..errors import SearchError
from ..order import Order
from ..space import OrderSpace
from ._encoding import OrderEncoding, is_live, order_of
from ._lease import Leases

__all__ = [
    "SearchContext",
    "SearchError",
    "Searcher",
    "SamplerSearcher",
    "get_searcher",
    "list_searchers",
    "register_searcher",
]


@dataclass
class SearchContext:
    """What a searcher sees: the study, the space, the engine and the run's settings.

    Attributes:
        space: The order space.
        encoding: Its fixed-position encoding for Optuna samplers.
        engine: The engine scoring candidates (its ``bank``, ``evalset`` and ``objective``
            are available to searchers that need them, e.g. ``differentiable``).
        bank: The bank searched.
        seed: Seed of the run (None: nondeterministic).
        study: The Optuna study (set once the study is opened).
        leases: This worker's trial leases (see :mod:`._lease`), set with the study.
        worker_seed: Seed of this worker's model-based sampler: ``seed`` for the worker that
            created the study; for one that joined it (a resume, or another worker), a seed
            derived from ``seed`` and the worker's process, so workers never propose in
            lockstep. Per-trial random sources (:meth:`rng`) keep ``seed``.
    """

    space: OrderSpace
    encoding: OrderEncoding
    engine: Any
    bank: Any
    seed: int | None = None
    study: optuna.Study | None = None
    leases: Leases | None = None
    worker_seed: int | None = None
    _salt: int = field(default_factory=lambda: random.SystemRandom().randrange(2**31), repr=False)

    def __post_init__(self) -> None:
        if self.worker_seed is None:
            self.worker_seed = self.seed

    def ask(self) -> optuna.Trial:
        """``study.ask()``, leased to this worker from this moment (searchers ask through
        this, so a trial never sits RUNNING without a lease)."""
        assert self.study is not None
        trial = self.study.ask()
        if self.leases is not None:
            self.leases.take(trial)
        return trial

    # --- reading the study ----------------------------------------------------------------
    def trials(self, states: tuple[TrialState, ...] | None = None) -> list[FrozenTrial]:
        """The study's trials (not copied; do not modify)."""
        assert self.study is not None
        return self.study.get_trials(deepcopy=False, states=states)

    def seen(self) -> set[Order]:
        """Orders of every trial proposed so far (except interrupted ones, never scored)."""
        out = set()
        for t in self.trials():
            if not is_live(t):
                continue
            o = order_of(t, self.encoding)
            if o is not None:
                out.add(o)
        return out

    def scored(self) -> dict[Order, float]:
        """Best objective value per order over the completed trials."""
        out: dict[Order, float] = {}
        for t in self.trials((TrialState.COMPLETE,)):
            o = order_of(t, self.encoding)
            if o is not None and t.values:
                v = t.values[0]
                if o not in out or v > out[o]:
                    out[o] = v
        return out

    def rng(self, *tag: object) -> random.Random:
        """A random source fixed by the seed and ``tag`` (e.g. a trial number), so that a
        resumed search draws what an uninterrupted one would have."""
        base = self.seed if self.seed is not None else self._salt
        return random.Random(f"{base}:" + ":".join(map(str, tag)))

    # --- proposing ------------------------------------------------------------------------
    def ask_order(self, order: Order, **attrs: Any) -> tuple[optuna.Trial, Order]:
        """A new trial for ``order`` chosen by the searcher itself (not by a sampler).

        The trial carries the order's parameters like a sampled one (when the order is
        representable), so samplers learn from its score. They are written to the new trial,
        not enqueued: on SQLite two workers can pop one enqueued trial and both score it.
        """
        trial = self.ask()
        self.encoding.record(trial, order)
        for k, v in {"order": str(order), **attrs}.items():
            trial.set_user_attr(k, v)
        return trial, order


class Searcher(ABC):
    """Base class of searchers.

    Subclasses set :attr:`name` and implement :meth:`ask`. Searchers are small frozen
    dataclasses whose fields are their options (:meth:`config` lists them).

    Attributes:
        name: Registry name (``tpe``, ``evolution``, ...).
        directions: Optuna study directions; the first objective is always the score.
    """

    name: ClassVar[str] = ""
    directions: ClassVar[tuple[str, ...]] = ("maximize",)

    def make_sampler(self, ctx: SearchContext) -> optuna.samplers.BaseSampler:
        """The Optuna sampler the study is created with (default: a seeded random sampler,
        unused by searchers that choose their orders themselves)."""
        return optuna.samplers.RandomSampler(seed=ctx.seed)

    def check(self, space: OrderSpace) -> None:
        """Refuse (``SearchError``) a space this searcher cannot search, before the study is
        opened or anything runs."""
        return None

    def prepare(self, ctx: SearchContext) -> None:
        """Called once the study is open, before the first :meth:`ask` of this run."""
        return None

    @abstractmethod
    def ask(self, ctx: SearchContext, n: int) -> list[tuple[optuna.Trial, Order]]:
        """Up to ``n`` new trials and their orders (all in ``ctx.space``); an empty list
        means the searcher has nothing left to propose and the search ends."""

    def retain(self, ctx: SearchContext) -> list[Order]:
        """Prefixes the searcher will extend next: passed to the engine as retain hints."""
        return []

    def values(self, score: float, order: Order) -> list[float]:
        """The values told to the study for a scored order (one per direction)."""
        return [score]

    def config(self) -> dict[str, Any]:
        """The searcher's options, JSON-friendly."""
        if not hasattr(self, "__dataclass_fields__"):
            return {}
        out = {}
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            out[f.name] = v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)
        return out


class SamplerSearcher(Searcher):
    """A searcher whose proposals come from an Optuna sampler over the order encoding:
    ``study.ask()`` then one categorical per position (see :mod:`._encoding`)."""

    @abstractmethod
    def make_sampler(self, ctx: SearchContext) -> optuna.samplers.BaseSampler: ...

    def ask(self, ctx: SearchContext, n: int) -> list[tuple[optuna.Trial, Order]]:
        assert ctx.study is not None
        out = []
        for _ in range(n):
            trial = ctx.ask()
            out.append((trial, ctx.encoding.suggest(trial)))
        return out


# --- registry ---------------------------------------------------------------------------

_SEARCHERS: Registry[Searcher] = Registry("searcher", Searcher, SearchError)


def register_searcher(name: str, factory: Callable[..., Searcher]) -> None:
    """Make ``get_searcher(name, **options)`` return ``factory(**options)``."""
    _SEARCHERS.register(name, factory)


def list_searchers() -> list[str]:
    """Names of the registered searchers."""
    return _SEARCHERS.names()


def get_searcher(searcher: str | Searcher, **options: Any) -> Searcher:
    """A searcher by name with its options, or the instance given."""
    return _SEARCHERS.get_or_make(searcher, **options)
