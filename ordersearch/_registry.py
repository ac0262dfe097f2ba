"""Name -> factory registries behind ``get_objective`` and ``get_searcher``."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry", "parse_options"]


def parse_options(items: Iterable[str], bad: Callable[[str], Exception]) -> dict[str, Any]:
    """``["k=20", "center=false", "mode=z"]`` -> {"k": 20, "center": False, "mode": "z"}: values
    read as JSON when they parse, else kept as text. Raises ``bad(item)`` for an item that is
    not KEY=VALUE."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise bad(item)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


class Registry(dict[str, Callable[..., T]], Generic[T]):
    """Factories by name; ``get`` accepts a name (with options) or an instance of ``base``.

    Args:
        kind: What is registered, for messages ("objective", "searcher").
        base: Instances of this class are returned as given.
        error: Exception raised for an unknown name or options that do not apply.
        options: How messages call the keyword arguments ("options", "keyword arguments").
    """

    def __init__(self, kind: str, base: type, error: type[Exception], *, options: str = "options") -> None:
        super().__init__()
        self.kind, self.base, self.error, self.options = kind, base, error, options

    def register(self, name: str, factory: Callable[..., T]) -> None:
        self[name] = factory

    def names(self) -> list[str]:
        return sorted(self)

    def get_or_make(self, value: Any, **options: Any) -> T:
        if isinstance(value, self.base):
            if options:
                article = "an" if self.kind[0] in "aeiou" else "a"
                raise self.error(f"{self.options} only apply to {article} {self.kind} given by name")
            return value
        try:
            factory = self[value]
        except (KeyError, TypeError):
            raise self.error(f"unknown {self.kind} {value!r}; known: {', '.join(self.names())}") from None
        try:
            return factory(**options)
        except TypeError as exc:
            raise self.error(f"{self.kind} {value!r}: {exc}") from None
