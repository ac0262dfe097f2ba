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
from ._parts import bind_block_arguments

__all__ = ["Adapter", "register_adapter", "list_adapters", "bank_from_model", "get_adapter"]

log = logging.getLogger("ordersearch")


@dataclass(frozen=True)
class Adapter:
    """How to split one model family into stem, blocks and head.

    Attributes:
        name: Registry name (``vit``, ``convmixer``, ...).
        matches: True for models this adapter handles.
        build: Returns the bank's parts as a dict with keys ``stem``, ``blocks``, ``head``,
            ``features`` (modules) and optional ``data_config``, ``source_orders``,
            ``block_at`` (see :class:`~ordersearch.Bank`) and ``bind_blocks`` (True: bind
            each block to the extra arguments its model passes it, see
            :func:`bind_block_arguments`; done here, once the input size is known).
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
    failures: list[str] = []
    for chosen in candidates:
        try:
            return _build(model, chosen, source=source, model_kwargs=model_kwargs, data_config=data_config,
                          source_orders=source_orders, verify=verify)
        except BankError as exc:
            if adapter or len(candidates) == 1:
                raise
            failures.append((chosen.name, str(exc)))
    if len({text for _, text in failures}) == 1:  # the model itself, whichever adapter
        raise BankError(failures[0][1])
    raise BankError(f"no adapter reproduces {type(model).__name__} ("
                    + "; ".join(f"{name!r}: {text}" for name, text in failures) + ")")


def _build(model: nn.Module, chosen: Adapter, **kwargs: Any) -> Bank:
    try:
        return _build_unchecked(model, chosen, **kwargs)
    except BankError:
        raise
    except Exception as exc:  # e.g. a forced adapter that expects other attributes
        raise BankError(f"adapter {chosen.name!r} does not fit {type(model).__name__}: {_short(exc)}") from exc


def _build_unchecked(model: nn.Module, chosen: Adapter, *, source: str | None, model_kwargs: dict[str, Any] | None,
                     data_config: dict[str, Any] | None, source_orders: dict[str, Any] | None, verify: bool) -> Bank:
    parts = chosen.build(model)
    config = dict(parts.get("data_config") or {})
    config.update(data_config or {})
    if "input_size" not in config:
        raise BankError(f"{type(model).__name__}: cannot tell the input size; pass data_config")
    if parts.get("bind_blocks"):
        parts["blocks"] = bind_block_arguments(model, torch.zeros(1, *config["input_size"]))
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


def _short(exc: Exception, limit: int = 120) -> str:
    text = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _spans(indices: list[int]) -> str:
    out, start = [], None
    for i, j in zip(indices, indices[1:] + [None]):
        start = i if start is None else start
        if j != i + 1:
            out.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ",".join(out)


def _check_shapes(bank: Bank) -> None:
    x = torch.randn(2, *bank.data_config["input_size"], generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        h = bank.stem(x)
        shape = tuple(h.shape[1:])
        found: dict[str, list[int]] = {}  # what a block did -> the blocks that did it
        for i, block in enumerate(bank.blocks):
            try:
                out_shape = tuple(block(h).shape[1:])
                what = f"{shape} -> {out_shape}"
                bad = out_shape != shape
            except Exception as exc:  # a block that cannot take another block's output
                what, bad = f"fail on input {shape}: {_short(exc)}", True
            found.setdefault(("!" if bad else "") + what, []).append(i)
    if any(k.startswith("!") for k in found):
        rows = [f"block{'s' if len(ix) > 1 else ''} {_spans(ix)}: {k.lstrip('!')}" for k, ix in found.items()]
        raise BankError(
            f"{type(bank.model).__name__} is not isometric: every block must map {shape} to "
            f"{shape}; found " + "; ".join(rows)
        )
    bank.data_config["block_shape"] = list(shape)


def _check_identity(bank: Bank, model: nn.Module) -> None:
    """The identity order must give the model's logits and its pooled (pre-logits)
    features: a zero-initialised head gives equal logits whatever the blocks do."""
    x = torch.randn(2, *bank.data_config["input_size"], generator=torch.Generator().manual_seed(1))
    checks = []
    with torch.inference_mode():
        if bank.head is not None:
            expected = model(x)
            if isinstance(expected, (tuple, list)):
                expected = expected[0]
            checks.append(("logits", bank(x), expected))
        if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
            checks.append(("pooled features", bank.embed(x),
                           model.forward_head(model.forward_features(x), pre_logits=True)))
    for what, got, expected in checks:
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
            diff = (f"max abs diff {(got - expected).abs().max().item():.3g}" if got.shape == expected.shape
                    else f"shape {tuple(got.shape)} vs {tuple(expected.shape)}")
            raise BankError(
                f"adapter {bank.adapter!r} does not reproduce {type(model).__name__}: the identity "
                f"order's {what} differ from the model's ({diff})"
            )
