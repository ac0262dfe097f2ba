"""Ctrl-C during a search: at once while blocks run, after the write while the study is written.

A ``KeyboardInterrupt`` raised inside a storage commit can leave a SQLite database locked by
the interrupted connection; the cleanup that fails the worker's trials then waits on that
lock forever. :class:`HeldInterrupts` therefore holds SIGINT while the study is being read
or written and raises it at the next :meth:`check` (a storage round trip later), and lets it
through at once inside :meth:`scoring` (the engine's block forwards, the long part).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["HeldInterrupts"]


class HeldInterrupts:
    """Context manager installing the SIGINT handler for a search loop (main thread only,
    and only over Python's default handler: an ignored SIGINT stays ignored, a caller's own
    handler stays in charge)."""

    def __init__(self) -> None:
        self.pending = False
        self._scoring = False
        self._previous: Any = None

    def __enter__(self) -> HeldInterrupts:
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        if exc_type is None:
            self.check()  # a Ctrl-C held during the last writes still stops the caller

    def _handle(self, signum: int, frame: Any) -> None:
        if self._scoring:
            raise KeyboardInterrupt
        self.pending = True

    def check(self) -> None:
        """Raise the SIGINT held since the last check, if any."""
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

    @contextmanager
    def scoring(self) -> Iterator[None]:
        """A stretch without storage writes, interrupted at once."""
        self.check()
        self._scoring = True
        try:
            yield
        finally:
            self._scoring = False
        self.check()
