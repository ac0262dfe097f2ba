"""The evaluation engine: scores batches of candidate orders, paying once per distinct prefix.

Candidate orders share prefixes, so a search should pay for each distinct prefix once, not
for candidates x depth block forwards. The engine walks each batch's prefix trie depth-first
(:mod:`._trie`), keeps prefix activations across batches in a byte-budgeted radix cache
(:mod:`._cache`), and scores each candidate's pooled features or head logits with an
:class:`~ordersearch.engine.Objective`. It is the one place where frozen blocks run during
search: under ``torch.inference_mode()`` and, for bf16, autocast.

The method searched is the per-task computation order of Zhmoginov, Bashkirova and Sandler,
"Compositional Models: Multi-Task Learning and Knowledge Transfer with Modular Networks"
(arXiv 2107.10963); ``norm="target"`` re-estimates BatchNorm statistics on the target data
(AdaBN) per order prefix.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import mmap
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch

from .._images import empty
from ..bank import Bank
from ..errors import BankError, DataError
from ..evalset import EvalSet
from ..order import Order
from ._cache import BufferPool, CachePolicy, Handle, Key, PrefixCache
from ._malloc import tune_malloc
from ._norm import BNStats, batchnorm_modules, run_with_target_stats
from ._trie import Bad, add_prefixes, walk
from ._types import EngineStats, Score
from .objectives import Objective, get_objective

__all__ = ["Engine"]

log = logging.getLogger("ordersearch")

_MEMO_SIZE = 1 << 16
_STATS_SIZE = 1 << 17
_SCORE_BATCH = 64  # candidates scored in one objective call, at most
_SCORE_BYTES = 32 * 2**20  # and their outputs' bytes
#: A sharded level's outputs of one batch of candidates (made shard by shard, complete only
#: after the last) beyond this many bytes go to a temporary file, not to memory.
_OUTPUT_BYTES = 128 * 2**20
#: Bytes of a memory page (a new CPU buffer is faulted in one byte per page).
_PAGE = mmap.PAGESIZE


def _slices(n: int, batch_size: int) -> list[slice]:
    return [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


class _Level:
    """One EvalSet the engine scores on: the full set or a nested subset (a fidelity). A
    level too large for the cache budget is cut into **shards**, consecutive image ranges
    each walked as a level of its own (``evalset`` None, ``state`` None): their outputs are
    concatenated and scored on the parent level."""

    def __init__(self, index: int, evalset: EvalSet | None, state: Any, batch_size: int,
                 x: torch.Tensor | None = None) -> None:
        self.index = index
        self.evalset = evalset
        self.x = evalset.x if evalset is not None else x
        assert self.x is not None
        self.n = len(self.x)
        self.state = state
        self.slices = _slices(self.n, batch_size)
        self.root: Handle | None = None
        self.seen: set[tuple[int, ...]] = set()
        self.memo: OrderedDict[tuple[int, ...], Score] = OrderedDict()
        self.poison: dict[Key, str] = {}
        self.bn_stats: OrderedDict[Key | tuple[str, Key], BNStats] = OrderedDict()
        self.shards: list[_Level] | None = None
        self.share = 1.0  # of its parent's images: a block forward here is this much of one there

    @property
    def walked(self) -> list[_Level]:
        """The levels the walks run on: the shards, or this level itself."""
        return self.shards or [self]


class Engine:
    """Scores candidate orders of a bank on an EvalSet, caching prefix activations.

    Args:
        bank: The frozen bank (moved to ``device``).
        evalset: Images (and labels, for labelled objectives) to score on.
        objective: An :class:`Objective` or its name (``probe``, ``head``, ``infomax``,
            ``entropy``).
        cache_bytes: Byte budget of cached prefix activations (a hard limit). 0 keeps only
            the walk's path: each batch still pays once per distinct prefix.
        device: Where blocks run (default: CUDA when available, else CPU). Cached
            activations live there too.
        batch_size: Images per block forward (default 64 on CPU, 512 on CUDA); results do
            not depend on it except through float rounding.
        dtype: Compute and storage precision: float32 (CPU default) or bfloat16 (CUDA
            default; on CPU a faster screening option that reorders candidates, so re-score
            finalists in float32).
        norm: ``"source"`` uses the bank's BatchNorm statistics; ``"target"`` re-estimates
            them on the whole EvalSet at every position of every order (AdaBN), cached per
            prefix.
        policy: Cache eviction policy: ``"gdsf"`` (cost-aware, leaves first) or ``"lru"``.
        memo: Remember each order's score, so a repeated candidate costs nothing.
        check_finite: Fail candidates whose outputs are not finite, naming the first block
            of the path whose activation was not (checked on the outputs, so a block
            forward pays nothing for it, and along the path only when they fail).
        shard_images: Walk the EvalSet in shards of at most this many images, each with
            prefixes cached on its own, and score the concatenated outputs: memory is then
            set by ``cache_bytes`` and one shard's path, not by the number of images (the
            images themselves may be memory-mapped: :meth:`EvalSet.from_npy`). None: shards
            when one prefix activation over all images would take more than a quarter of
            ``cache_bytes`` and the budget holds 16 over ``batch_size`` images (shards then
            take ``cache_bytes / 16`` each); 0: never. Needs
            ``norm="source"`` (target statistics are taken over all images at once). Scores
            do not depend on it except through float rounding.

    Example:
        >>> import ordersearch, torch
        >>> from ordersearch.evalset import EvalSet
        >>> bank = ordersearch.load_bank("isoresnet:width=8,blocks=4,classes=10")
        >>> data = EvalSet(torch.randn(40, 1, 16, 16), torch.arange(40) % 4)
        >>> engine = Engine(bank, data, "probe", cache_bytes=2**24)
        >>> scores = engine.evaluate(["0-1-2-3", "0-1-3", "0-1-3-3"])
        >>> [s.ok for s in scores], engine.stats.block_evals, engine.stats.naive_block_evals
        ([True, True, True], 6, 11)
    """

    def __init__(
        self,
        bank: Bank,
        evalset: EvalSet,
        objective: str | Objective = "probe",
        *,
        cache_bytes: int = 512 * 2**20,
        device: str | torch.device | None = None,
        batch_size: int | None = None,
        dtype: torch.dtype | None = None,
        norm: Literal["source", "target"] = "source",
        policy: str | CachePolicy = "gdsf",
        memo: bool = True,
        check_finite: bool = True,
        shard_images: int | None = None,
    ) -> None:
        self.objective = get_objective(objective)
        if self.objective.needs_labels and not evalset.has_labels:
            raise DataError(f"objective {self.objective.name!r} needs labels; this EvalSet has none")
        if self.objective.needs_labels and int(evalset.y.unique().numel()) < 2:
            raise DataError(f"objective {self.objective.name!r} needs images of at least 2 classes; "
                            f"{evalset.name or 'this EvalSet'} has one (any order would score 1.0)")
        if self.objective.output == "logits" and bank.head is None:
            raise BankError(f"objective {self.objective.name!r} needs the bank's head; this bank has none")
        if norm not in ("source", "target"):
            raise ValueError(f"norm must be 'source' or 'target', got {norm!r}")
        self.device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype if dtype is not None else (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype}")
        self.batch_size = int(batch_size or (512 if self.device.type == "cuda" else 64))
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.norm = norm
        if shard_images is not None and shard_images < 0:
            raise ValueError(f"shard_images must be >= 0 or None, got {shard_images}")
        if shard_images and norm == "target":
            raise ValueError("shard_images needs norm='source': target statistics are taken over all images at once")
        self.shard_images = shard_images
        self.bank = bank.to(self.device).freeze()
        self.evalset = evalset
        self.memo = memo
        self.check_finite = check_finite
        self.pool = BufferPool(self._make_buffer)
        if self.device.type == "cpu":
            tune_malloc(keep_bytes=2 * cache_bytes)
        self.cache = PrefixCache(cache_bytes, policy)
        self.stats = EngineStats()
        self._levels: dict[int, _Level] = {}
        self._tail = self.bank.features if self.objective.output == "features" else self.bank.head
        self._bns: dict[Any, list] = {}
        if norm == "target":
            self._bns = {i: batchnorm_modules(b) for i, b in enumerate(self.bank.blocks)}
            self._bns["stem"] = batchnorm_modules(self.bank.stem)
            self._bns["tail"] = batchnorm_modules(self._tail)
        # a plain list: indexing an nn.ModuleList costs microseconds per block forward
        self._blocks = None if self.bank.has_positional_blocks else list(self.bank.blocks)
        # blocks that write their output into the cache's buffer (fp32 with the bank's statistics)
        self._direct = norm == "source" and self.dtype == torch.float32
        # on CUDA, block forwards, tails and objectives are timed with events (host timers would
        # see launches only): (stats field, start, end)
        self._events: list[tuple[str, Any, Any]] | None = [] if self.device.type == "cuda" else None
        # on the CPU a candidate's outputs are checked for finiteness as they are made (it costs
        # nothing, and a failing prefix is poisoned at once); on an accelerator that would wait
        # for every candidate's blocks, so each scoring group is checked with one wait instead
        self._sync_checks = self.device.type == "cpu"
        self._retain: list[tuple[int, ...]] = []
        self._protect_dirty = False
        self._calibrated = False
        self._next_index = 0
        self._block_units = 0.0  # block forwards over whole levels (a shard's count as its share)

    # --- public API ---------------------------------------------------------------------
    @property
    def n_images(self) -> int:
        """Images in the full EvalSet."""
        return len(self.evalset)

    def evaluate(
        self,
        orders: Iterable[Order | str | Sequence[int]],
        *,
        retain: Iterable[Order | str | Sequence[int]] | None = None,
        n_images: int | None = None,
    ) -> list[Score]:
        """Score ``orders``; the result lists one :class:`Score` per input, in input order.

        Args:
            orders: Candidate orders (repeats are scored once).
            retain: Prefixes the caller will extend later (a searcher's population or
                incumbent). They and their prefixes are evicted only after everything
                else. Replaces the previous hints; None keeps them.
            n_images: Score on the first ``n_images`` of a seeded permutation of the
                EvalSet (nested for growing sizes: :meth:`EvalSet.subset`) instead of all
                of it: a low-fidelity score for screening or pruning.
        """
        t0 = time.perf_counter()
        if not self._calibrated:
            self._calibrated = True
            self.objective.calibrate(self)
        level = self._level(n_images)
        parsed = [Order.parse(o).validate(self.bank.n_blocks, min_len=0) for o in orders]
        if retain is not None:
            self.retain(retain)
        if self._protect_dirty:
            indices = [w.index for lv in self._levels.values() for w in lv.walked]
            self.cache.protect(_retained_keys(indices, self._retain))
            self._protect_dirty = False
        st = self.stats
        st.candidates += len(parsed)
        todo: set[tuple[int, ...]] = set()
        for o in parsed:
            ids = o.ids
            st.naive_block_evals += len(ids)
            self._see(level, ids)
            if self.memo and ids in level.memo:
                level.memo.move_to_end(ids)
                st.memo_hits += 1
            else:
                todo.add(ids)
        results: dict[tuple[int, ...], Score] = {}
        if todo:
            with torch.inference_mode(), self._autocast():
                by_ids = {o.ids: o for o in parsed}
                # scored together once their block forwards are done: the objective batches its
                # small operations, and the block forwards run back to back
                pending: list[tuple[Order, torch.Tensor]] = []
                pending_bytes = 0

                unfinite: list[tuple[int, ...]] = []  # diagnosed after the walk: which block?

                def score_pending() -> None:
                    nonlocal pending_bytes
                    finite = pending
                    if self.check_finite and not self._sync_checks:
                        finite, bad = self._split_finite(pending)
                        unfinite.extend(bad)
                    results.update((s.order.ids, s) for s in self._score_many(level, finite))
                    pending.clear()
                    pending_bytes = 0

                def ready(ids: tuple[int, ...], outputs: torch.Tensor) -> None:
                    nonlocal pending_bytes
                    pending.append((by_ids[ids], outputs))
                    pending_bytes += outputs.nbytes
                    if len(pending) >= _SCORE_BATCH or pending_bytes >= _SCORE_BYTES:
                        score_pending()

                def failed(ids: tuple[int, ...], reason: str) -> None:
                    results[ids] = self._failed(by_ids[ids], level, reason)

                self._walk(level, sorted(todo), ready, failed)
                if pending:
                    score_pending()
                for ids in unfinite:
                    results[ids] = self._failed(by_ids[ids], level, self._diagnose(level, ids))
            if self.memo:
                level.memo.update(results)
                while len(level.memo) > _MEMO_SIZE:
                    level.memo.popitem(last=False)
        self._sum_events()
        out = [results.get(o.ids) or level.memo[o.ids] for o in parsed]
        st.failed += sum(not s.ok for s in out)
        self._update_memory_stats()
        st.total_seconds += time.perf_counter() - t0
        return out

    def evaluate_staged(
        self,
        orders: Iterable[Order | str | Sequence[int]],
        *,
        rungs: Sequence[int],
        keep: float = 0.25,
        retain: Iterable[Order | str | Sequence[int]] | None = None,
    ) -> list[Score]:
        """Successive halving: score all orders on ``rungs[0]`` images, keep the best
        ``keep`` share for the next rung, ..., and score the survivors on the whole EvalSet.

        Pruned candidates keep their last low-fidelity :class:`Score` (``n_images`` below the
        EvalSet size); every score lists its lower-fidelity values in ``intermediate``.
        """
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {keep}")
        sizes = sorted({int(n) for n in rungs if int(n) < self.n_images})
        parsed = [Order.parse(o).validate(self.bank.n_blocks, min_len=0) for o in orders]
        alive = list(dict.fromkeys(o.ids for o in parsed))
        final: dict[tuple[int, ...], Score] = {}
        history: dict[tuple[int, ...], dict[int, float]] = {ids: {} for ids in alive}
        for n in [*sizes, None]:
            scores = self.evaluate([Order(ids) for ids in alive], n_images=n, retain=retain if n is None else None)
            for ids, s in zip(alive, scores):
                final[ids] = Score(s.order, s.value, s.metrics, s.failed, s.n_images, dict(history[ids]))
                history[ids][s.n_images] = s.value
            if n is None:
                break
            ranked = sorted(alive, key=lambda i: -final[i].value if final[i].ok else math.inf)
            alive = ranked[: max(1, math.ceil(keep * len(ranked)))]
        return [final[o.ids] for o in parsed]

    def outputs(self, order: Order | str | Sequence[int], *, n_images: int | None = None) -> torch.Tensor:
        """The (N, D) pooled features or (N, C) head logits (what the objective reads) of one
        order, float32 on the CPU, computed through the cache like any candidate."""
        level = self._level(n_images)
        ids = Order.parse(order).validate(self.bank.n_blocks, min_len=0).ids
        self._see(level, ids)
        found: list[torch.Tensor] = []
        failure: list[str] = []
        with torch.inference_mode(), self._autocast():
            self._walk(level, [ids], lambda _, out: found.append(out), lambda _, why: failure.append(why))
            if found and not self._sync_checks and self.check_finite and not bool(torch.isfinite(found[0]).all()):
                failure.append(self._diagnose(level, ids))
        self._sum_events()
        self._update_memory_stats()
        if failure:
            raise ValueError(f"order {Order(ids)}: {failure[0]}")
        return found[0].cpu()

    def retain(self, prefixes_: Iterable[Order | str | Sequence[int]]) -> None:
        """Set the retain hints without evaluating (see :meth:`evaluate`)."""
        self._retain = [Order.parse(o).validate(self.bank.n_blocks, min_len=0).ids for o in prefixes_]
        self._protect_dirty = True  # applied by the next evaluate

    def reset_stats(self) -> None:
        """Zero the counters and timers (the cache and the seen prefixes are kept, so
        ``min_block_evals`` counts only prefixes new since the reset)."""
        self.stats = EngineStats()
        self._block_units = 0.0
        for level in self._levels.values():
            level.seen.clear()
        self.cache.peak_bytes = self.cache.bytes
        self.cache.evictions = 0
        self.pool.peak_bytes = self.pool.bytes

    def clear(self) -> None:
        """Free cached activations, stem outputs, memos and statistics."""
        self.cache.clear()
        for level in self._levels.values():
            for w in level.walked:
                if w.root is not None:
                    w.root.release()
        self._levels.clear()
        self.pool.clear()

    def cache_tensors(self) -> list[torch.Tensor]:
        """The tensors held by the cache now (their ``nbytes`` sum to at most the budget)."""
        return self.cache.tensors()

    # --- internals ----------------------------------------------------------------------
    def _walk(self, level: _Level, ids: list[tuple[int, ...]], ready: Callable[[tuple[int, ...], torch.Tensor], None],
              failed: Callable[[tuple[int, ...], str], None], diagnose: bool = False) -> None:
        """Walk the sorted, distinct ``ids`` over ``level``: ``ready(ids, outputs)`` with each
        candidate's outputs over all the level's images, or ``failed(ids, reason)``. A sharded
        level is walked shard by shard (each shard's stem output given back after its walk),
        and a candidate's outputs are filled in shard by shard (on the CPU into a temporary file
        when the batch's take over :data:`_OUTPUT_BYTES`: the objective reads them from there,
        so memory does not grow with the images; ``probe`` in chunks). ``diagnose``: from the
        stem and past the cache (a cached prefix would hide where an order went wrong), with
        the checks that name a failing block, on any device."""
        if level.shards is None:
            self._walk_one(level, ids, ready, failed, diagnose)
            return
        outputs: dict[tuple[int, ...], torch.Tensor] = {}
        reasons: dict[tuple[int, ...], str] = {}
        at = 0

        def put(i: tuple[int, ...], out: torch.Tensor) -> None:
            if i not in outputs:  # the batch's outputs over all images: on disk when large
                shape = (level.n, *out.shape[1:])
                outputs[i] = (empty(shape, out.dtype, _OUTPUT_BYTES // len(ids)) if out.device.type == "cpu"
                              else out.new_empty(shape))
            outputs[i][at : at + len(out)] = out

        for shard in level.shards:
            alive = [i for i in ids if i not in reasons]
            if not alive:
                break
            self._walk_one(shard, alive, put, reasons.setdefault, diagnose)
            at += shard.n
            if shard.root is not None:
                shard.root.release()
                shard.root = None
        for i in ids:
            if i in reasons:
                outputs.pop(i, None)
                failed(i, reasons[i])
            else:
                ready(i, outputs.pop(i))

    def _walk_one(self, level: _Level, ids: list[tuple[int, ...]],
                  ready: Callable[[tuple[int, ...], torch.Tensor], None],
                  failed: Callable[[tuple[int, ...], str], None], diagnose: bool = False) -> None:
        check = diagnose or self._sync_checks

        def finish(key: Key, path: list[tuple[Key, Handle]] | None, why: str | None) -> Bad:
            if path is None:
                failed(key[1:], why or "failed")
                return None
            if not check:  # checked when scored
                ready(key[1:], self._outputs(level, key, path[-1][1]))
                return None
            outputs, reason, bad = self._checked_outputs(level, key, path)
            if reason is not None:
                failed(key[1:], reason)
            else:
                ready(key[1:], outputs)
            return bad

        root = self._root(level)
        keys = [(level.index, *i) for i in ids]
        cache = PrefixCache(0, self.cache.policy) if diagnose else self.cache
        hits, planned = walk(keys, cache, self.pool, root, functools.partial(self._compute, level), finish, level.poison)
        self.stats.cache_hits += hits
        self.stats.plan_seconds += planned

    def _diagnose(self, level: _Level, ids: tuple[int, ...]) -> str:
        """Why an order's outputs are not finite, found by walking it again with the checks
        that name the first failing block (and poison it for later batches)."""
        reasons: list[str] = []
        with torch.inference_mode(), self._autocast():
            self._walk(level, [ids], lambda *_: None, lambda _, why: reasons.append(why), diagnose=True)
        return reasons[0] if reasons else f"non-finite {self.objective.output}"

    @staticmethod
    def _split_finite(
        pending: list[tuple[Order, torch.Tensor]],
    ) -> tuple[list[tuple[Order, torch.Tensor]], list[tuple[int, ...]]]:
        """The candidates of ``pending`` whose outputs are finite, and the ids of the others,
        found with one wait for the device (on an accelerator, outputs are not checked as they
        are made)."""
        sums = torch.stack([o.sum() for _, o in pending]).isfinite().tolist()
        finite, bad = [], []
        for ok, (order, out) in zip(sums, pending):
            # a sum of finite outputs overflows only near 1e38: confirm with the exact test
            if ok or bool(torch.isfinite(out).all()):
                finite.append((order, out))
            else:
                bad.append(order.ids)
        return finite, bad

    def _shard_size(self, n: int) -> int:
        """Images per shard of a level of ``n`` images (``n``: not sharded)."""
        per_image = math.prod(self.bank.data_config.get("block_shape") or (0,)) * self.dtype.itemsize
        if self.norm == "target":
            _check_whole(n, per_image)
            return n
        if self.shard_images == 0:
            return n
        if self.shard_images:
            return min(n, self.shard_images)
        capacity = self.cache.capacity
        # shard when one activation over all images takes over a quarter of the budget, and the
        # budget holds 16 activations over a batch of images at least (a smaller budget is
        # a choice to cache little, as the tests make it)
        if per_image <= 0 or 4 * n * per_image <= capacity or capacity < 16 * self.batch_size * per_image:
            return n
        return min(n, capacity // (16 * per_image) // self.batch_size * self.batch_size)

    def _new_index(self) -> int:
        self._next_index += 1
        return self._next_index - 1

    def _autocast(self) -> Any:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def _level(self, n_images: int | None) -> _Level:
        n = self.n_images if n_images is None else int(n_images)
        level = self._levels.get(n)
        if level is None:
            es = self.evalset if n == self.n_images else self.evalset.subset(n)
            level = _Level(self._new_index(), es, self.objective.prepare(es), self.batch_size)
            size = self._shard_size(level.n)
            if size < level.n:
                level.shards = []
                for a in range(0, level.n, size):
                    shard = _Level(self._new_index(), None, None, self.batch_size, x=level.x[a : a + size])
                    shard.share = shard.n / level.n
                    level.shards.append(shard)
                log.info("engine: %d images walked in %d shards of %d", level.n, len(level.shards), size)
            self._levels[n] = level
            self._protect_dirty = bool(self._retain)
        return level

    def _see(self, level: _Level, ids: tuple[int, ...]) -> None:
        """Count the prefixes of ``ids`` not seen before."""
        self.stats.min_block_evals += add_prefixes(level.seen, ids)

    def _update_memory_stats(self) -> None:
        st = self.stats
        st.evictions = self.cache.evictions
        st.cache_bytes = self.cache.bytes
        st.cache_bytes_peak = self.cache.peak_bytes
        st.live_bytes_peak = max(st.live_bytes_peak, self.pool.peak_bytes)

    def _forward(
        self,
        fn: torch.nn.Module,
        inputs: list[torch.Tensor],
        level: _Level,
        bns_key: Any,
        stats_key: Any,
        write: Callable[[int, torch.Tensor], Any],
    ) -> None:
        """``fn`` over every chunk (with target statistics when ``norm="target"``); each
        output goes to ``write(chunk index, output)`` at once, so one chunk's temporaries
        are alive at a time."""
        if self.norm != "target":
            for i, c in enumerate(inputs):
                write(i, fn(c))
            return
        known = level.bn_stats.get(stats_key)
        stats, passes = run_with_target_stats(fn, inputs, self._bns[bns_key], write, known)
        self.stats.stat_passes += passes - 1
        if known is None:
            level.bn_stats[stats_key] = stats
            if len(level.bn_stats) > _STATS_SIZE:
                level.bn_stats.popitem(last=False)
        else:
            level.bn_stats.move_to_end(stats_key)

    def _make_buffer(self, key: object) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A new buffer for the pool key ``(images, activation shape)``, and its views of the
        level's chunks (a level's size fixes its chunks)."""
        t0 = time.perf_counter()
        n, shape = key  # type: ignore[misc]
        buffer = torch.empty((n, *shape), dtype=self.dtype, device=self.device)
        if buffer.device.type == "cpu":
            # fault its pages in here (one byte each), not inside the block forward that
            # first writes it, so that the block time is the block's (stats.memory_seconds)
            buffer.view(-1).view(torch.uint8)[::_PAGE].zero_()
        self.stats.memory_seconds += time.perf_counter() - t0
        return buffer, [buffer[s] for s in _slices(n, self.batch_size)]

    def _root(self, level: _Level) -> Handle:
        """The stem output of ``level``'s images, computed once."""
        if level.root is not None:
            return level.root
        t0, memory0 = time.perf_counter(), self.stats.memory_seconds
        x = level.x
        if self.device.type == "cuda":
            x = x.pin_memory()
        inputs = [x[s].to(self.device, non_blocking=True) for s in level.slices]
        handle: list[Handle] = []

        def write(i: int, y: torch.Tensor) -> None:
            if not handle:
                shape = tuple(y.shape[1:])
                handle.append(Handle(level.n * math.prod(shape) * self.dtype.itemsize, self.pool, (level.n, shape)))
                self.pool.fill(handle[0])
            handle[0].chunks[i].copy_(y)  # type: ignore[index]

        self._forward(self.bank.stem, inputs, level, "stem", ("stem", (level.index,)), write)
        level.root = handle[0].acquire()
        self.stats.stem_evals += 1
        self.stats.stem_seconds += time.perf_counter() - t0 - (self.stats.memory_seconds - memory0)
        return level.root

    def _compute(self, level: _Level, key: Key, parent: Handle, out: Handle) -> None:
        """Fill ``out``, the activation of prefix ``key``, from its parent's: the block writes
        into the pooled buffer itself when it defines ``forward_into(x, out)`` (the isoresnet
        and compositional blocks do; fp32 with the bank's statistics), else its output is
        copied in."""
        src = parent.chunks
        assert src is not None
        dst = self.pool.fill(out)  # a new buffer's time goes to stats.memory_seconds
        t0, start = time.perf_counter(), self._gpu_start()
        # block_at: banks with per-position statistics run the block bound to this position
        block = self._blocks[key[-1]] if self._blocks is not None else self.bank.block_at(key[-1], len(key) - 2)
        into = getattr(block, "forward_into", None) if self._direct else None
        if into is not None:
            for x, y in zip(src, dst):  # the block writes into the cache's buffer: no copy
                into(x, y)
        else:
            self._forward(block, src, level, key[-1], key, lambda i, y: dst[i].copy_(y))
        st = self.stats
        self._block_units += level.share
        st.block_evals = round(self._block_units)
        st.image_block_evals += level.n
        self._timed("block_seconds", start, t0)

    def _gpu_start(self) -> Any:
        """A recorded CUDA event to time queued work from (None off CUDA)."""
        if self._events is None:
            return None
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        return start

    def _timed(self, field: str, start: Any, t0: float) -> None:
        """Add the time since ``start`` (a CUDA event: the GPU's, summed later) or ``t0`` (a
        host timer) to the stats ``field``."""
        if self._events is not None:  # the kernels have only been queued: time them on the GPU
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((field, start, end))
        else:
            setattr(self.stats, field, getattr(self.stats, field) + time.perf_counter() - t0)

    def _sum_events(self) -> None:
        """Add the GPU time of the work queued since the last call to the stats."""
        if self._events:
            self._events[-1][2].synchronize()
            for field, a, b in self._events:
                setattr(self.stats, field, getattr(self.stats, field) + a.elapsed_time(b) / 1e3)
            self._events.clear()

    def _outputs(self, level: _Level, key: Key, handle: Handle) -> torch.Tensor:
        """Pooled features or head logits (N, D) of prefix ``key``, float32 on the engine's
        device (nothing waits for the queued blocks here)."""
        t0, start = time.perf_counter(), self._gpu_start()
        assert handle.chunks is not None
        parts: list[torch.Tensor] = [handle.chunks[0]] * len(handle.chunks)
        self._forward(self._tail, handle.chunks, level, "tail", ("tail", key), parts.__setitem__)
        outputs = torch.cat([p.float() for p in parts])
        self._timed("output_seconds", start, t0)
        return outputs

    def _checked_outputs(
        self, level: _Level, key: Key, path: list[tuple[Key, Handle]]
    ) -> tuple[torch.Tensor, str | None, Bad]:
        """The outputs of ``path``'s end; if they are not finite, why, and the first prefix on
        ``path`` whose activation is not (for the walk to poison), unless that is the stem
        output or every activation is finite and the tail made them so."""
        outputs = self._outputs(level, key, path[-1][1])
        # a sum of finite outputs overflows only near 1e38: confirm with the exact test
        if not self.check_finite or math.isfinite(outputs.sum().item()) or bool(torch.isfinite(outputs).all()):
            return outputs, None, None
        for k, handle in path:
            if not all(bool(torch.isfinite(c).all()) for c in handle.chunks or ()):
                if len(k) == 1:
                    return outputs, "non-finite stem output (are the images finite?)", None
                reason = f"non-finite activation after block {k[-1]} at position {len(k) - 2}"
                log.debug("order prefix %s failed: %s", Order(k[1:]), reason)
                return outputs, reason, (k, reason)
        return outputs, f"non-finite {self.objective.output}", None

    def _score_many(self, level: _Level, pending: list[tuple[Order, torch.Tensor]]) -> list[Score]:
        """Scores of candidates whose outputs are finite; a candidate whose scoring raises or
        returns a non-finite value fails with the reason (a batch that raises is scored one
        by one to find which)."""
        if not pending:
            return []
        t1, start = time.perf_counter(), self._gpu_start()
        outputs = [o if self.objective.on_device else o.cpu() for _, o in pending]
        try:
            scored = self.objective.score_many(outputs, level.evalset, level.state)
        except (RuntimeError, torch.linalg.LinAlgError) as exc:
            self._timed("objective_seconds", start, t1)
            if len(pending) > 1:
                return [s for p in pending for s in self._score_many(level, [p])]
            reason = f"objective {self.objective.name} raised {type(exc).__name__.lstrip('_')}: {exc}"
            return [self._failed(pending[0][0], level, reason)]
        self._timed("objective_seconds", start, t1)
        return [
            Score(order, float(value), metrics, None, level.n)
            if math.isfinite(value)
            else self._failed(order, level, f"objective {self.objective.name} returned {value}")
            for (order, _), (value, metrics) in zip(pending, scored)
        ]

    def _failed(self, order: Order, level: _Level, reason: str) -> Score:
        return Score(order, math.nan, {}, reason, level.n)

    def __repr__(self) -> str:
        return (
            f"Engine({self.bank.describe_source()}, n={self.n_images}, objective={self.objective.name}, "
            f"norm={self.norm}, cache={self.cache.capacity / 2**20:.0f} MiB/{self.cache.policy.name}, "
            f"device={self.device}, dtype={str(self.dtype).removeprefix('torch.')})"
        )


def _check_whole(n: int, per_image: int) -> None:
    """Target statistics are taken over all images at once, so a walk holds whole-set
    activations (its path's, at least): refuse a set whose one activation would take a quarter
    of this machine's memory, rather than let the machine swap."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not on this platform
        return
    if 4 * n * per_image > memory:
        raise DataError(
            f"norm='target' keeps activations over all {n} images at once ({n * per_image / 2**30:.1f} GiB per "
            f"prefix, a path of several per walk) and this machine has {memory / 2**30:.0f} GiB: score on fewer "
            "images (n_images=, --n-images), or use norm='source', which walks them in shards")
    if 4 * n * per_image > 2**30:
        log.warning("norm='target' keeps activations over all %d images at once: %.1f GiB per prefix", n,
                    n * per_image / 2**30)


def _retained_keys(levels: list[int], retain: list[tuple[int, ...]]) -> set[Key]:
    """The cache keys of every non-empty prefix of the ``retain`` orders at each level (a
    population's orders share most of theirs: :func:`add_prefixes` stops at the first known)."""
    keys: set[Key] = set()
    for i in levels:
        for r in retain:
            add_prefixes(keys, (i, *r), shortest=2)
    return keys
