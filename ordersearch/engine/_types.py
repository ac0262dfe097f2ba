"""Values the engine returns: a candidate's :class:`Score` and the running :class:`EngineStats`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..order import Order

__all__ = ["EngineStats", "Score"]


@dataclass(frozen=True)
class Score:
    """The objective's value for one candidate order.

    Attributes:
        order: The candidate.
        value: Objective value, higher is better (NaN when the candidate failed).
        metrics: Side metrics of the objective (e.g. ``accuracy`` for unsupervised ones).
        failed: Why the candidate failed (non-finite activation or score), else None.
        n_images: Images the value was measured on (less than the EvalSet for a
            low-fidelity or pruned score).
        intermediate: Values at lower fidelities, by number of images (multi-fidelity).
    """

    order: Order
    value: float
    metrics: dict[str, float] = field(default_factory=dict)
    failed: str | None = None
    n_images: int = 0
    intermediate: dict[int, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True unless the candidate failed."""
        return self.failed is None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (order as a list)."""
        return {
            "order": self.order.to_list(),
            "value": None if math.isnan(self.value) else self.value,
            "metrics": dict(self.metrics),
            "failed": self.failed,
            "n_images": self.n_images,
            "intermediate": {str(k): v for k, v in self.intermediate.items()},
        }


@dataclass
class EngineStats:
    """Counters and timers of an :class:`~ordersearch.engine.Engine` since creation (or the
    last :meth:`~ordersearch.engine.Engine.reset_stats`).

    Attributes:
        candidates: Orders scored (each input position, repeats included).
        failed: Candidates that failed.
        block_evals: Block forwards actually run (one per prefix computed, over all images).
        min_block_evals: Distinct prefixes seen: what an unlimited cache would run.
        naive_block_evals: Sum of candidate lengths: what building each model would run.
        image_block_evals: Block forwards times images (compares fidelities).
        cache_hits: Walks that started from a cached prefix.
        memo_hits: Candidates answered from the score memo (an order scored before).
        evictions: Entries evicted from the cache.
        cache_bytes: Bytes cached now.
        cache_bytes_peak: Most bytes ever cached (never above the budget).
        live_bytes_peak: Most activation bytes held at once: cache, the walk's path, free
            pooled buffers and stem outputs.
        stem_evals: Stem forwards over an EvalSet (once per EvalSet and fidelity).
        stat_passes: Extra passes that measured target-norm statistics.
        block_seconds: Time in block forwards (incl. target-norm passes and the copy into pooled
            buffers); on CUDA the GPU's time, measured with CUDA events.
        stem_seconds: Time in stem forwards.
        output_seconds: Time in the tail (pooled features or head logits).
        objective_seconds: Time in objective scoring (e.g. the ridge probe).
        total_seconds: Wall-clock time inside ``evaluate``.
        plan_seconds: Time planning walks over the cache's bookkeeping (which prefixes to
            compute, admit and evict): part of the overhead, the trie's own share of it.
        memory_seconds: Time taking new activation buffers into use (on the CPU, faulting in
            their pages: up to 0.2 ms per MiB on 2 CPU cores). Each buffer is paid for once, when the
            cache and paths first grow to it, and then reused, so it is a cost of the cache's
            size, not of the candidates, and a long search amortises it; part of neither the
            block nor the stem time.
    """

    candidates: int = 0
    failed: int = 0
    block_evals: int = 0
    min_block_evals: int = 0
    naive_block_evals: int = 0
    image_block_evals: int = 0
    cache_hits: int = 0
    memo_hits: int = 0
    evictions: int = 0
    cache_bytes: int = 0
    cache_bytes_peak: int = 0
    live_bytes_peak: int = 0
    stem_evals: int = 0
    stat_passes: int = 0
    block_seconds: float = 0.0
    stem_seconds: float = 0.0
    output_seconds: float = 0.0
    objective_seconds: float = 0.0
    total_seconds: float = 0.0
    plan_seconds: float = 0.0
    memory_seconds: float = 0.0

    @property
    def overhead_seconds(self) -> float:
        """Time that is neither block, stem, tail, objective nor new memory: the walk's bookkeeping."""
        return max(
            0.0,
            self.total_seconds - self.block_seconds - self.stem_seconds - self.output_seconds - self.objective_seconds
            - self.memory_seconds,
        )

    @property
    def overhead_us_per_candidate(self) -> float:
        return 1e6 * self.overhead_seconds / max(self.candidates, 1)

    @property
    def plan_us_per_candidate(self) -> float:
        return 1e6 * self.plan_seconds / max(self.candidates, 1)

    @property
    def cache_efficiency(self) -> float:
        """``min_block_evals / block_evals``: 1.0 means the cache ran only distinct prefixes."""
        return self.min_block_evals / self.block_evals if self.block_evals else 1.0

    @property
    def saving(self) -> float:
        """``naive_block_evals / block_evals``: block forwards saved against building each model."""
        return self.naive_block_evals / self.block_evals if self.block_evals else math.inf

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            overhead_seconds=self.overhead_seconds,
            overhead_us_per_candidate=self.overhead_us_per_candidate,
            plan_us_per_candidate=self.plan_us_per_candidate,
            cache_efficiency=self.cache_efficiency,
            saving=self.saving,
        )
        return out
