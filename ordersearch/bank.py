"""Banks: the frozen, same-shaped residual blocks of a model, plus its stem and head.

A bank is the "set of modules" of Zhmoginov, Bashkirova and Sandler (arXiv 2107.10963):
K isometric blocks that any order may run, between a fixed stem and a source head. The
identity order reproduces the source model's forward exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._io import atomic_path, write_atomic
from .errors import BankError
from .order import Order

__all__ = ["Bank", "BANK_FORMAT", "BANK_FORMAT_VERSION"]

log = logging.getLogger("ordersearch")

BANK_FORMAT = "ordersearch.bank"
BANK_FORMAT_VERSION = 1


class Bank(nn.Module):
    """Stem, K interchangeable blocks and a head, taken from one model.

    Build banks with :func:`ordersearch.load_bank` or :func:`ordersearch.bank_from_model`
    rather than by hand; the adapters check that the blocks share one shape and that the
    identity order reproduces the model.

    Args:
        model: The source model (kept so that the bank can be saved and rebuilt).
        stem: Module mapping images to the first block's input.
        blocks: The K blocks, in the source model's order.
        head: Module mapping the last block's output to logits, or None.
        features: Module mapping the last block's output to a pooled (B, D) representation.
        adapter: Name of the adapter that made the bank.
        source: Text that rebuilds the architecture (``timm:<name>``, ``isoresnet:...``),
            or None for a model the bank cannot rebuild by itself.
        model_kwargs: Keyword arguments the source needs to rebuild the architecture.
        data_config: Input size, mean, std and interpolation the model expects.
        source_orders: Named orders the bank was trained with (per task or domain).
        block_at: ``(block, position) -> module`` for banks that keep per-position state
            (e.g. BatchNorm statistics per position when a block is reused); by default
            the block itself, whatever its position.

    Example:
        >>> import ordersearch
        >>> bank = ordersearch.load_bank("isoresnet:width=8,blocks=3,classes=10")
        >>> x = torch.randn(2, *bank.data_config["input_size"])
        >>> logits = bank(x, ordersearch.Order([2, 0, 0, 1]))
        >>> logits.shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        stem: nn.Module,
        blocks: Sequence[nn.Module],
        head: nn.Module | None,
        features: nn.Module,
        adapter: str,
        source: str | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        data_config: Mapping[str, Any] | None = None,
        source_orders: Mapping[str, Order] | None = None,
        block_at: Callable[[int, int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if len(blocks) == 0:
            raise BankError("a bank needs at least one block")
        self.model = model
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = head
        self.features = features
        self.adapter = adapter
        self.source = source
        self.model_kwargs = dict(model_kwargs or {})
        self.data_config = dict(data_config or {})
        self.path: str | None = None  # the saved file it was loaded from or saved to
        # how load_bank got the weights (pretrained, checkpoint and its sha256, or the seed of a
        # random initialisation): with source and model_kwargs, what rebuilds the same bank
        self.weights: dict[str, Any] = {}
        self.source_orders: dict[str, Order] = {
            name: Order.parse(o).validate(len(blocks)) for name, o in (source_orders or {}).items()
        }
        self._block_at = block_at
        self.freeze()

    # --- structure ----------------------------------------------------------------------
    @property
    def n_blocks(self) -> int:
        """K, the number of blocks."""
        return len(self.blocks)

    @property
    def identity(self) -> Order:
        """The source model's order ``0..K-1``."""
        return Order.identity(self.n_blocks)

    @property
    def num_classes(self) -> int | None:
        """Number of classes of the source head, if the bank has one."""
        return self.data_config.get("num_classes")

    def freeze(self) -> Bank:
        """Eval mode and no gradients: banks are frozen during search."""
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def block_parameters(self) -> int:
        """Parameters in one block (blocks are interchangeable, so all have this many)."""
        return sum(p.numel() for p in self.blocks[0].parameters())

    # --- forward ------------------------------------------------------------------------
    @property
    def has_positional_blocks(self) -> bool:
        """True if :meth:`block_at` depends on the position (per-position statistics)."""
        return self._block_at is not None

    def block_at(self, block: int, position: int) -> nn.Module:
        """The module that runs ``block`` at ``position`` of an order.

        The block itself for most banks; banks with per-position normalisation statistics
        return a view of the block bound to that position's statistics.
        """
        if self._block_at is None:
            return self.blocks[block]
        return self._block_at(block, position)

    def run_blocks(self, h: torch.Tensor, order: Order | Sequence[int]) -> torch.Tensor:
        """Apply the blocks of ``order`` to a stem output ``h``."""
        for pos, i in enumerate(order):
            h = self.block_at(i, pos)(h)
        return h

    def forward(self, x: torch.Tensor, order: Order | Sequence[int] | None = None) -> torch.Tensor:
        """Logits of ``order`` (identity by default) on images ``x``."""
        if self.head is None:
            raise BankError(f"bank {self.describe_source()} has no head; use features instead")
        order = self.identity if order is None else Order.parse(order).validate(self.n_blocks, min_len=0)
        return self.head(self.run_blocks(self.stem(x), order))

    def embed(self, x: torch.Tensor, order: Order | Sequence[int] | None = None) -> torch.Tensor:
        """Pooled (B, D) features of ``order`` on images ``x``."""
        order = self.identity if order is None else Order.parse(order).validate(self.n_blocks, min_len=0)
        return self.features(self.run_blocks(self.stem(x), order))

    # --- identity -----------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """sha256 over the adapter name and every block weight (names, shapes, dtypes, bytes).

        Computed on access, so it changes as soon as any block weight changes.
        """
        h = hashlib.sha256(self.adapter.encode())
        for i, block in enumerate(self.blocks):
            _hash_state(h, f"{i}.", block)
        return h.hexdigest()

    @property
    def digest(self) -> str:
        """sha256 over everything that changes a score: the adapter, every weight and buffer
        (stem, blocks, head, norms) and the data config (input size, mean, std).

        Saved in the header (a bank whose header or weights were edited since is refused) and
        recorded by a study (a resume on a changed bank is refused).
        """
        h = hashlib.sha256(self.adapter.encode())
        # the model holds every weight once; a bank built from parts hashes its parts
        parts = [("model.", self.model)] if isinstance(self.model, nn.Module) else [
            ("stem.", self.stem), ("blocks.", self.blocks), ("head.", self.head), ("features.", self.features)]
        for prefix, module in parts:
            if isinstance(module, nn.Module):
                _hash_state(h, prefix, module)
        h.update(json.dumps(_jsonable(self.data_config), sort_keys=True).encode())
        return h.hexdigest()

    def describe_source(self) -> str:
        """Source text, or the adapter name for banks made from an in-memory model."""
        return self.source or f"<{self.adapter} model>"

    def info(self) -> dict[str, Any]:
        """Summary for ``ordersearch info``: blocks, shapes, parameters, fingerprint."""
        shape = self.data_config.get("block_shape")
        total = sum(p.numel() for p in self.model.parameters())
        per_block = self.block_parameters()
        return {
            "source": self.describe_source(),
            "adapter": self.adapter,
            "n_blocks": self.n_blocks,
            "block_shape": list(shape) if shape else None,
            "block_parameters": per_block,
            "blocks_parameters": per_block * self.n_blocks,
            "total_parameters": total,
            "input_size": list(self.data_config.get("input_size", [])),
            "num_classes": self.num_classes,
            "source_orders": {k: str(v) for k, v in self.source_orders.items()},
            "fingerprint": self.fingerprint,
        }

    # --- persistence --------------------------------------------------------------------
    def header(self) -> dict[str, Any]:
        """The JSON header saved next to the weights."""
        return {
            "format": BANK_FORMAT,
            "version": BANK_FORMAT_VERSION,
            "adapter": self.adapter,
            "source": self.source,
            "model_kwargs": _jsonable(self.model_kwargs),
            "n_blocks": self.n_blocks,
            "data_config": _jsonable(self.data_config),
            "source_orders": {k: v.to_list() for k, v in self.source_orders.items()},
            "fingerprint": self.fingerprint,
            "digest": self.digest,
        }

    def save(self, path: str | Path) -> Path:
        """Save as ``<path>`` (safetensors weights) with the JSON header in its metadata and
        beside it as ``<path>.json``; returns the weights path.

        Only banks whose architecture can be rebuilt from text (``source``) can be saved.
        """
        from safetensors.torch import save_model

        if self.source is None:
            raise BankError(
                "this bank was made from an in-memory model and cannot be rebuilt from a file; "
                "build it with load_bank('timm:<name>' or 'isoresnet:...') to save it"
            )
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(path.suffix + ".safetensors") if path.suffix else path.with_suffix(".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        header = self.header()
        with atomic_path(path) as tmp:
            save_model(self.model, str(tmp), metadata={"ordersearch": json.dumps(header)})
        write_atomic(path.with_name(path.name + ".json"), json.dumps(header, indent=2) + "\n")
        self.path = str(path)
        log.info("saved bank %s (%d blocks) to %s", self.describe_source(), self.n_blocks, path)
        return path


def _hash_state(h: Any, prefix: str, module: nn.Module) -> None:
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{prefix}{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    return repr(value)
