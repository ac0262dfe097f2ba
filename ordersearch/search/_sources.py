"""``sources``: score each of the bank's named source orders and keep the best.

Multi-source adaptation (Zhmoginov, Bashkirova and Sandler, arXiv 2107.10963): a bank trained
on several tasks or domains carries one order per source; for an unlabelled target domain
the source order that scores best by an unsupervised objective (``infomax``) is chosen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import optuna

from ..order import Order
from ._base import SearchContext, Searcher, SearchError, register_searcher

__all__ = ["SourcesSearcher"]

log = logging.getLogger("ordersearch")


@dataclass(frozen=True)
class SourcesSearcher(Searcher):
    """Scores the bank's source orders (those inside the space), then stops.

    Example:
        >>> SourcesSearcher().name
        'sources'
    """

    name = "sources"

    def _orders(self, ctx: SearchContext) -> dict[str, Order]:
        orders = dict(getattr(ctx.bank, "source_orders", {}) or {})
        if not orders:
            raise SearchError(
                "the sources searcher needs a bank that carries source orders (one per task or domain it "
                "was trained on, e.g. a bank from `train_bank`); this bank has none"
            )
        inside = {k: o for k, o in orders.items() if ctx.space.contains(o)}
        for k in orders.keys() - inside.keys():
            log.warning("source order %r (%s) is outside the order space; not scored", k, orders[k])
        return inside

    def prepare(self, ctx: SearchContext) -> None:
        self._orders(ctx)

    def ask(self, ctx: SearchContext, n: int) -> list[tuple[optuna.Trial, Order]]:
        seen = ctx.seen()
        todo = [(k, o) for k, o in self._orders(ctx).items() if o not in seen]
        return [ctx.ask_order(o, source=k) for k, o in todo[:n]]


register_searcher("sources", SourcesSearcher)
