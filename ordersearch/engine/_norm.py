"""Target-domain BatchNorm statistics (AdaBN, Li et al. 2016) for one module at a time.

With ``norm="target"`` every BatchNorm call normalises with the mean and (biased) variance of
its input over the *whole* EvalSet, whatever the chunk size, so a score does not depend on how
the images were batched. Statistics at a position depend only on the order prefix (the input
of that position), so the engine caches them per prefix like activations.

How: a module (a block, the stem, the tail) runs over all chunks in passes. In pass ``j``
the first ``j`` BatchNorm calls use statistics already measured and call ``j`` accumulates
the mean and variance of its input over all chunks (Chan et al.'s pairwise update in float64)
and stops the forward there. The pass that meets no unmeasured call produces the outputs. A
module with ``m`` BatchNorm calls takes ``m + 1`` passes, most of them partial (a
pre-activation block's first call is its first operation). When the EvalSet is one chunk, a
single pass measures each call's statistics on the spot. Both paths normalise with
``F.batch_norm`` on the same float32 statistics, so they agree to float tolerance.

Statistics are per *call*, not per module, so a module called twice in one forward gets two
sets (matching a train-mode forward of the rebuilt model on the whole EvalSet).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BNStats", "batchnorm_modules", "run_with_target_stats"]

#: Per-call (mean, var) statistics of one module at one position.
BNStats = list[tuple[torch.Tensor, torch.Tensor]]


class _StopForward(Exception):
    pass


def batchnorm_modules(module: nn.Module) -> list[nn.Module]:
    """The BatchNorm layers inside ``module`` (what target norm re-estimates): PyTorch's, and
    any module that declares ``target_norm = True`` and has ``weight``, ``bias``, ``eps`` and a
    ``forward(x, slot=0)`` (the per-position BatchNorm of trained compositional banks, whose
    affine parameters may be per slot: ``affine_per_slot``)."""
    return [m for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) or getattr(m, "target_norm", False)]


class _Accumulator:
    """Mean and biased variance over chunks, per channel (dim 1), in float64."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        dims = [d for d in range(x.ndim) if d != 1]
        n_c = x.numel() // x.shape[1]
        var_c, mean_c = torch.var_mean(x.double(), dim=dims, correction=0)
        if self.mean is None:
            self.n, self.mean, self.m2 = n_c, mean_c, var_c * n_c
            return
        n = self.n + n_c
        delta = mean_c - self.mean
        self.mean = self.mean + delta * (n_c / n)
        self.m2 = self.m2 + var_c * n_c + delta.square() * (self.n * n_c / n)
        self.n = n

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.mean is not None and self.m2 is not None
        return self.mean.float(), (self.m2 / self.n).float()


class _Calls:
    """Stands in for every BatchNorm forward during one target-norm pass."""

    def __init__(self, stats: BNStats, *, measure: str) -> None:
        self.stats = stats
        self.measure = measure  # "none", "inline" (one chunk) or "accumulate"
        self.acc: _Accumulator | None = None
        self.i = 0

    def __call__(self, bn: nn.Module, x: torch.Tensor, slot: int = 0) -> torch.Tensor:
        i = self.i
        self.i += 1
        if i >= len(self.stats):
            if self.measure == "inline":
                acc = _Accumulator()
                acc.add(x)
                self.stats.append(acc.result())
            elif self.measure == "accumulate":
                if self.acc is None:
                    self.acc = _Accumulator()
                self.acc.add(x)
                raise _StopForward
            else:
                raise RuntimeError(f"BatchNorm call {i} has no target statistics (the module's structure changed?)")
        mean, var = self.stats[i]
        weight, bias = bn.weight, bn.bias
        if getattr(bn, "affine_per_slot", False):
            weight, bias = weight[slot], bias[slot]
        return F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), weight, bias, False, 0.0, bn.eps)


@contextmanager
def _patched(bns: Sequence[nn.Module], calls: _Calls) -> Iterator[None]:
    # An instance attribute shadows the class's forward for this call only.
    for bn in bns:
        bn.forward = (lambda x, slot=0, _bn=bn: calls(_bn, x, slot))  # type: ignore[method-assign]
    try:
        yield
    finally:
        for bn in bns:
            del bn.forward


def run_with_target_stats(
    fn: Callable[[torch.Tensor], torch.Tensor],
    chunks: Sequence[torch.Tensor],
    bns: Sequence[nn.Module],
    write: Callable[[int, torch.Tensor], None],
    stats: BNStats | None = None,
) -> tuple[BNStats, int]:
    """Run ``fn`` on every chunk with whole-set BatchNorm statistics.

    Args:
        fn: The module's forward for one chunk.
        chunks: The inputs, in chunks that together are the whole EvalSet.
        bns: The BatchNorm layers ``fn`` may call (patched for the duration).
        write: Receives ``(chunk index, output)`` for the final pass.
        stats: Statistics measured before for this position (skips the measuring passes).

    Returns:
        The per-call statistics and the number of passes run.
    """
    if stats is not None or not bns:
        known = list(stats or [])
        calls = _Calls(known, measure="none")
        with _patched(bns, calls):
            for i, c in enumerate(chunks):
                calls.i = 0
                write(i, fn(c))
        return known, 1
    measured: BNStats = []
    if len(chunks) == 1:
        calls = _Calls(measured, measure="inline")
        with _patched(bns, calls):
            write(0, fn(chunks[0]))
        return measured, 1
    passes = 0
    while True:
        passes += 1
        calls = _Calls(measured, measure="accumulate")
        with _patched(bns, calls):
            for i, c in enumerate(chunks):
                calls.i = 0
                try:
                    y = fn(c)
                except _StopForward:
                    continue
                if calls.acc is not None:
                    raise RuntimeError("chunks called their BatchNorm layers in different sequences")
                write(i, y)
        if calls.acc is None:
            return measured, passes
        measured.append(calls.acc.result())
