"""The ``probe`` objective: a closed-form ridge linear probe on a candidate's pooled features.

Fit on the EvalSet's train split with the ridge strength chosen by exact leave-one-out error,
scored by accuracy on its val split: the score for a new labelled dataset (transfer by
reordering, Zhmoginov, Bashkirova and Sandler, arXiv 2107.10963).

Two ways to the same values. On a few thousand images the whole split is one batch of tensor
operations (dispatch, not arithmetic, is the cost there). On more, the features are read in
chunks of images and the fit is made from their D x D statistics (mean, centred Gram matrix,
features-labels products) and then a pass per chunk for the leave-one-out residuals and the
predictions, so the probe's memory is a fixed workspace, not a few float64 copies of every
image's features (the features themselves may be a memory-mapped file: the engine writes a
large set's outputs to one).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import ObjectiveError
from ..evalset import EvalSet
from .objectives import Objective, candidate_groups, single_threaded

__all__ = ["Probe"]

#: A candidate whose float64 features take more than this is probed in chunks of images.
_WHOLE_BYTES = 16 * 2**20
#: Bytes of float64 work per chunk of images (its features or its (A, C) residuals, per candidate).
_CHUNK_BYTES = 4 * 2**20
#: Work per group of candidates the probe scores at once on an accelerator.
_DEVICE_GROUP_BYTES = 256 * 2**20


@dataclass(frozen=True)
class _ProbeState:
    train: torch.Tensor
    val: torch.Tensor
    y_train: torch.Tensor
    y_val: torch.Tensor
    onehot: torch.Tensor  # (n_train, C), centred
    onehot_t: torch.Tensor  # (C, n_train), the same, contiguous
    y_mean: torch.Tensor  # (C,)
    alphas: torch.Tensor  # (A,)
    #: the tensors above on a scoring device and dtype, made once each
    moved: dict = field(default_factory=dict, compare=False, repr=False)

    def on(self, device: torch.device, dtype: torch.dtype) -> _ProbeState:
        """This state with its tensors on ``device`` (floating ones in ``dtype``)."""
        if device.type == "cpu" and dtype == torch.float64:
            return self
        key = (str(device), dtype)
        if key not in self.moved:
            self.moved[key] = _ProbeState(*(
                t.to(device, dtype if t.is_floating_point() else None) for t in (
                    self.train, self.val, self.y_train, self.y_val, self.onehot, self.onehot_t, self.y_mean,
                    self.alphas)))
        return self.moved[key]


class Probe(Objective):
    """Ridge linear probe on standardised pooled features, scored by val accuracy.

    The ridge strength is picked from ``alphas`` (multiples of the number of training images)
    by the exact leave-one-out squared error, which one eigendecomposition of the train
    features' smaller Gram matrix (D x D or n x n) gives for every alpha at once. All alphas,
    and in :meth:`score_many` all candidates, go through one batch of tensor operations: each
    operation on these small matrices costs more in dispatch than in arithmetic. Solved in
    float64 where the features are (on the CPU on one thread), with one host synchronisation
    per group of candidates and none per candidate: on an accelerator the blocks of the next
    candidates are queued while the probe of the last ones runs. Features of more images
    than fit a 16 MiB float64 copy (and more images than features) are read in chunks of
    images: the same values within rounding, in a fixed workspace.

    Args:
        alphas: Candidate ridge strengths relative to the train-split size.
        dtype: Precision of the solve: float64 (default), or float32 for an accelerator with
            slow float64 arithmetic (consumer cards; ``probe:dtype=float32`` as an objective
            name): standardised features then still pick the same ridge strength, but a
            near-tied val image can flip.
        chunk: Images per chunk, to read every set of more images than features in chunks of
            this many (default: only sets too large for one float64 copy, in chunks of about
            4 MiB).

    Side metrics: ``alpha`` (chosen, relative), ``loo_accuracy`` (leave-one-out accuracy on
    the train split at that alpha), ``train_accuracy``.

    Example:
        >>> import torch
        >>> from ordersearch.evalset import EvalSet
        >>> data = EvalSet(torch.randn(200, 4), torch.arange(200) % 2)
        >>> value, metrics = Probe().score(data.x, data, Probe().prepare(data))
        >>> sorted(metrics)
        ['alpha', 'loo_accuracy', 'train_accuracy']
    """

    name = "probe"
    output = "features"
    needs_labels = True
    fits = True
    truth = "probe"
    on_device = True

    def __init__(self, alphas: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0), *,
                 dtype: torch.dtype | str = torch.float64, chunk: int | None = None) -> None:
        if not alphas or min(alphas) <= 0:
            raise ObjectiveError("probe alphas must be positive")
        if isinstance(dtype, str):  # "probe:dtype=float32" on the command line
            dtype = {"float32": torch.float32, "float64": torch.float64}.get(dtype, dtype)  # type: ignore[arg-type]
        if dtype not in (torch.float32, torch.float64):
            raise ObjectiveError(f"probe dtype must be float32 or float64, got {dtype}")
        self.alphas = tuple(float(a) for a in alphas)
        self.dtype = dtype
        self.chunk = checked_chunk("probe", chunk)

    def prepare(self, evalset: EvalSet) -> _ProbeState:
        assert evalset.y is not None
        y = evalset.y
        n_classes = int(y.max()) + 1
        y_train = y[evalset.train_idx]
        onehot = torch.nn.functional.one_hot(y_train, n_classes).double()
        y_mean = onehot.mean(0)
        alphas = torch.tensor(self.alphas, dtype=torch.float64)
        onehot = onehot - y_mean
        return _ProbeState(evalset.train_idx, evalset.val_idx, y_train, y[evalset.val_idx], onehot,
                           onehot.T.contiguous(), y_mean, alphas)

    def score(self, outputs: torch.Tensor, evalset: EvalSet, state: _ProbeState) -> tuple[float, dict[str, float]]:
        return self.score_many([outputs], evalset, state)[0]

    def image_values(self, outputs: torch.Tensor, evalset: EvalSet, state: _ProbeState) -> torch.Tensor:
        """1.0 for each val image the probe classifies correctly, else 0.0 (in ``val_idx`` order)."""
        _, pred_val = self._group([outputs], state)
        return (pred_val[0].cpu() == state.y_val).double()

    def score_many(
        self, outputs: Sequence[torch.Tensor], evalset: EvalSet, state: _ProbeState
    ) -> list[tuple[float, dict[str, float]]]:
        """Every candidate's probe in one batch of tensor operations (B candidates, A alphas),
        in groups of at most 2 MiB of features on the CPU (larger batches run out of its
        caches) and of 256 MiB of work on an accelerator; one candidate is a batch of one, so
        the values do not depend on the batching."""
        if not outputs:
            return []
        if outputs[0].device.type == "cpu":
            groups = candidate_groups(outputs, 8 * outputs[0].numel())
        else:  # the (A, C, n) residuals are the largest tensor per candidate
            n, (a, c) = len(state.train), (len(self.alphas), state.onehot.shape[1])
            groups = candidate_groups(outputs, self.dtype.itemsize * max(outputs[0].numel(), a * c * n), _DEVICE_GROUP_BYTES)
        return [s for group in groups for s in self._group(group, state)[0]]

    def _group(
        self, outputs: Sequence[torch.Tensor], state: _ProbeState
    ) -> tuple[list[tuple[float, dict[str, float]]], torch.Tensor]:
        """The scores of one group of candidates and their val predictions (B, n_val)."""
        n_images, d = len(outputs[0]), outputs[0][0].numel()
        n, a, c = len(state.train), len(self.alphas), state.onehot.shape[1]
        rows = chunk_rows(self.chunk, n_images, n, d, len(outputs) * max(d, a * c))
        return self._whole(outputs, state) if rows is None else self._chunked(outputs, state, rows)

    def _whole(
        self, outputs: Sequence[torch.Tensor], state: _ProbeState
    ) -> tuple[list[tuple[float, dict[str, float]]], torch.Tensor]:
        """:meth:`_group` with every image's features in one batch of tensor operations."""
        device = outputs[0].device
        dtype = self.dtype
        eps = torch.finfo(dtype).eps
        state = state.on(device, dtype)
        with single_threaded(device):
            x = torch.stack(list(outputs)).detach().to(dtype).flatten(2)  # (B, N, D)
            # images last: the reductions and element-wise operations then run along
            # contiguous rows of n values, not of D or C
            xtr, xva = (x.index_select(1, idx).mT.contiguous() for idx in (state.train, state.val))
            mu = xtr.mean(2, keepdim=True)  # (B, D, 1)
            dtr = xtr - mu
            sd = _guarded(dtr.square().mean(2, keepdim=True).sqrt(), dim=1)
            zt, zvat = dtr / sd, (xva - mu) / sd  # (B, D, n), (B, D, n_val)
            # float64 keeps directions down to 1e-12 of the largest; float32's rounding is larger
            lam, ut = _left_singular(zt, rtol=max(1e-12, 100 * eps))  # (B, r), (B, r, n)
            (b, _, n), a, c = zt.shape, len(self.alphas), state.onehot.shape[1]
            uty = ut @ state.onehot  # (B, r, C)
            f = lam[:, None, :] / (lam[:, None, :] + state.alphas[:, None] * n)  # (B, A, r): shrinkage
            fit = ((f[:, :, None, :] * uty.mT[:, None]).reshape(b, a * c, -1) @ ut).reshape(b, a, c, n)
            # hat diagonal, with intercept (below 1, or a leave-one-out residual divides by zero)
            lev = (f @ ut.square() + 1.0 / n).clamp(max=1 - max(1e-9, 10 * eps))  # (B, A, n)
            res = state.onehot_t - fit  # (B, A, C, n): residuals
            # leave-one-out residuals are res / (1 - lev): their squared sum per alpha without
            # materialising them (the (B, A, C, n) passes dominate the probe's time)
            loo_err = torch.linalg.vecdot(res, res, dim=2) / (1 - lev).square()  # (B, A, n)
            pick = _least(loo_err.sum(2))  # (B,)
            rows = torch.arange(b, device=device)
            # val predictions: z^T u = v diag(sqrt(lam)), so w = z^T u diag(1 / (lam + a n)) u^T y
            g = uty / (lam + state.alphas[pick][:, None] * n)[..., None]  # (B, r, C)
            pred_val = _argmax(zvat.mT @ (zt @ (ut.mT @ g)) + state.y_mean, 2)  # (B, n_val)
            y_mean = state.y_mean[:, None]
            loo = res[rows, pick] / (1 - lev[rows, pick])[:, None, :]  # (B, C, n): at the chosen alpha
            loo_pred = _argmax(state.onehot_t - loo + y_mean, 1)
            train_pred = _argmax(fit[rows, pick] + y_mean, 1)
            return self._results(torch.stack([
                (pred_val == state.y_val).sum(1), pick, (loo_pred == state.y_train).sum(1),
                (train_pred == state.y_train).sum(1)]), n, len(state.y_val)), pred_val

    def _chunked(
        self, outputs: Sequence[torch.Tensor], state: _ProbeState, rows: int
    ) -> tuple[list[tuple[float, dict[str, float]]], torch.Tensor]:
        """:meth:`_group` for more images than features, reading ``rows`` images at a time:
        the fit from the D x D statistics of the standardised train features, then one pass
        over the train images for the leave-one-out error and accuracy of every alpha and one
        over the val images for the predictions at the chosen alpha."""
        device = outputs[0].device
        dtype = self.dtype
        eps = torch.finfo(dtype).eps
        state = state.on(device, dtype)
        flat = [o.detach().flatten(1) for o in outputs]  # (N, D) each, maybe memory-mapped
        b, d = len(flat), flat[0].shape[1]
        n, a, c = len(state.train), len(self.alphas), state.onehot.shape[1]
        zeros = functools.partial(torch.zeros, device=device, dtype=dtype)

        def chunks(idx: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
            """(positions in ``idx``, the features of those images (B, m, D)) a chunk at a time."""
            idx = idx.to(flat[0].device)
            for s in range(0, len(idx), rows):
                part = idx[s : s + rows]
                yield slice(s, s + len(part)), torch.stack([o.index_select(0, part) for o in flat]).to(device, dtype)

        with single_threaded(device):
            total = zeros(b, d)
            for _, xc in chunks(state.train):
                total += xc.sum(1)
            mu = total[:, None, :] / n  # (B, 1, D)
            gram, xy = zeros(b, d, d), zeros(b, d, c)
            for s, xc in chunks(state.train):
                dc = xc - mu
                gram += dc.mT @ dc
                xy += dc.mT @ state.onehot[s]
            sd = _guarded((gram.diagonal(dim1=1, dim2=2) / n).sqrt(), dim=1)  # (B, D)
            lam, v = torch.linalg.eigh(gram / (sd[:, :, None] * sd[:, None, :]))  # of z^T z
            lam = lam.clamp_min(0)
            keep = lam > max(1e-12, 100 * eps) * lam[:, -1:]
            lam = torch.where(keep, lam, 0.0)  # (B, r)
            proj = v * torch.where(keep, lam, 1.0).rsqrt().mul(keep)[:, None, :]  # (B, D, r): u_i = proj^T z_i
            uty = proj.mT @ (xy / sd[:, :, None])  # (B, r, C)
            f = lam[:, None, :] / (lam[:, None, :] + state.alphas[:, None] * n)  # (B, A, r): shrinkage
            fu = (f[:, :, None, :] * uty.mT[:, None]).reshape(b, a * c, -1)  # (B, A C, r)
            loo_err = zeros(b, a)
            loo_right, train_right = (torch.zeros(b, a, dtype=torch.long, device=device) for _ in range(2))
            y_mean = state.y_mean[:, None]
            for s, xc in chunks(state.train):
                ut = proj.mT @ ((xc - mu) / sd[:, None, :]).mT  # (B, r, m)
                m = ut.shape[2]
                fit = (fu @ ut).reshape(b, a, c, m)
                lev = (f @ ut.square() + 1.0 / n).clamp(max=1 - max(1e-9, 10 * eps))  # (B, A, m)
                res = state.onehot_t[:, s] - fit  # (B, A, C, m)
                loo_err += (torch.linalg.vecdot(res, res, dim=2) / (1 - lev).square()).sum(2)
                y = state.y_train[s]
                loo_pred = _argmax(state.onehot_t[:, s] - res / (1 - lev)[:, :, None] + y_mean, 2)  # (B, A, m)
                loo_right += (loo_pred == y).sum(2)
                train_right += (_argmax(fit + y_mean, 2) == y).sum(2)
            pick = _least(loo_err)  # (B,)
            # the val predictions' weights: z^T u = v diag(sqrt(lam))
            w = (v * lam.sqrt()[:, None, :]) @ (uty / (lam + state.alphas[pick][:, None] * n)[..., None])  # (B, D, C)
            pred_val = torch.empty(b, len(state.val), dtype=torch.long, device=device)
            for s, xc in chunks(state.val):
                pred_val[:, s] = _argmax(((xc - mu) / sd[:, None, :]) @ w + state.y_mean, 2)
            at = torch.arange(b, device=device)
            return self._results(torch.stack([
                (pred_val == state.y_val).sum(1), pick, loo_right[at, pick], train_right[at, pick]]), n,
                len(state.y_val)), pred_val

    def _results(self, counts: torch.Tensor, n: int, n_val: int) -> list[tuple[float, dict[str, float]]]:
        """Scores from per-candidate counts (4, B): right val predictions, chosen alpha, right
        leave-one-out and train predictions; the group's one host synchronisation."""
        return [
            (v / n_val, {"alpha": self.alphas[i], "loo_accuracy": lo / n, "train_accuracy": tr / n})
            for v, i, lo, tr in zip(*counts.tolist())
        ]


def checked_chunk(name: str, chunk: int | None) -> int | None:
    """An objective's ``chunk`` option (images per chunk, None: automatic), checked."""
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise ObjectiveError(f"{name} chunk must be a positive number of images, got {chunk!r}")
    return chunk


def chunk_rows(chunk: int | None, n_images: int, n_fit: int, d: int, width: int) -> int | None:
    """Images per chunk for an objective that can fit from D x D statistics, or None to read
    the features whole: whole when they are no more than ``n_fit`` (the images it fits on;
    the n x n Gram matrix is then the small one), or, unless ``chunk`` is given, when
    ``n_images`` x ``d`` features take at most :data:`_WHOLE_BYTES` as float64; else ``chunk``
    or as many as :data:`_CHUNK_BYTES` of float64 work ``width`` values wide per image hold."""
    if d >= n_fit or (chunk is None and 8 * n_images * d <= _WHOLE_BYTES):
        return None
    return chunk or max(256, _CHUNK_BYTES // (8 * width))


def _guarded(sd: torch.Tensor, dim: int) -> torch.Tensor:
    """Standard deviations ``sd`` with those of (near) constant features (below 1e-12 of the
    largest along ``dim``) set to 1: such a feature stays zero once centred."""
    return torch.where(sd > 1e-12 * sd.amax(dim, keepdim=True).clamp_min(torch.finfo(sd.dtype).tiny), sd, 1.0)


def _left_singular(zt: torch.Tensor, rtol: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared singular values (B, r) and left singular vectors, as rows (B, r, n), of each
    (n, D) matrix z whose transpose is in ``zt`` (B, D, n), from the eigendecomposition of the
    smaller of ``z^T z`` and ``z z^T`` (twice as fast as an SVD at D = n = 192, and far
    faster for tall z). Directions with no variance (below ``rtol`` of the largest) get zero
    vectors: they take no part in the ridge fit, as in the SVD."""
    d, n = zt.shape[-2:]
    if d < n:
        lam, v = torch.linalg.eigh(zt @ zt.mT)
        lam = lam.clamp_min(0)
        keep = lam > rtol * lam[:, -1:]
        ut = (v.mT @ zt) * torch.where(keep, lam, 1.0).rsqrt().mul(keep)[:, :, None]
    else:
        lam, u = torch.linalg.eigh(zt.mT @ zt)
        lam = lam.clamp_min(0)
        keep = lam > rtol * lam[:, -1:]
        ut = u.mT * keep[:, :, None]
    return torch.where(keep, lam, 0.0), ut


def _argmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.argmax(dim)`` (the first of tied maxima too), computed by ``max``: on the CPU
    ``argmax`` over a dimension that is not the last ran 6x slower (2.5 ms for a batch's
    (64, 10, 192) class scores)."""
    return x.max(dim).indices


def _least(errs: torch.Tensor) -> torch.Tensor:
    """Per row of ``errs`` (B, A), the first index within rounding of the row's least error
    (B,), on the device of ``errs`` (no host synchronisation)."""
    least = errs.amin(1, keepdim=True)
    close = errs <= least * (1 + 1e-12) + torch.finfo(errs.dtype).tiny
    return close.to(torch.uint8).argmax(1)
