"""``beam``: grow orders one position at a time, keeping the best ``width`` prefixes.

Every partial order is itself an order (the rest skipped), so it is scored by the objective
and recorded as a trial. Each level extends the ``width`` best orders of the previous one by
every block; all children of a prefix share its activation, which the searcher asks the
engine to retain, so nearly every block forward is reused.
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna

from ..order import Order
from ..space import OrderSpace
from ._base import SearchContext, Searcher, register_searcher

__all__ = ["BeamSearcher"]


@dataclass(frozen=True)
class BeamSearcher(Searcher):
    """Beam search over order prefixes.

    Args:
        width: Prefixes kept per level (W).
        first_level_limit: Most orders on the first level when ``min_len`` forces it to be
            longer than one free position (a seeded sample of that level beyond it).

    Example:
        >>> BeamSearcher(width=2).width
        2
    """

    name = "beam"
    width: int = 4
    first_level_limit: int = 4096

    def _first_level(self, ctx: SearchContext) -> list[Order]:
        space = ctx.space
        depth = max(space.min_len, len(space.prefix) + 1)
        level = OrderSpace(space.n_blocks, min_len=depth, max_len=depth, max_repeats=space.max_repeats,
                           prefix=space.prefix)
        if level.size() <= self.first_level_limit:
            return list(level.enumerate(limit=self.first_level_limit))
        rng = ctx.rng("beam-first-level")
        found: dict[Order, None] = {}
        for _ in range(20 * self.first_level_limit):
            found[level.sample(rng)] = None
            if len(found) >= self.first_level_limit:
                break
        return sorted(found)

    def _expand(self, ctx: SearchContext, frontier: list[Order]) -> list[Order]:
        out: dict[Order, None] = {}
        for o in frontier:
            for b in range(ctx.space.n_blocks):
                child = o + (b,)
                if ctx.space.contains(child):
                    out[child] = None
        return list(out)

    def _top(self, level: list[Order], scored: dict[Order, float]) -> list[Order]:
        ranked = sorted((o for o in level if o in scored), key=lambda o: (-scored[o], o))
        return ranked[: self.width]

    def ask(self, ctx: SearchContext, n: int) -> list[tuple[optuna.Trial, Order]]:
        scored, seen = ctx.scored(), ctx.seen()
        level = self._first_level(ctx)
        while level:
            pending = [o for o in level if o not in seen]
            if pending:
                return [ctx.ask_order(o, beam_depth=len(o)) for o in pending[:n]]
            level = self._expand(ctx, self._top(level, scored))
        return []

    def retain(self, ctx: SearchContext) -> list[Order]:
        scored = ctx.scored()
        if not scored:
            return []
        deepest = max(len(o) for o in scored)
        return self._top([o for o in scored if len(o) == deepest], scored)


register_searcher("beam", BeamSearcher)
