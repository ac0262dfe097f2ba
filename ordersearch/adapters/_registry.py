"""One way in for every model family: ``register_adapter(name, matches, build)``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..bank import Bank
from ..errors import BankError

__all__ = ["Adapter", "register_adapter", "list_adapters", "bank_from_model", "get_adapter"]

log = logging.getLogger("ordersearch")


@dataclass(frozen=True)
class Adapter:
    """How to split one model family into stem, blocks and head.

    Attributes:
        name: Registry name (``vit``, ``convmixer``, ...).
        matches: True for models this adapter handles.
        build: Returns the bank's parts as a dict with keys ``stem``, ``blocks``, ``head``,
            ``features`` (modules) and optional ``data_config``, ``source_orders`` and
            ``block_at`` (see :class:`~ordersearch.Bank`).
        description: One line for ``ordersearch adapters``.
    """

    name: str
    matches: Callable[[nn.Module], bool]
    build: Callable[[nn.Module], dict[str, Any]]
    description: str = ""


_ADAPTERS: dict[str, Adapter] = {}


def register_adapter(
    name: str,
    matches: Callable[[nn.Module], bool],
    build: Callable[[nn.Module], dict[str, Any]],
    *,
    description: str = "",
) -> Adapter:
    """Register an adapter; later registrations are tried first, the generic one last."""
    adapter = Adapter(name, matches, build, description)
    _ADAPTERS[name] = adapter
    return adapter


def list_adapters() -> list[Adapter]:
    """Registered adapters in the order they are tried."""
    generic = [a for a in _ADAPTERS.values() if a.name == "blocks"]
    return [a for a in reversed(_ADAPTERS.values()) if a.name != "blocks"] + generic


def get_adapter(name: str) -> Adapter:
    try:
        return _ADAPTERS[name]
    except KeyError:
        raise BankError(f"unknown adapter {name!r}; known: {', '.join(_ADAPTERS)}") from None


def bank_from_model(
    model: nn.Module,
    *,
    adapter: str | None = None,
    source: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    data_config: dict[str, Any] | None = None,
    source_orders: dict[str, Any] | None = None,
    verify: bool = True,
) -> Bank:
    """Split a model into a :class:`Bank` of frozen, same-shaped blocks.

    Args:
        model: A timm isometric model (ViT/DeiT, ConvMixer, ResMLP, MLP-Mixer), an
            :class:`~ordersearch.IsoResNet`, or any model with a same-shape ``blocks``
            sequence.
        adapter: Force an adapter by name instead of picking the first that matches.
        source: Text that rebuilds the architecture (set by :func:`load_bank`).
        model_kwargs: Arguments the source needs to rebuild the architecture.
        data_config: Overrides for the input size, mean and std.
        source_orders: Named orders to attach (per task or domain).
        verify: Check that every block keeps the activation shape and that the identity
            order reproduces ``model(x)`` on a random input.

    Raises:
        BankError: if no adapter fits, blocks change shape (the message lists them), or the
            identity order does not reproduce the model.
    """
    model.eval()
    candidates = [get_adapter(adapter)] if adapter else [a for a in list_adapters() if a.matches(model)]
    if not candidates:
        raise BankError(
            f"{type(model).__name__} has no adapter: it needs a `blocks` sequence of same-shaped "
            f"modules (known adapters: {', '.join(a.name for a in list_adapters())})"
        )
    chosen = candidates[0]
    parts = chosen.build(model)
    config = dict(parts.get("data_config") or {})
    config.update(data_config or {})
    if "input_size" not in config:
        raise BankError(f"{type(model).__name__}: cannot tell the input size; pass data_config")
    bank = Bank(
        model=model,
        stem=parts["stem"],
        blocks=parts["blocks"],
        head=parts.get("head"),
        features=parts["features"],
        adapter=chosen.name,
        source=source,
        model_kwargs=model_kwargs,
        data_config=config,
        source_orders=source_orders or parts.get("source_orders"),
        block_at=parts.get("block_at"),
    )
    if verify:
        _check_shapes(bank)
        _check_identity(bank, model)
    else:
        with torch.inference_mode():
            h = bank.stem(torch.zeros(1, *config["input_size"]))
        bank.data_config["block_shape"] = list(h.shape[1:])
    return bank


def _check_shapes(bank: Bank) -> None:
    x = torch.randn(2, *bank.data_config["input_size"], generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        h = bank.stem(x)
        shape = tuple(h.shape[1:])
        rows, bad = [], False
        for i, block in enumerate(bank.blocks):
            try:
                out = block(h)
            except Exception as exc:  # a block that cannot take another block's output
                rows.append(f"block {i}: fails on input {shape}: {type(exc).__name__}: {exc}")
                bad = True
                continue
            out_shape = tuple(out.shape[1:])
            rows.append(f"block {i}: {shape} -> {out_shape}")
            bad |= out_shape != shape
    if bad:
        raise BankError(
            f"{type(bank.model).__name__} is not isometric: every block must map {shape} to "
            f"{shape}; found " + "; ".join(rows)
        )
    bank.data_config["block_shape"] = list(shape)


def _check_identity(bank: Bank, model: nn.Module) -> None:
    x = torch.randn(2, *bank.data_config["input_size"], generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model(x)
        if isinstance(expected, (tuple, list)):
            expected = expected[0]
        got = bank(x) if bank.head is not None else None
    if got is None:
        return
    if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        diff = (got - expected).abs().max().item() if got.shape == expected.shape else float("nan")
        raise BankError(
            f"adapter {bank.adapter!r} does not reproduce {type(model).__name__}: the identity "
            f"order differs from model(x) (max abs diff {diff:.3g}); pick another adapter"
        )
