"""``local``: hill climbing from the identity order over single mutations.

Each batch evaluates unseen neighbours (one replace, swap, insert, delete or duplicate) of
the best order found so far; when a neighbour beats it, the climb moves there. When every
neighbour of the best order has been scored (a local optimum), the climb continues from the
next best order whose neighbourhood is not exhausted, then from random unseen orders.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import optuna

from ..order import Order
from ._base import SearchContext, Searcher, register_searcher
from ._mutations import DEFAULT_MUTATIONS, Mutation, neighbours

__all__ = ["LocalSearcher"]


@dataclass(frozen=True)
class LocalSearcher(Searcher):
    """Best-first hill climbing over single mutations.

    Args:
        mutations: The neighbourhood's mutation operators.

    Example:
        >>> LocalSearcher().name
        'local'
    """

    name = "local"
    mutations: tuple[Mutation, ...] = field(default=DEFAULT_MUTATIONS)

    def _ranked(self, ctx: SearchContext) -> list[Order]:
        scored = ctx.scored()
        return sorted(scored, key=lambda o: (-scored[o], len(o), o))

    def ask(self, ctx: SearchContext, n: int) -> list[tuple[optuna.Trial, Order]]:
        seen = ctx.seen()
        picked: list[Order] = []
        for inc in self._ranked(ctx):
            nb = [o for o in neighbours(inc, ctx.space, self.mutations) if o not in seen and o not in picked]
            ctx.rng("local", inc).shuffle(nb)
            picked += nb[: n - len(picked)]
            if len(picked) >= n:
                break
        picked += _random_unseen(ctx, n - len(picked), seen | set(picked))
        return [ctx.ask_order(o) for o in picked]

    def retain(self, ctx: SearchContext) -> list[Order]:
        return self._ranked(ctx)[:1]


def _random_unseen(ctx: SearchContext, n: int, seen: set[Order], tries: int = 200) -> list[Order]:
    out: list[Order] = []
    if n <= 0:
        return out
    rng = ctx.rng("random-unseen", len(seen))
    for _ in range(tries * n):
        o = ctx.space.sample(rng)
        if o not in seen and o not in out:
            out.append(o)
            if len(out) == n:
                break
    return out


register_searcher("local", LocalSearcher)
