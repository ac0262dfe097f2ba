"""Depth-first walk over a batch's prefix trie: planned first, then run.

The batch's distinct orders are sorted, so orders sharing a prefix are adjacent and the walk
is a stack: the path from the root (stem output) to the current node. Moving to the next
order pops the nodes that are not its prefixes and pushes the missing ones, starting from the
deepest cached prefix when that is deeper than the path. Each distinct prefix of the batch is
therefore computed at most once, and a prefix found in the cache not at all. The trie is
never built as linked nodes: keys are tuples, parents are found by slicing, and the only
live activations are the path's (plus the cache's).

Which prefixes a batch computes, and what the cache admits and evicts, do not depend on the
activations' values, so the walk is done twice: first over the cache's bookkeeping alone
(:func:`_plan`), which lists the block forwards, the buffers to give back and the candidates
to finish in the order the walk meets them; then the list is run (:func:`_run`). The
bookkeeping thus runs in one tight loop instead of between block forwards, whose memory
traffic would evict the interpreter's code and data from the CPU caches each time (measured:
several times slower there). A buffer evicted to make room for a prefix is given back
before that prefix is computed, so the pool can hand it over at once, and live memory stays
within the cache's budget plus one path.

The exception is a candidate whose outputs prove non-finite: the prefix that made them so is
known only when the plan runs. The run then marks that prefix and its descendants on the path
bad, skips the planned block forwards that would extend them (their candidates fail with
the same reason), and drops them from the cache when the batch is done.

Sorted siblings are adjacent in this walk, and a plan lists every block forward of a batch
before any runs, which is what batching forwards that apply the same block into one larger
forward (on GPUs) needs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

from ._cache import BufferPool, Handle, Key, PrefixCache

__all__ = ["Bad", "add_prefixes", "count_distinct_prefixes", "walk"]

#: A prefix whose activation proved bad, and why (what ``finish`` may return to the walk).
Bad = tuple[Key, str] | None

#: ``compute(key, parent, out)`` fills ``out`` (the activation of ``key``) from ``parent``'s.
Compute = Callable[[Key, Handle, Handle], None]
#: ``finish(key, path, failed)``, see :func:`walk`.
Finish = Callable[[Key, list[tuple[Key, Handle]] | None, str | None], Bad]

_COMPUTE, _FREE, _FINISH = 0, 1, 2


def add_prefixes(seen: set[tuple[int, ...]], key: tuple[int, ...], shortest: int = 1) -> int:
    """Add to ``seen`` the prefixes of ``key`` of length ``shortest`` and more that it lacks;
    returns how many. ``seen`` must hold every such prefix of each key it holds (as this keeps
    it): the prefixes are then added longest first, stopping at the first already there."""
    added = 0
    for d in range(len(key), shortest - 1, -1):
        p = key[:d]
        if p in seen:
            break
        seen.add(p)
        added += 1
    return added


def count_distinct_prefixes(orders: Iterable[Iterable[int]]) -> int:
    """Distinct non-empty prefixes over ``orders``: the block forwards an unlimited cache runs."""
    seen: set[tuple[int, ...]] = set()
    return sum(add_prefixes(seen, tuple(o)) for o in orders)


def walk(
    keys: list[Key],
    cache: PrefixCache,
    pool: BufferPool,
    root: Handle,
    compute: Compute,
    finish: Finish,
    poison: dict[Key, str],
) -> tuple[int, float]:
    """Visit the sorted, distinct ``keys`` depth-first; returns the number of cache hits and
    the seconds spent planning (the walk's own bookkeeping, without the block forwards).

    Args:
        keys: Sorted distinct keys ``(level, b1, ..., bd)``; ``root`` is the key ``(level,)``.
        cache: Prefix cache, read and filled as the walk goes.
        pool: Where the handles' buffers come from and go back to.
        root: The stem output.
        compute: Fills a planned handle; see :data:`Compute`.
        finish: Called once per key with the path that ends at it (``(key, handle)`` pairs
            from the root; a cached start skips its ancestors), or None and the reason the
            key is known to fail. It returns a prefix on that path that proved bad (checks
            run on the outputs, not after every block) and why, or None; the walk poisons
            that prefix, so that no later key extends it, and drops it and its descendants
            from the cache.
        poison: Failure reasons of prefixes known to fail (read and extended).
    """
    ops: list[tuple] = []
    t0 = time.perf_counter()
    try:
        hits = _plan(keys, cache, pool, root, poison, ops)
    except BaseException:  # e.g. interrupted: nothing ran, the plan's buffers go back
        _abandon(iter(ops), cache, pool, poison, False)
        raise
    planned = time.perf_counter() - t0
    _run(ops, cache, pool, compute, finish, poison)
    return hits, planned


def _plan(
    keys: list[Key], cache: PrefixCache, pool: BufferPool, root: Handle, poison: dict[Key, str], ops: list[tuple]
) -> int:
    """The walk over the cache's bookkeeping: appends the operations to run to ``ops``;
    returns the cache hits."""
    # A cached node that a later order of this walk starts from is pinned until that order
    # is done, so the walk never pays for a prefix that was cached when it began. It is also
    # the only cached prefix the walk needs to look for: a prefix cached by the walk itself
    # is still on the path when a later key extends it (sorted keys sharing it are adjacent).
    cached = cache.entries
    pinned: dict[Key, int] = {}
    start_of: list[Key | None] = []
    for key in keys:
        start = None
        for d in range(len(key), 1, -1):
            if key[:d] in cached:
                start = key[:d]
                break
        start_of.append(start)
        if start is not None:
            if start not in pinned:
                cache.pin(start)
            pinned[start] = pinned.get(start, 0) + 1

    add = ops.append
    hits = 0
    stack: list[tuple[Key, Handle]] = [(keys[0][:1] if keys else (), root.acquire())]
    # handles released since the last planned forward: their buffers go back before it runs
    frees: list[Handle] = []
    pool.deferred = frees.append
    try:
        for key, start in zip(keys, start_of):
            while len(stack) > 1:
                top = stack[-1][0]
                if key[: len(top)] == top:
                    break
                stack.pop()[1].release()
            if start is not None and len(start) > len(stack[-1][0]):
                stack.append((start, cache.hit(start).acquire()))
                hits += 1
            failed = None
            parent = stack[-1][1]
            for d in range(len(stack[-1][0]) + 1, len(key) + 1):
                k = key[:d]
                failed = poison.get(k)
                if failed is not None:
                    break
                out = Handle(parent.nbytes, pool, parent.key)
                cache.admit(k, out)  # evictions first: their buffers can go to this forward
                add((_COMPUTE, k, parent, out, tuple(frees) if frees else None))
                frees.clear()
                stack.append((k, out.acquire()))
                parent = out
            add((_FINISH, key, None if failed else stack.copy(), failed))
            if start is not None:
                pinned[start] -= 1
                if pinned[start] == 0:
                    del pinned[start]
                    cache.unpin(start)
    finally:
        for _, h in stack:
            h.release()
        for k in pinned:
            cache.unpin(k)
        pool.deferred = None
        if frees:
            add((_FREE, tuple(frees)))
    return hits


def _run(
    ops: list[tuple], cache: PrefixCache, pool: BufferPool, compute: Compute, finish: Finish, poison: dict[Key, str]
) -> None:
    """Run a plan. If a block forward or ``finish`` raises, the rest of the plan is
    abandoned (:func:`_abandon`)."""
    poisoned = False
    give = pool.give
    it = iter(ops)
    op: tuple = ()
    try:
        for op in it:
            code = op[0]
            if code == _COMPUTE:
                _, key, parent, out, frees = op
                if frees is not None:
                    for h in frees:
                        give(h)
                if parent.bad is None:
                    compute(key, parent, out)
                else:  # extends a prefix that proved bad during this run
                    out.bad = parent.bad
            elif code == _FREE:
                for h in op[1]:
                    give(h)
            else:
                _, key, path, failed = op
                if path is None:
                    finish(key, None, failed)
                    continue
                end = path[-1][1]
                if end.bad is not None:
                    finish(key, None, end.bad)
                    continue
                bad = finish(key, path, None)
                if bad is not None:
                    poison[bad[0]] = bad[1]
                    poisoned = True
                    depth = len(bad[0])
                    for k, h in path:
                        if len(k) >= depth:
                            h.bad = bad[1]
    except BaseException:
        if op and op[0] == _COMPUTE:
            op[3].bad = "its block forward raised"  # filled, but maybe only in part
        _abandon(it, cache, pool, poison, poisoned)
        raise
    if poisoned:  # else every planned prefix was computed and is good
        _drop(cache, poison, poisoned)


def _abandon(rest: Iterator[tuple], cache: PrefixCache, pool: BufferPool, poison: dict[Key, str], poisoned: bool) -> None:
    """The plan stops before ``rest``: give back the buffers it would have, and drop the
    prefixes it admitted but did not compute."""
    for op in rest:
        frees = op[4] if op[0] == _COMPUTE else op[1] if op[0] == _FREE else None
        for h in frees or ():
            pool.give(h)
    _drop(cache, poison, poisoned)


def _drop(cache: PrefixCache, poison: dict[Key, str], poisoned: bool) -> None:
    """Drop cached prefixes that were never computed (a run that raised) or that extend a
    poisoned prefix."""
    for key, entry in list(cache.entries.items()):
        handle = entry.handle  # type: ignore[attr-defined]
        if handle.bad is not None or not handle.filled or (
            poisoned and any(key[:d] in poison for d in range(2, len(key) + 1))
        ):
            cache.discard(key)
