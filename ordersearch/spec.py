"""Order specs: the JSON file a search produces and that rebuilds its model.

The schema ships with the package (``ordersearch/schema/order_spec.v1.json``).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ._io import write_atomic
from .bank import Bank
from .errors import OrderError, SpecError
from .order import Order

__all__ = ["OrderSpec", "bank_description", "save_order", "write_atomic", "load_order", "SPEC_SCHEMA", "SPEC_VERSION", "spec_schema"]

SPEC_SCHEMA = "ordersearch.order_spec"
SPEC_VERSION = 1
_KNOWN = ("objective", "score", "metrics", "searcher", "study", "data")


def spec_schema(version: int = SPEC_VERSION) -> dict[str, Any]:
    """The JSON schema of spec ``version``, as shipped in the package."""
    text = resources.files("ordersearch").joinpath(f"schema/order_spec.v{version}.json").read_text()
    return json.loads(text)


@dataclass(frozen=True)
class OrderSpec:
    """A loaded order spec.

    Attributes:
        order: The order.
        bank: What the order was found for: ``source``, ``adapter``, ``fingerprint``,
            ``n_blocks`` and, for saved banks, ``path``.
        objective, score, metrics, searcher, study, data: How it was found and scored.
        created: ISO creation time.
        metadata: Anything else saved with it.
    """

    order: Order
    bank: dict[str, Any]
    objective: str | None = None
    score: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    searcher: str | None = None
    study: str | None = None
    data: Any = None
    created: str = ""
    version: int = SPEC_VERSION
    metadata: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    def load_bank(self) -> Bank:
        """Load the bank this spec names: its saved file if one is recorded, else its source
        rebuilt with the recorded weights (timm's pretrained weights, a checkpoint whose
        sha256 must match, or the seed of a random initialisation)."""
        from .adapters import file_sha256, load_bank

        info, where = self.bank, self.path or "order spec"
        if info.get("path"):
            if not Path(info["path"]).exists():
                raise SpecError(f"{where}: its bank file {info['path']} does not exist; pass the bank (--bank)")
            bank = load_bank(info["path"])
        elif info.get("source"):
            weights = dict(info.get("weights") or {})
            checkpoint = weights.get("checkpoint")
            if checkpoint is not None:
                if not Path(checkpoint).is_file():
                    raise SpecError(f"{where}: its checkpoint {checkpoint} does not exist; pass the bank (--bank)")
                if weights.get("checkpoint_sha256") and file_sha256(Path(checkpoint)) != weights["checkpoint_sha256"]:
                    raise SpecError(f"{where}: checkpoint {checkpoint} has changed since the spec was written (sha256)")
            bank = load_bank(info["source"], pretrained=bool(weights.get("pretrained")), checkpoint=checkpoint,
                             seed=weights.get("seed", 0), **dict(info.get("model_kwargs") or {}))
        else:
            raise SpecError(f"{where}: the bank was an in-memory model; pass the bank to load_order")
        check_bank(self, bank)
        return bank

    def build_model(self, bank: Bank | None = None):
        """The rebuilt ``nn.Module`` (see :func:`ordersearch.build_model`)."""
        from .build import build_model

        bank = bank if bank is not None else self.load_bank()
        check_bank(self, bank)
        return build_model(bank, self.order)

    def to_json(self) -> dict[str, Any]:
        return _spec_dict(
            self.bank, self.order, self.created, {
                "objective": self.objective, "score": self.score, "metrics": self.metrics,
                "searcher": self.searcher, "study": self.study, "data": self.data, **self.metadata,
            }
        )


def save_order(path: str | Path, bank: Bank | Mapping[str, Any], order: Order | str | list[int], **metadata: Any) -> Path:
    """Write an order spec for ``order`` on ``bank``: the one writer of order specs.

    Args:
        path: Output JSON file (parents are created; written atomically).
        bank: The bank the order runs on, or its :func:`bank_description` (as a study keeps
            it): its source, the arguments and weights that rebuild it and its fingerprint
            are recorded.
        order: The order.
        **metadata: ``objective``, ``score``, ``metrics`` (dict), ``searcher``, ``study``,
            ``data`` (a data spec string or description dict); anything else is kept
            under ``metadata``.

    Example:
        >>> import tempfile, ordersearch
        >>> bank = ordersearch.load_bank("isoresnet:width=8,blocks=3,classes=10")
        >>> p = save_order(tempfile.mkdtemp() + "/best.json", bank, "2-1-1", score=0.9)
        >>> load_order(p, bank).order
        Order('2-1-1')
    """
    info = bank_description(bank) if isinstance(bank, Bank) else dict(bank)
    if not isinstance(info.get("n_blocks"), int) or not info.get("fingerprint"):
        raise SpecError("a bank description needs n_blocks and fingerprint")
    order = Order.parse(order).validate(info["n_blocks"], min_len=0)
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    doc = _spec_dict(info, order, created, metadata)
    return write_atomic(path, _dumps(doc) + "\n")


def bank_description(bank: Bank) -> dict[str, Any]:
    """What a spec (and a study) records of a bank: its source, the arguments and weights that
    rebuild it (``model_kwargs``; ``weights``: pretrained, checkpoint and sha256, or the
    seed), its saved file if any, and the fingerprint that identifies it."""
    return {
        "source": bank.source,
        "model_kwargs": _finite(dict(bank.model_kwargs)),
        "weights": _finite(dict(getattr(bank, "weights", {}) or {})),
        "path": getattr(bank, "path", None),
        "adapter": bank.adapter,
        "fingerprint": bank.fingerprint,
        "n_blocks": bank.n_blocks,
    }


def _dumps(doc: dict[str, Any]) -> str:
    """Indented JSON with the order kept on one line (``"order": [0, 1, 1, 3]``)."""
    marker = "@@ORDER@@"
    text = json.dumps({**doc, "order": marker}, indent=2, allow_nan=False)
    return text.replace(f'"{marker}"', json.dumps(doc["order"]))


def _spec_dict(bank_info: dict[str, Any], order: Order, created: str, metadata: dict[str, Any]) -> dict[str, Any]:
    from . import __version__

    score = metadata.get("score")
    if score is not None:
        score = float(score)
        if not math.isfinite(score):
            score = None
    extra = {k: v for k, v in metadata.items() if k not in _KNOWN}
    return {
        "schema": SPEC_SCHEMA,
        "version": SPEC_VERSION,
        "bank": bank_info,
        "order": order.to_list(),
        "order_text": str(order),
        "depth": len(order),
        "objective": metadata.get("objective"),
        "score": score,
        "metrics": _finite(dict(metadata.get("metrics") or {})),
        "searcher": metadata.get("searcher"),
        "study": metadata.get("study"),
        "data": metadata.get("data"),
        "created": created,
        "ordersearch_version": __version__,
        "metadata": _finite(extra),
    }


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _finite(value.item())
    if isinstance(value, Path):
        return str(value)
    return value


def load_order(path: str | Path, bank: Bank | None = None) -> OrderSpec:
    """Read an order spec; with ``bank``, also check it was made for that bank.

    Raises:
        SpecError: one line naming the problem: missing or truncated file, not a spec,
            a newer schema version, ids out of range, or a different bank.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"order spec {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"order spec {path} is not text (byte {exc.start} is not UTF-8): not a spec") from None
    except OSError as exc:
        raise SpecError(f"cannot read order spec {path}: {exc.strerror}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        what = "truncated or not JSON" if exc.pos >= len(text.rstrip()) - 1 else "not valid JSON"
        raise SpecError(f"order spec {path} is {what} (line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SPEC_SCHEMA:
        raise SpecError(f"{path} is not an ordersearch order spec (no \"schema\": \"{SPEC_SCHEMA}\")")
    version = doc.get("version")
    if not isinstance(version, int) or version < 1:
        raise SpecError(f"order spec {path}: version {version!r} is not a positive integer")
    if version > SPEC_VERSION:
        raise SpecError(
            f"order spec {path} has schema version {version}, newer than this ordersearch reads "
            f"({SPEC_VERSION}); upgrade ordersearch"
        )
    for key in ("bank", "order"):
        if key not in doc:
            raise SpecError(f"order spec {path} has no {key!r} field")
    info = doc["bank"]
    if not isinstance(info, dict) or not isinstance(info.get("n_blocks"), int) or not info.get("fingerprint"):
        raise SpecError(f"order spec {path}: the 'bank' field needs n_blocks and fingerprint")
    if not isinstance(doc["order"], list):
        raise SpecError(f"order spec {path}: 'order' must be a list of block ids")
    try:
        order = Order(doc["order"]).validate(info["n_blocks"], min_len=0)
    except OrderError as exc:
        raise SpecError(f"order spec {path}: {exc}") from None
    known = set(_KNOWN) | {"schema", "version", "bank", "order", "order_text", "depth", "created",
                           "ordersearch_version", "metadata"}
    spec = OrderSpec(
        order=order,
        bank=info,
        objective=doc.get("objective"),
        score=doc.get("score"),
        metrics=doc.get("metrics") or {},
        searcher=doc.get("searcher"),
        study=doc.get("study"),
        data=doc.get("data"),
        created=doc.get("created", ""),
        version=version,
        metadata={**(doc.get("metadata") or {}), **{k: v for k, v in doc.items() if k not in known}},
        path=str(path),
    )
    if bank is not None:
        check_bank(spec, bank)
    return spec


def check_bank(spec: OrderSpec, bank: Bank) -> None:
    """Raise :class:`SpecError` unless ``bank`` is the bank ``spec`` was made for."""
    where = spec.path or "order spec"
    if bank.n_blocks != spec.bank["n_blocks"]:
        raise SpecError(
            f"{where} was made for a bank of {spec.bank['n_blocks']} blocks, this bank has {bank.n_blocks}"
        )
    try:
        spec.order.validate(bank.n_blocks, min_len=0)
    except OrderError as exc:
        raise SpecError(f"{where}: {exc}") from None
    if bank.fingerprint != spec.bank["fingerprint"]:
        raise SpecError(
            f"{where} was made for bank {spec.bank.get('source') or spec.bank.get('adapter')} "
            f"(fingerprint {spec.bank['fingerprint'][:12]}), not this one ({bank.fingerprint[:12]}): "
            "different weights"
        )
