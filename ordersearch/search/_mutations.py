"""Order mutations and crossovers, as objects (like NSGA-II's crossover strategies in Optuna).

A mutation lists every single-step neighbour of an order together with the position it
changes; a random mutation picks one of them, optionally biased toward late positions
(``late_bias``): a child that differs from its parent only near the end shares a long prefix
with it, so the engine's cache serves most of its block forwards.

Mutations: :class:`Replace`, :class:`Swap`, :class:`Insert`, :class:`Delete`,
:class:`Duplicate`. Crossovers on sequences: :class:`OnePoint`, :class:`TwoPoint` (used to
recombine source orders in multi-source adaptation, Zhmoginov et al., arXiv 2107.10963).
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from ..order import Order
from ..space import OrderSpace

__all__ = [
    "Crossover",
    "DEFAULT_MUTATIONS",
    "Delete",
    "Duplicate",
    "Insert",
    "Mutation",
    "OnePoint",
    "Replace",
    "Swap",
    "TwoPoint",
    "mutate",
    "neighbours",
]


class Mutation(ABC):
    """One kind of single-step change of an order."""

    name: ClassVar[str] = ""

    @abstractmethod
    def candidates(self, order: Order, space: OrderSpace) -> list[tuple[int, Order]]:
        """Every ``(position, child)`` this mutation can make from ``order`` (children may be
        outside the space; callers filter). Positions of the pinned prefix never change."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Replace(Mutation):
    """Put another block at one position."""

    name = "replace"

    def candidates(self, order: Order, space: OrderSpace) -> list[tuple[int, Order]]:
        ids = list(order)
        return [(p, Order(ids[:p] + [b] + ids[p + 1:]))
                for p in range(len(space.prefix), len(ids)) for b in range(space.n_blocks) if b != ids[p]]


class Swap(Mutation):
    """Exchange the blocks at two positions (position: the later one)."""

    name = "swap"

    def candidates(self, order: Order, space: OrderSpace) -> list[tuple[int, Order]]:
        ids, out = list(order), []
        for i in range(len(space.prefix), len(ids)):
            for j in range(i + 1, len(ids)):
                if ids[i] != ids[j]:
                    c = list(ids)
                    c[i], c[j] = c[j], c[i]
                    out.append((j, Order(c)))
        return out


class Insert(Mutation):
    """Insert a block before a position (or append it)."""

    name = "insert"

    def candidates(self, order: Order, space: OrderSpace) -> list[tuple[int, Order]]:
        ids = list(order)
        return [(p, Order(ids[:p] + [b] + ids[p:]))
                for p in range(len(space.prefix), len(ids) + 1) for b in range(space.n_blocks)]


class Delete(Mutation):
    """Drop one position (a skip)."""

    name = "delete"

    def candidates(self, order: Order, space: OrderSpace) -> list[tuple[int, Order]]:
        ids = list(order)
        return [(p, Order(ids[:p] + ids[p + 1:])) for p in range(len(space.prefix), len(ids))]


class Duplicate(Mutation):
    """Run the block at a position twice in a row (block reuse)."""

    name = "duplicate"

    def candidates(self, order: Order, space: OrderSpace) -> list[tuple[int, Order]]:
        ids = list(order)
        return [(p + 1, Order(ids[:p + 1] + [ids[p]] + ids[p + 1:])) for p in range(len(space.prefix), len(ids))]


DEFAULT_MUTATIONS: tuple[Mutation, ...] = (Replace(), Swap(), Insert(), Delete(), Duplicate())


def neighbours(order: Order, space: OrderSpace, mutations: Sequence[Mutation] = DEFAULT_MUTATIONS) -> list[Order]:
    """Distinct single-mutation neighbours of ``order`` inside ``space``, in a fixed order."""
    out: dict[Order, None] = {}
    for m in mutations:
        for _, child in m.candidates(order, space):
            if child != order and child not in out and space.contains(child):
                out[child] = None
    return list(out)


def mutate(
    order: Order,
    space: OrderSpace,
    rng: random.Random,
    mutations: Sequence[Mutation] = DEFAULT_MUTATIONS,
    *,
    late_bias: float = 0.0,
) -> Order | None:
    """A random valid child of ``order``: a mutation kind uniformly among those that apply,
    then a change with weight ``(position + 1) ** late_bias`` (0: uniform). None if no
    mutation gives a valid child."""
    kinds = list(mutations)
    rng.shuffle(kinds)
    for m in kinds:
        cands = [(p, c) for p, c in m.candidates(order, space) if c != order and space.contains(c)]
        if not cands:
            continue
        weights = [(p + 1) ** late_bias for p, _ in cands]
        return rng.choices(cands, weights=weights)[0][1]
    return None


class Crossover(ABC):
    """Recombines two parent orders into one child (cut points outside the pinned prefix)."""

    name: ClassVar[str] = ""

    @abstractmethod
    def __call__(self, a: Order, b: Order, space: OrderSpace, rng: random.Random) -> Order: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class OnePoint(Crossover):
    """``a[:c] + b[c:]`` for a cut ``c``."""

    name = "one_point"

    def __call__(self, a: Order, b: Order, space: OrderSpace, rng: random.Random) -> Order:
        lo = len(space.prefix)
        c = rng.randint(lo, max(lo, min(len(a), len(b))))
        return Order(list(a)[:c] + list(b)[c:])


class TwoPoint(Crossover):
    """``a[:c1] + b[c1:c2] + a[c2:]`` for cuts ``c1 <= c2``."""

    name = "two_point"

    def __call__(self, a: Order, b: Order, space: OrderSpace, rng: random.Random) -> Order:
        lo = len(space.prefix)
        hi = max(lo, min(len(a), len(b)))
        c1, c2 = sorted((rng.randint(lo, hi), rng.randint(lo, hi)))
        return Order(list(a)[:c1] + list(b)[c1:c2] + list(a)[c2:])
