"""``EngineConfig``: the engine's settings as one typed value, from the CLI to the engine."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from ..errors import SearchError

__all__ = ["EngineConfig"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    """How candidate orders are scored: where, in what precision, with which statistics and cache.

    Args:
        device: ``cpu``, ``cuda`` or ``cuda:N`` (None: CUDA when available, else CPU).
        dtype: ``float32``, ``bfloat16`` or ``float16`` (None: float32 on CPU, bfloat16 on CUDA).
        norm: ``source`` keeps the bank's BatchNorm statistics; ``target`` re-estimates them on
            the scored images per order prefix (AdaBN).
        cache_bytes: Byte budget of cached prefix activations.
        batch_size: Images per block forward (None: 64 on CPU, 512 on CUDA).
        policy: Cache eviction policy, ``gdsf`` or ``lru``.

    Example:
        >>> import ordersearch, torch
        >>> from ordersearch.evalset import EvalSet
        >>> bank = ordersearch.load_bank("isoresnet:width=8,blocks=3,classes=10")
        >>> engine = EngineConfig(norm="target", cache_bytes=2**24).build(bank, EvalSet(torch.randn(8, 1, 16, 16)), "infomax")
        >>> engine.norm
        'target'
    """

    device: str | None = None
    dtype: str | None = None
    norm: Literal["source", "target"] = "source"
    cache_bytes: int = 512 * 2**20
    batch_size: int | None = None
    policy: str = "gdsf"

    def __post_init__(self) -> None:
        if self.norm not in ("source", "target"):
            raise SearchError(f"norm must be source or target, got {self.norm!r}")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise SearchError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.cache_bytes, int) or self.cache_bytes < 0:
            raise SearchError(f"the cache budget must be 0 or more bytes, got {self.cache_bytes}")
        if self.batch_size is not None and self.batch_size < 1:
            raise SearchError(f"the engine's batch size must be >= 1 image, got {self.batch_size}")
        if self.policy not in ("gdsf", "lru"):
            raise SearchError(f"cache policy must be gdsf or lru, got {self.policy!r}")
        if self.device is not None:
            try:
                device = torch.device(self.device)
            except RuntimeError:
                raise SearchError(f"device {self.device!r} is not a torch device (cpu, cuda, cuda:1)") from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise SearchError(f"device {self.device!r}: no CUDA device is available here; use cpu")

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None if self.dtype is None else _DTYPES[self.dtype]

    def build(self, bank: Any, evalset: Any, objective: Any) -> Any:
        """A new :class:`~ordersearch.engine.Engine` with these settings."""
        from ._engine import Engine

        return Engine(bank, evalset, objective, cache_bytes=self.cache_bytes, device=self.device,
                      batch_size=self.batch_size, dtype=self.torch_dtype, norm=self.norm, policy=self.policy)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
