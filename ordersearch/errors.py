"""Errors that carry a one-line, user-facing message.

The CLI turns :class:`OrderSearchError` into exit code 2 and prints only its message.
"""

from __future__ import annotations

__all__ = ["one_line", "OrderSearchError", "OrderError", "BankError", "SpecError", "DataError", "ObjectiveError", "SearchError"]


class OrderSearchError(ValueError):
    """Base class for bad input: the message is meant to be shown to the user as is."""


class OrderError(OrderSearchError):
    """An order is malformed or does not fit a bank or an order space."""


class BankError(OrderSearchError):
    """A model cannot be turned into a bank, or a bank file is unusable."""


class SpecError(OrderSearchError):
    """An order spec file is malformed, truncated, too new, or made for another bank."""


class DataError(OrderSearchError):
    """A data spec cannot be parsed or its data cannot be loaded."""


class SearchError(OrderSearchError):
    """A search cannot run as asked (unknown searcher, space too large, study mismatch)."""


class ObjectiveError(OrderSearchError):
    """An objective is unknown, misconfigured (bad options, an ensemble that cannot be
    formed) or cannot score the data it was given."""


def one_line(exc: BaseException, limit: int = 200) -> str:
    """A library's exception message fit for one line of an error: whitespace (newlines
    included) collapsed, cut at ``limit`` characters; the type's name if it has no message."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
