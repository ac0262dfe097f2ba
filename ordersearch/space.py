"""The space of orders a searcher may propose.

A space fixes the bank size K, the allowed lengths, how often one block may be reused
(block reuse gives depth at no parameter cost, as in the paper's ImageNet result), whether
positions may be skipped, and a pinned prefix that every order starts with.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .errors import OrderError
from .order import Order

__all__ = ["OrderSpace"]


@dataclass(frozen=True)
class OrderSpace:
    """Orders of length ``min_len..max_len`` over blocks ``0..n_blocks-1``.

    Args:
        n_blocks: K, the number of blocks in the bank.
        min_len: Shortest allowed order (default 1).
        max_len: Longest allowed order (default K).
        max_repeats: How many times one block may appear (default 1: permutations and
            skips only; ``None`` means unlimited).
        allow_skip: Whether orders shorter than ``max_len`` are allowed. When False,
            ``min_len`` is raised to ``max_len``.
        prefix: Block ids every order starts with (e.g. ``(0,)`` keeps the first block).

    Example:
        >>> space = OrderSpace(4, max_len=4, max_repeats=2)
        >>> order = space.sample(random.Random(0))
        >>> space.contains(order)
        True
        >>> OrderSpace(3, allow_skip=False).size()
        6
    """

    n_blocks: int
    min_len: int = 1
    max_len: int | None = None
    max_repeats: int | None = 1
    allow_skip: bool = True
    prefix: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.n_blocks < 1:
            raise OrderError(f"an order space needs at least one block, got n_blocks={self.n_blocks}")
        max_len = self.n_blocks if self.max_len is None else int(self.max_len)
        object.__setattr__(self, "max_len", max_len)
        object.__setattr__(self, "prefix", tuple(Order(self.prefix)))
        if self.max_repeats is not None and self.max_repeats < 1:
            raise OrderError(f"max_repeats must be >= 1 or None, got {self.max_repeats}")
        if not self.allow_skip:
            object.__setattr__(self, "min_len", max_len)
        if self.min_len < 0 or max_len < self.min_len:
            raise OrderError(f"order lengths {self.min_len}..{max_len} are empty")
        cap = self.n_blocks * self.max_repeats if self.max_repeats is not None else None
        if cap is not None and self.min_len > cap:
            raise OrderError(
                f"min_len={self.min_len} needs more than {self.n_blocks} blocks x "
                f"max_repeats={self.max_repeats}"
            )
        Order(self.prefix).validate(self.n_blocks, min_len=0, max_len=max_len)
        self._check_repeats(Order(self.prefix))

    # --- membership ---------------------------------------------------------------------
    @property
    def effective_max_len(self) -> int:
        """``max_len`` capped by what ``max_repeats`` allows."""
        assert self.max_len is not None
        if self.max_repeats is None:
            return self.max_len
        return min(self.max_len, self.n_blocks * self.max_repeats)

    def validate(self, order: Order | str | Sequence[int]) -> Order:
        """Return ``order`` as an :class:`Order` if it is in the space, else raise."""
        o = Order.parse(order)
        o.validate(self.n_blocks, min_len=self.min_len, max_len=self.max_len)
        self._check_repeats(o)
        if tuple(o[: len(self.prefix)]) != self.prefix:
            raise OrderError(f"order {o}: must start with the pinned prefix {Order(self.prefix)}")
        return o

    def contains(self, order: Order | str | Sequence[int]) -> bool:
        """True when ``order`` is in the space."""
        try:
            self.validate(order)
        except OrderError:
            return False
        return True

    def _check_repeats(self, order: Order) -> None:
        if self.max_repeats is None:
            return
        for block, n in order.counts().items():
            if n > self.max_repeats:
                raise OrderError(
                    f"order {order}: block {block} is used {n} times, max_repeats={self.max_repeats}"
                )

    @property
    def identity(self) -> Order:
        """The identity order ``0..K-1`` (the source model)."""
        return Order.identity(self.n_blocks)

    @classmethod
    def covering(cls, n_blocks: int, orders: Sequence[Order] = (), **kwargs: object) -> OrderSpace:
        """A space over ``n_blocks`` blocks widened, where a setting is not given, so that it
        holds every order in ``orders`` (e.g. a bank's source orders, which may be deeper than
        K and reuse blocks)."""
        orders = [Order.parse(o) for o in orders]
        if orders:
            if kwargs.get("max_len") is None:
                kwargs["max_len"] = max([n_blocks, *(len(o) for o in orders)])
            if "max_repeats" not in kwargs:
                kwargs["max_repeats"] = max([1, *(max(o.counts().values(), default=1) for o in orders)])
        return cls(n_blocks, **kwargs)  # type: ignore[arg-type]

    # --- sampling -----------------------------------------------------------------------
    def sample(self, rng: random.Random) -> Order:
        """Draw an order uniformly from the space (exactly uniform over all its orders)."""
        lo = max(self.min_len, len(self.prefix))
        hi = self.effective_max_len
        counts = [self._count_completions(n) for n in range(lo, hi + 1)]
        length = rng.choices(range(lo, hi + 1), weights=counts)[0]
        ids = list(self.prefix)
        used = Order(ids).counts()
        for pos in range(len(ids), length):
            # Choose each next id in proportion to the number of completions it admits.
            weights = []
            for b in range(self.n_blocks):
                if self.max_repeats is not None and used.get(b, 0) >= self.max_repeats:
                    weights.append(0)
                    continue
                used[b] = used.get(b, 0) + 1
                weights.append(self._count_fill(length - pos - 1, used))
                used[b] -= 1
            b = rng.choices(range(self.n_blocks), weights=weights)[0]
            ids.append(b)
            used[b] = used.get(b, 0) + 1
        return Order(ids)

    def size(self) -> int:
        """Number of orders in the space."""
        lo = max(self.min_len, len(self.prefix))
        return sum(self._count_completions(n) for n in range(lo, self.effective_max_len + 1))

    def enumerate(self, *, limit: int = 100_000) -> Iterator[Order]:
        """Every order in the space, shortest first.

        Raises:
            OrderError: if the space holds more than ``limit`` orders.
        """
        total = self.size()
        if total > limit:
            raise OrderError(
                f"the space holds {total:,} orders, more than the limit of {limit:,}; "
                "narrow it (max_len, max_repeats, prefix) or raise the limit"
            )
        lo = max(self.min_len, len(self.prefix))
        for length in range(lo, self.effective_max_len + 1):
            free = length - len(self.prefix)
            for tail in itertools.product(range(self.n_blocks), repeat=free):
                o = Order(self.prefix + tail)
                if self.max_repeats is None or max(o.counts().values(), default=0) <= self.max_repeats:
                    yield o

    def _count_completions(self, length: int) -> int:
        return self._count_fill(length - len(self.prefix), Order(self.prefix).counts())

    def _count_fill(self, free: int, used: dict[int, int]) -> int:
        """Sequences of ``free`` ids respecting ``max_repeats`` given ``used`` counts."""
        if free < 0:
            return 0
        if self.max_repeats is None:
            return self.n_blocks**free
        caps = [self.max_repeats - used.get(b, 0) for b in range(self.n_blocks)]
        if min(caps) < 0:
            return 0
        # Exponential generating function: prod_b sum_{k<=cap_b} x^k/k!, coefficient * free!
        poly = [1.0]
        for cap in caps:
            term = [1.0 / math.factorial(k) for k in range(min(cap, free) + 1)]
            new = [0.0] * min(len(poly) + len(term) - 1, free + 1)
            for i, a in enumerate(poly):
                for j, b in enumerate(term):
                    if i + j <= free:
                        new[i + j] += a * b
            poly = new
        if free >= len(poly):
            return 0
        return round(poly[free] * math.factorial(free))

    def describe(self) -> dict[str, object]:
        """JSON-friendly description (stored in specs and study attributes)."""
        return {
            "n_blocks": self.n_blocks,
            "min_len": self.min_len,
            "max_len": self.max_len,
            "max_repeats": self.max_repeats,
            "allow_skip": self.allow_skip,
            "prefix": list(self.prefix),
        }
