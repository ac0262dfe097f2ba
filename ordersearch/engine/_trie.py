"""Depth-first walk over a batch's prefix trie.

The batch's distinct orders are sorted, so orders sharing a prefix are adjacent and the walk
is a stack: the path from the root (stem output) to the current node. Moving to the next
order pops the nodes that are not its prefixes and pushes the missing ones, starting from the
deepest cached prefix when that is deeper than the path. Each distinct prefix of the batch is
therefore computed at most once, and a prefix found in the cache not at all. The trie is
never built as linked nodes: keys are tuples, parents are found by slicing, and the only
live activations are the path's (plus the cache's).

Sorted siblings are adjacent in this walk, which is what batching siblings that apply the
same block into one larger forward (on GPUs) needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from ._cache import Handle, Key, PrefixCache

__all__ = ["Bad", "count_distinct_prefixes", "prefixes", "walk"]

#: A prefix whose activation proved bad, and why (what ``finish`` may return to the walk).
Bad = tuple[Key, str] | None


def prefixes(ids: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
    """The non-empty prefixes of ``ids``, shortest first."""
    for d in range(1, len(ids) + 1):
        yield ids[:d]


def count_distinct_prefixes(orders: Iterable[Iterable[int]]) -> int:
    """Distinct non-empty prefixes over ``orders``: the block forwards an unlimited cache runs."""
    seen: set[tuple[int, ...]] = set()
    for o in orders:
        seen.update(prefixes(tuple(o)))
    return len(seen)


def walk(
    keys: list[Key],
    cache: PrefixCache,
    root: Handle,
    compute: Callable[[Key, Handle], Handle],
    finish: Callable[[Key, list[tuple[Key, Handle]] | None, str | None], Bad],
    poison: dict[Key, str],
    path_bytes: Callable[[int], None] | None = None,
) -> int:
    """Visit the sorted, distinct ``keys`` depth-first; returns the number of cache hits.

    Args:
        keys: Sorted distinct keys ``(level, b1, ..., bd)``; ``root`` is the key ``(level,)``.
        cache: Prefix cache, read and filled as the walk goes.
        root: The stem output.
        compute: ``compute(key, parent)`` returns the child's handle (refcount 0).
        finish: Called once per key with the path that ends at it (``(key, handle)`` pairs
            from the root; a cached start skips its ancestors), or None and the reason the
            key is known to fail. It returns a prefix on that path that proved bad (checks
            run on the outputs, not after every block) and why, or None; the walk poisons
            that prefix and drops it and its descendants from the path and the cache, so no
            later key extends it.
        poison: Failure reasons of prefixes known to fail (read and extended).
        path_bytes: Called with the bytes held by the path outside the cache after each push.
    """
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

    hits = 0
    stack: list[tuple[Key, Handle]] = [(keys[0][:1] if keys else (), root.acquire())]
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
            for d in range(len(stack[-1][0]) + 1, len(key) + 1):
                k = key[:d]
                failed = poison.get(k)
                if failed is not None:
                    break
                out = compute(k, stack[-1][1])
                cache.admit(k, out)
                stack.append((k, out.acquire()))
                if path_bytes is not None:
                    # held by the path alone (refcount 1): not admitted, or evicted since
                    path_bytes(sum([h.nbytes for _, h in stack if h.refs == 1]))
            bad = finish(key, None if failed else stack, failed)
            if bad is not None:
                poison[bad[0]] = bad[1]
                while len(stack) > 1 and len(stack[-1][0]) >= len(bad[0]):
                    k, h = stack.pop()
                    cache.discard(k)
                    h.release()
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
    return hits
