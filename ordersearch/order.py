"""Orders: which frozen blocks run, in which sequence.

An order is the per-task "computation order" of Zhmoginov, Bashkirova and Sandler,
"Compositional Models: Multi-Task Learning and Knowledge Transfer with Modular Networks"
(arXiv 2107.10963): a sequence of ids into a bank of same-shaped residual blocks, with
repetitions allowed and skipped positions simply omitted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, overload

from .errors import OrderError

__all__ = ["Order", "SKIP", "as_order"]

#: Choice a searcher with fixed positions may emit for "no block here"; ``Order`` drops it.
SKIP = -1

_TEXT_SEPARATORS = re.compile(r"[\s,\-]+")


class Order(Sequence[int]):
    """An immutable, hashable sequence of block ids, printed as ``0-1-1-3``.

    Args:
        ids: Block ids. ``SKIP`` (-1) entries are dropped, so a fixed-position searcher can
            express skips; every other id must be a non-negative integer.

    Example:
        >>> o = Order([0, 1, -1, 1, 3])
        >>> o
        Order('0-1-1-3')
        >>> str(o), len(o), o.prefix(2)
        ('0-1-1-3', 4, Order('0-1'))
        >>> Order.parse("[2, 0, 1]") == Order.parse("2-0-1")
        True
    """

    __slots__ = ("_ids", "_hash")

    def __init__(self, ids: Iterable[int] = ()) -> None:
        out = []
        for pos, raw in enumerate(ids):
            if isinstance(raw, bool) or not _is_int(raw):
                raise OrderError(f"order position {pos}: {raw!r} is not an integer block id")
            value = int(raw)
            if value == SKIP:
                continue
            if value < 0:
                raise OrderError(
                    f"order position {pos}: block id {value} is negative (use {SKIP} for a skip)"
                )
            out.append(value)
        self._ids: tuple[int, ...] = tuple(out)
        self._hash = hash(self._ids)

    # --- construction -------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str | Sequence[int] | Order) -> Order:
        """Parse ``"0-1-1-3"``, ``"0,1,1,3"``, ``"0 1 1 3"``, a JSON list, or a sequence."""
        if isinstance(text, Order):
            return text
        if not isinstance(text, str):
            return cls(text)
        s = text.strip()
        if s in ("", "[]", "-"):
            return cls(())
        if s.startswith("["):
            try:
                values = json.loads(s)
            except json.JSONDecodeError as exc:
                raise OrderError(f"cannot parse order {text!r}: {exc.msg}") from None
            if not isinstance(values, list):
                raise OrderError(f"cannot parse order {text!r}: expected a JSON list")
            return cls(values)
        parts = [p for p in _TEXT_SEPARATORS.split(s) if p]
        values = []
        for pos, part in enumerate(parts):
            if not part.isdigit():
                raise OrderError(f"cannot parse order {text!r}: position {pos} is {part!r}")
            values.append(int(part))
        return cls(values)

    @classmethod
    def identity(cls, n_blocks: int) -> Order:
        """The source model's own order ``0-1-...-(K-1)``."""
        return cls(range(n_blocks))

    # --- sequence protocol --------------------------------------------------------------
    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> Order: ...
    def __getitem__(self, index: int | slice) -> int | Order:
        if isinstance(index, slice):
            return Order(self._ids[index])
        return self._ids[index]

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[int]:
        return iter(self._ids)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Order):
            return self._ids == other._ids
        if isinstance(other, tuple):
            return self._ids == other
        if isinstance(other, list):
            return list(self._ids) == other
        return NotImplemented

    def __lt__(self, other: Order) -> bool:
        return self._ids < tuple(other)

    def __add__(self, other: Iterable[int]) -> Order:
        return Order(self._ids + tuple(other))

    def __str__(self) -> str:
        return "-".join(str(i) for i in self._ids) if self._ids else "-"

    def __repr__(self) -> str:
        return f"Order('{self}')"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Order, (self._ids,))

    # --- helpers ------------------------------------------------------------------------
    @property
    def ids(self) -> tuple[int, ...]:
        """The block ids as a plain tuple."""
        return self._ids

    def prefix(self, n: int) -> Order:
        """The first ``n`` positions."""
        return Order(self._ids[:n])

    def to_list(self) -> list[int]:
        """JSON-friendly list of ids."""
        return list(self._ids)

    def counts(self) -> dict[int, int]:
        """How many times each block id is used."""
        out: dict[int, int] = {}
        for i in self._ids:
            out[i] = out.get(i, 0) + 1
        return out

    def validate(self, n_blocks: int, *, min_len: int = 1, max_len: int | None = None) -> Order:
        """Check ids against a bank of ``n_blocks`` blocks; return ``self`` if valid.

        Raises:
            OrderError: naming the bad position and the allowed range.
        """
        for pos, i in enumerate(self._ids):
            if i >= n_blocks:
                raise OrderError(
                    f"order {self}: position {pos} uses block {i}, "
                    f"but the bank has blocks 0..{n_blocks - 1}"
                )
        hi = max_len if max_len is not None else None
        if len(self) < min_len or (hi is not None and len(self) > hi):
            allowed = f"{min_len}..{hi}" if hi is not None else f">= {min_len}"
            raise OrderError(f"order {self}: length {len(self)} is outside the allowed {allowed}")
        return self


def as_order(value: str | Sequence[int] | Order) -> Order:
    """Coerce text, a list or an :class:`Order` into an :class:`Order`."""
    return Order.parse(value)


def _is_int(value: object) -> bool:
    try:
        return int(value) == value  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return False
