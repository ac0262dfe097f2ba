"""``exhaustive``: every order of a small space, shortest first."""

from __future__ import annotations

from dataclasses import dataclass

import optuna

from ..order import Order
from ..space import OrderSpace
from ._base import SearchContext, Searcher, SearchError, register_searcher

__all__ = ["ExhaustiveSearcher"]


@dataclass(frozen=True)
class ExhaustiveSearcher(Searcher):
    """Scores every order of the space once (up to the trial budget).

    Args:
        limit: Largest space accepted; bigger spaces are refused before anything runs.

    Example:
        >>> ExhaustiveSearcher(limit=100).limit
        100
    """

    name = "exhaustive"
    limit: int = 20_000

    def check(self, space: OrderSpace) -> None:
        size = space.size()
        if size > self.limit:
            raise SearchError(
                f"exhaustive search refuses this space: it holds {size:,} orders, more than the limit "
                f"of {self.limit:,}; narrow it (max_len, max_repeats, prefix), raise the limit, or use "
                "another searcher (evolution, tpe, beam)"
            )

    def ask(self, ctx: SearchContext, n: int) -> list[tuple[optuna.Trial, Order]]:
        seen = ctx.seen()
        picked: list[Order] = []
        for o in ctx.space.enumerate(limit=self.limit):
            if o not in seen:
                picked.append(o)
                if len(picked) == n:
                    break
        return [ctx.ask_order(o) for o in picked]


register_searcher("exhaustive", ExhaustiveSearcher)
