"""A radix-style cache of prefix activations under a byte budget.

Keys are tuples ``(level, b1, ..., bd)``: the fidelity level (which EvalSet) and the block ids
of an order prefix. An entry's parent is found by slicing its key, never by a reference, so
entries cannot form reference cycles and a dropped entry frees its tensor at once (a
prototype whose nodes pointed at their parents kept gigabytes of dead activations alive until
the cycle collector ran).

Every cached activation is self-contained (it is the prefix's full output, not a delta), so
any entry may be evicted without invalidating others. Policies decide which one goes:

- :class:`GDSF` (default) evicts leaves first (entries without cached children, as radix
  caches of LLM servers do) by the GreedyDual-Size-Frequency priority
  ``clock + hits * cost / size``, where ``cost`` is the number of block forwards needed to
  rebuild the entry from its nearest cached ancestor;
- :class:`LRU` evicts the least recently used unpinned entry, interior or not: the baseline.

Pinned entries (a walk depends on them) are never evicted; retained ones (a searcher's
``retain=`` hints) go only after every other evictable entry.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable

import torch

__all__ = ["BufferPool", "CachePolicy", "GDSF", "Handle", "LRU", "PrefixCache", "make_policy"]

Key = tuple[int, ...]


class BufferPool:
    """Activation buffers, each kept with its chunk views, reused so that a steady-state search
    does not make the allocator grow: in steady state every block forward fills the buffer of
    the entry that its admission evicted.

    Keeping the blocks' own chunk outputs instead (no copy) saves a copy per block forward,
    but the long-lived chunks interleaved with each forward's temporaries fragmented the
    heap: the first search's peak RSS growth went over the memory bound that
    ``benchmarks/engine.py`` checks (about twice the cache's live bytes).

    Args:
        make: ``make(key)`` returns a new buffer and its chunk views for a handle's ``key``
            (whatever determines its shape, dtype, device and chunks).
        max_free: Free buffers kept per key; more are released.

    Attributes:
        bytes: Bytes of every buffer the pool holds, in use or free.
        peak_bytes: The most ``bytes`` has been (activation memory: cache, paths, stem
            outputs and free buffers).
        deferred: While a walk plans, called with each handle whose last reference went
            (its buffer is given back when the plan runs); None: given back at once.
    """

    def __init__(
        self, make: Callable[[object], tuple[torch.Tensor, list[torch.Tensor]]], *, max_free: int = 4
    ) -> None:
        self.make = make
        self.max_free = max_free
        self._free: dict[object, list[tuple[torch.Tensor, list[torch.Tensor]]]] = {}
        self.free_bytes = 0
        self.bytes = 0
        self.peak_bytes = 0
        self.allocated = 0
        self.reused = 0
        self.deferred: Callable[[Handle], object] | None = None

    def fill(self, handle: Handle) -> list[torch.Tensor]:
        """Give ``handle`` a buffer (a free one of its key, else a new one); its chunks."""
        free = self._free.get(handle.key)
        if free:
            self.reused += 1
            handle._buffer, handle.chunks = free.pop()
            self.free_bytes -= handle.nbytes
        else:
            self.allocated += 1
            handle._buffer, handle.chunks = self.make(handle.key)
            self.bytes += handle.nbytes
            if self.bytes > self.peak_bytes:
                self.peak_bytes = self.bytes
        return handle.chunks  # type: ignore[return-value]

    def release(self, handle: Handle) -> None:
        """``handle``'s last reference went: its buffer comes back now, or when the plan runs."""
        if self.deferred is not None:
            self.deferred(handle)
        else:
            self.give(handle)

    def give(self, handle: Handle) -> None:
        """Take ``handle``'s buffer back (nothing if it has none)."""
        buffer = handle._buffer
        if buffer is None:
            return
        free = self._free.setdefault(handle.key, [])
        if len(free) < self.max_free:
            free.append((buffer, handle.chunks))  # type: ignore[arg-type]
            self.free_bytes += handle.nbytes
        else:
            self.bytes -= handle.nbytes
        handle._buffer = handle.chunks = None

    def clear(self) -> None:
        """Drop the free buffers."""
        self._free.clear()
        self.bytes -= self.free_bytes
        self.free_bytes = 0


class Handle:
    """A prefix activation: one view per EvalSet chunk of a pooled buffer, shared by the cache
    and walks' paths and reference counted, so that the buffer returns to the pool exactly
    when neither holds it. A walk makes the handles of the prefixes it will compute while it
    plans (the cache needs only their size) and fills them when the plan runs.

    Attributes:
        chunks: The chunk views (None until filled, and once released).
        nbytes: The buffer's size.
        key: The pool key of its buffer.
        bad: Why its activation is unusable (a prefix found non-finite after it was
            planned on), else None.
    """

    __slots__ = ("chunks", "nbytes", "refs", "key", "bad", "_buffer", "_pool")

    def __init__(self, nbytes: int, pool: BufferPool | None, key: object = None) -> None:
        self.chunks: list[torch.Tensor] | None = None
        self.nbytes = nbytes
        self.refs = 0
        self.key = key
        self.bad: str | None = None
        self._buffer: torch.Tensor | None = None
        self._pool = pool

    @property
    def filled(self) -> bool:
        return self._buffer is not None

    def acquire(self) -> Handle:
        self.refs += 1
        return self

    def release(self) -> None:
        self.refs -= 1
        if self.refs == 0 and self._pool is not None:
            self._pool.release(self)


class _Entry:
    __slots__ = ("key", "handle", "nbytes", "hits", "cost", "priority", "pins", "protected", "version", "queued")

    def __init__(self, key: Key, handle: Handle, nbytes: int) -> None:
        self.key = key
        self.handle = handle
        self.nbytes = nbytes
        self.hits = 1
        self.cost = 1
        self.priority = 0.0
        self.pins = 0
        self.protected = False
        self.version = -1
        self.queued = False


class CachePolicy(ABC):
    """How an entry's eviction priority is set; the lowest priority goes first.

    Attributes:
        leaves_only: Evict only entries without cached children.
    """

    name: str = ""
    leaves_only: bool = False

    @abstractmethod
    def priority(self, entry: _Entry, cache: PrefixCache) -> float:
        """Priority of ``entry`` now (called on admission and on every hit)."""

    def on_evict(self, entry: _Entry) -> None:  # noqa: B027 (optional hook)
        """Called when ``entry`` leaves the cache."""

    def reset(self) -> None:  # noqa: B027 (optional hook)
        """Forget any state (the cache was cleared)."""


class LRU(CachePolicy):
    """Least recently used, over all unpinned entries (interior ones too): the baseline."""

    name = "lru"
    leaves_only = False

    def priority(self, entry: _Entry, cache: PrefixCache) -> float:
        return float(cache.tick)


class GDSF(CachePolicy):
    """GreedyDual-Size-Frequency over leaves: ``clock + hits * cost / size``.

    ``cost`` is the number of block forwards that rebuild the entry from its nearest cached
    ancestor (the stem output counts as cached), measured on admission and on each hit;
    ``clock`` rises to the priority of each evicted entry, so entries that stop being used age
    out however often they were used before. ``size`` is in units of the first entry admitted:
    entries of one EvalSet all have size 1, so priorities are exact integers and the eviction
    order does not depend on how large a bank's activations are (a proxy bank of tiny blocks
    replays a real bank's counts exactly); a subset's smaller entries (multi-fidelity) weigh
    less.
    """

    name = "gdsf"
    leaves_only = True

    def __init__(self) -> None:
        self.clock = 0.0
        self.unit = 0

    def priority(self, entry: _Entry, cache: PrefixCache) -> float:
        entry.cost = cache.recompute_cost(entry.key)
        if not self.unit:
            self.unit = max(entry.nbytes, 1)
        return self.clock + entry.hits * entry.cost / (max(entry.nbytes, 1) / self.unit)

    def on_evict(self, entry: _Entry) -> None:
        self.clock = max(self.clock, entry.priority)

    def reset(self) -> None:
        self.clock = 0.0
        self.unit = 0


_POLICIES: dict[str, type[CachePolicy]] = {"gdsf": GDSF, "lru": LRU}


def make_policy(policy: str | CachePolicy) -> CachePolicy:
    """A policy object from its name (``"gdsf"``, ``"lru"``) or the object itself."""
    if isinstance(policy, CachePolicy):
        return policy
    try:
        return _POLICIES[policy]()
    except KeyError:
        raise ValueError(f"unknown cache policy {policy!r}; known: {', '.join(_POLICIES)}") from None


class PrefixCache:
    """Prefix activations under ``capacity`` bytes (counted from the tensors' own sizes).

    Args:
        capacity: Byte budget of cached tensors; never exceeded.
        policy: Eviction policy.
    """

    def __init__(self, capacity: int, policy: str | CachePolicy = "gdsf") -> None:
        if capacity < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {capacity}")
        self.capacity = int(capacity)
        self.policy = make_policy(policy)
        self._entries: dict[Key, _Entry] = {}
        self._n_children: dict[Key, int] = {}  # cached direct children per key (cached or not)
        self._heap: list[tuple[int, float, int, Key]] = []
        self._seq = 0
        self._protected: set[Key] = set()
        self.tick = 0
        self.bytes = 0
        self.peak_bytes = 0
        self.evictions = 0
        self.rejections = 0

    # --- lookup -------------------------------------------------------------------------
    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> dict[Key, object]:
        """The cached keys (a read-only view in spirit: for fast membership tests)."""
        return self._entries

    def keys(self) -> list[Key]:
        return list(self._entries)

    def tensors(self) -> list[torch.Tensor]:
        """The cached tensors (to measure the budget from outside)."""
        return [e.handle._buffer for e in self._entries.values() if e.handle._buffer is not None]

    def hit(self, key: Key) -> Handle:
        """The handle of a cached ``key``, counting a use."""
        entry = self._entries[key]
        self.tick += 1
        entry.hits += 1
        self._push(entry, self.policy.priority(entry, self))
        return entry.handle

    def recompute_cost(self, key: Key) -> int:
        """Block forwards that rebuild ``key`` from its nearest cached ancestor or the stem."""
        entries = self._entries
        if key[:-1] in entries:  # the common case: the parent is cached
            return 1
        for j in range(len(key) - 2, 1, -1):
            if key[:j] in entries:
                return len(key) - j
        return len(key) - 1

    # --- pins and hints -----------------------------------------------------------------
    def pin(self, key: Key) -> None:
        self._entries[key].pins += 1

    def unpin(self, key: Key) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        entry.pins -= 1
        if entry.pins == 0 and not entry.queued:
            self._push(entry, entry.priority)

    def protect(self, keys: Iterable[Key]) -> None:
        """Replace the retained set: these keys are evicted only after all others."""
        new = set(keys)
        changed = (self._protected ^ new) & self._entries.keys()
        self._protected = new
        for key in changed:
            entry = self._entries[key]
            entry.protected = key in new
            self._push(entry, entry.priority)

    # --- admission and eviction ---------------------------------------------------------
    def admit(self, key: Key, handle: Handle) -> bool:
        """Cache ``handle`` under ``key``, evicting as needed; False if it cannot fit without
        evicting a pinned entry (the budget is a hard limit)."""
        entries = self._entries
        if key in entries:
            return True
        nbytes = handle.nbytes
        if self.bytes + nbytes > self.capacity and (nbytes > self.capacity or not self._make_room(nbytes)):
            self.rejections += 1
            return False
        entry = _Entry(key, handle, nbytes)
        handle.refs += 1
        if key in self._protected:
            entry.protected = True
        self.tick += 1
        entries[key] = entry
        parent = key[:-1]
        n_children = self._n_children
        n_children[parent] = n_children.get(parent, 0) + 1
        self.bytes += nbytes
        if self.bytes > self.peak_bytes:
            self.peak_bytes = self.bytes
        self._push(entry, self.policy.priority(entry, self))
        return True

    def discard(self, key: Key) -> None:
        """Drop ``key`` if cached (its activation proved bad); a walk holding it keeps its
        own reference."""
        entry = self._entries.get(key)
        if entry is not None:
            self._remove(entry)

    def _evictable(self, entry: _Entry) -> bool:
        if entry.pins:
            return False
        return not (self.policy.leaves_only and self._n_children.get(entry.key, 0))

    def _push(self, entry: _Entry, priority: float) -> None:
        entry.priority = priority
        self._seq += 1
        entry.version = self._seq
        entry.queued = True
        heapq.heappush(self._heap, (int(entry.protected), priority, self._seq, entry.key))
        if len(self._heap) > 4 * len(self._entries) + 64:
            self._compact()

    def _compact(self) -> None:
        self._heap = [
            (int(e.protected), e.priority, e.version, e.key) for e in self._entries.values() if e.queued
        ]
        heapq.heapify(self._heap)

    def _make_room(self, nbytes: int) -> bool:
        """Evict until ``nbytes`` more fit; False if only pinned entries (or, for leaves-only
        policies, entries with cached children) are left."""
        heap, entries, pop = self._heap, self._entries, heapq.heappop
        parents = self._n_children if self.policy.leaves_only else ()
        on_evict = self.policy.on_evict
        while self.bytes + nbytes > self.capacity:
            while True:
                if not heap:
                    return False
                _, _, seq, key = pop(heap)
                entry = entries.get(key)
                if entry is None or entry.version != seq:
                    continue  # stale heap item
                if entry.pins or key in parents:  # (keys with cached children; leaves-only policies)
                    entry.queued = False  # re-queued when it is unpinned or loses its children
                    continue
                break
            self._remove(entry)
            on_evict(entry)
            self.evictions += 1
        return True

    def _remove(self, entry: _Entry) -> None:
        key = entry.key
        del self._entries[key]
        self.bytes -= entry.nbytes
        entry.handle.release()
        parent = key[:-1]
        left = self._n_children[parent] - 1
        if left:
            self._n_children[parent] = left
        else:
            del self._n_children[parent]
            p = self._entries.get(parent)
            if p is not None and not p.queued and self._evictable(p):
                self._push(p, p.priority)

    def clear(self) -> None:
        """Drop every entry (pinned ones too: only call between walks)."""
        for entry in list(self._entries.values()):
            entry.handle.release()
        self._entries.clear()
        self._n_children.clear()
        self._heap.clear()
        self.bytes = 0
        self.policy.reset()
