"""``load_bank(source)``: a bank from text — a saved bank, ``timm:<name>``, ``isoresnet:...``."""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import pickle
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .._registry import parse_options
from ..bank import BANK_FORMAT, BANK_FORMAT_VERSION, Bank
from ..errors import BankError, one_line
from ._registry import bank_from_model

__all__ = ["load_bank", "build_source_model", "parse_model_args", "register_source"]

# scheme -> (build(source_text, **model_kwargs) -> model, canonical(model) -> text, example text)
_SOURCES: dict[str, tuple[Callable[..., torch.nn.Module], Callable[[torch.nn.Module], str] | None, str]] = {}


def register_source(
    scheme: str,
    build: Callable[..., torch.nn.Module],
    canonical: Callable[[torch.nn.Module], str] | None = None,
    *,
    example: str | None = None,
) -> None:
    """Teach :func:`load_bank` a new source scheme ``<scheme>:<settings>``.

    Args:
        scheme: Text before the colon (``isoresnet``, ``timm`` are built in).
        build: ``build(source_text) -> nn.Module`` with random weights; the caller seeds the
            RNG and loads checkpoints. Such sources take all their settings in the text, so
            :func:`load_bank` refuses ``model_kwargs`` for them.
        canonical: ``canonical(model) -> source text`` that rebuilds ``model`` exactly.
        example: Source text shown in error messages (default ``<scheme>:...``).
    """
    _SOURCES[scheme] = (build, canonical, example or f"{scheme}:...")

log = logging.getLogger("ordersearch")


def load_bank(
    source: str | Path | Bank,
    *,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    data_config: dict[str, Any] | None = None,
    seed: int | None = 0,
    verify: bool = True,
    **model_kwargs: Any,
) -> Bank:
    """Load a bank from a saved file or build one from a model source.

    Args:
        source: One of
            a saved bank (``bank.safetensors`` or the folder holding it);
            ``timm:<model name>`` (any timm isometric model, e.g. ``timm:vit_small_patch16_224``);
            ``isoresnet:width=32,blocks=6,classes=10`` (the project's own architecture).
        pretrained: timm only: load timm's pretrained weights (hub, or the file named by
            ``pretrained_cfg_overlay={"file": ...}``).
        checkpoint: A local weights file (``.safetensors``, or a ``torch.save`` file loaded
            with ``weights_only=True``) for the model.
        data_config: Overrides for input size, mean, std.
        seed: Seed for randomly initialised weights (no ``pretrained`` and no ``checkpoint``).
        verify: Check block shapes and that the identity order reproduces the model.
        **model_kwargs: Passed to ``timm.create_model`` (e.g. ``depth=4, img_size=64``).

    Example:
        >>> bank = load_bank("isoresnet:width=8,blocks=4,classes=10")
        >>> bank.n_blocks
        4
    """
    if isinstance(source, Bank):
        return source
    text = str(source)
    path = Path(text)
    if path.is_dir() and (path / "bank.safetensors").exists():
        path = path / "bank.safetensors"
    if path.suffix == ".safetensors" or path.exists():
        if model_kwargs or pretrained or checkpoint:
            raise BankError("a saved bank takes no model arguments, pretrained weights or checkpoint "
                            "(--model-arg, --pretrained, --checkpoint; Python: model kwargs, pretrained=, checkpoint=)")
        return _load_saved(path, data_config=data_config, verify=verify)
    model = build_source_model(text, pretrained=pretrained, checkpoint=checkpoint, seed=seed, **model_kwargs)
    bank = bank_from_model(
        model, source=_canonical(text, model), model_kwargs=model_kwargs, data_config=data_config, verify=verify
    )
    bank.weights = {"pretrained": bool(pretrained), "seed": seed}
    if checkpoint is not None:
        bank.weights.update(checkpoint=str(checkpoint), checkpoint_sha256=file_sha256(Path(checkpoint)))
    return bank


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (checkpoints recorded in order specs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parse_model_args(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["img_size=64", "depth=4", "global_pool=avg"]`` -> model keyword arguments (values
    read as JSON when they parse, else kept as text), for ``--model-arg`` on the command line."""
    return parse_options(items, lambda item: BankError(f"model argument {item!r} is not KEY=VALUE (e.g. img_size=64)"))


def _canonical(text: str, model: torch.nn.Module) -> str:
    entry = _SOURCES.get(text.partition(":")[0])
    if entry is not None and entry[1] is not None:
        return entry[1](model)
    return text


def build_source_model(
    source: str,
    *,
    pretrained: bool = False,
    checkpoint: str | Path | None = None,
    seed: int | None = 0,
    **model_kwargs: Any,
) -> torch.nn.Module:
    """The ``nn.Module`` named by a source string, with weights loaded as asked.

    Weights not loaded (all of them without ``pretrained`` or ``checkpoint``; a classifier
    that timm re-initialises because ``num_classes`` differs from the pretrained one) are drawn
    from ``seed`` in a forked RNG, so the same call builds the same model and the caller's
    random state is left alone."""
    if seed is None:
        return _build(source, pretrained=pretrained, checkpoint=checkpoint, **model_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(source, pretrained=pretrained, checkpoint=checkpoint, **model_kwargs)


_WEIGHT_FILES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


@contextlib.contextmanager
def _hub_weights(name: str, kwargs: dict[str, Any], pretrained: bool, *, timeout: float = 3.0) -> Iterator[None]:
    """Before timm asks the Hugging Face hub for pretrained weights: when they are in the local
    cache and the hub cannot be reached, load them from the cache at once (no retries); when
    they are in neither, fail in one line (offline, timm retried for ~50 s and printed 45
    lines before its error)."""
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if not pretrained or overlay.get("file") or overlay.get("state_dict"):
        yield
        return
    from huggingface_hub import constants, try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    hub_id = getattr(get_pretrained_cfg(name), "hf_hub_id", None)
    if not hub_id:  # a plain URL: timm's own download, which fails fast
        yield
        return
    repo, _, revision = hub_id.partition("@")
    cached = any(isinstance(try_to_load_from_cache(repo, f, revision=revision or None), str) for f in _WEIGHT_FILES)
    offline = constants.HF_HUB_OFFLINE or not _reachable(constants.ENDPOINT, timeout)
    if offline and not cached:
        raise BankError(
            f"timm's pretrained weights for {name} are not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) and the hub cannot be reached; pass the weights as a file "
            "(--checkpoint FILE, Python: checkpoint=) or put them in that cache")
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _reachable(url: str, timeout: float) -> bool:
    """True if a TCP connection to ``url``'s host opens within ``timeout`` seconds."""
    import socket
    from urllib.parse import urlparse

    parts = urlparse(url)
    try:
        with socket.create_connection((parts.hostname or "", parts.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _build(source: str, *, pretrained: bool, checkpoint: str | Path | None, **model_kwargs: Any) -> torch.nn.Module:
    scheme, _, name = source.partition(":")
    if scheme == "timm":
        if not name:
            raise BankError("timm source needs a model name, e.g. timm:vit_small_patch16_224")
        import timm

        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
            raise BankError(f"timm has no model {name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
        kwargs = dict(model_kwargs)
        if checkpoint is not None:
            checkpoint = Path(checkpoint)
            if not checkpoint.is_file():
                raise BankError(f"checkpoint {checkpoint} does not exist")
            kwargs["checkpoint_path"] = str(checkpoint)  # timm loads it with weights_only=True
        try:
            with _quiet_unpickler(), _hub_weights(name, kwargs, pretrained and checkpoint is None):
                return timm.create_model(name, pretrained=pretrained, **kwargs).eval()
        except pickle.UnpicklingError:
            raise BankError(_refused(checkpoint)) from None
        except (OSError, RuntimeError, TypeError) as exc:
            if checkpoint is not None and "weights_only" in str(exc):  # timm re-raises torch's refusal
                raise BankError(_refused(checkpoint)) from None
            what = "pretrained weights" if pretrained else "the model"
            raise BankError(f"timm could not create {name} with {what}: {one_line(exc)}") from None
    if scheme in _SOURCES:
        if pretrained:
            raise BankError(f"{scheme} has no pretrained weights; pass a checkpoint (--checkpoint FILE, Python: "
                          "checkpoint=) or train one")
        build, _, example = _SOURCES[scheme]
        if model_kwargs:
            raise BankError(f"{scheme} takes its settings in the source text, e.g. {example}")
        model = build(source)
        if checkpoint is not None:
            _load_weights(model, Path(checkpoint))
        return model.eval()
    raise BankError(
        f"unknown bank source {source!r}: expected a saved bank file or folder, timm:<model name>"
        + "".join(f", {example}" for _, _, example in _SOURCES.values())
    )


def _refused(path: Path | str | None) -> str:
    return (f"checkpoint {path} holds pickled objects other than tensors; not loaded, since loading them "
            "could run code: save a state_dict (torch.save(model.state_dict(), ...)) or a .safetensors file")


@contextlib.contextmanager
def _quiet_unpickler() -> Iterator[None]:
    """torch.load(weights_only=True) warns about the pickle protocol before refusing a file:
    the refusal alone is the message."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
        yield



def _load_weights(model: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise BankError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            with _quiet_unpickler():
                state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise BankError(_refused(path)) from None
        if isinstance(state, dict):
            for key in ("state_dict", "model"):
                if isinstance(state.get(key), dict):
                    state = state[key]
                    break
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise BankError(f"checkpoint {path} does not fit the model: {one_line(exc)}") from None


def read_bank_header(path: Path) -> dict[str, Any]:
    """The JSON header stored in a saved bank's safetensors metadata."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except FileNotFoundError:
        raise BankError(f"bank file {path} does not exist") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise BankError(f"{path} is not a readable safetensors bank ({one_line(exc)})") from None
    if "ordersearch" not in meta:
        raise BankError(f"{path} is a safetensors file but not an ordersearch bank (no header)")
    try:
        header = json.loads(meta["ordersearch"])
    except json.JSONDecodeError:
        raise BankError(f"{path}: the bank header is not valid JSON") from None
    if not isinstance(header, dict):
        raise BankError(f"{path}: the bank header is a JSON {type(header).__name__}, not an object")
    if header.get("format") != BANK_FORMAT:
        raise BankError(f"{path}: format {header.get('format')!r} is not {BANK_FORMAT!r}")
    version = header.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BankError(f"{path}: bank format version {version!r} is not a positive integer")
    for key, kind in (("source", str), ("model_kwargs", dict), ("data_config", dict), ("source_orders", dict)):
        if key in header and header[key] is not None and not isinstance(header[key], kind):
            raise BankError(f"{path}: the bank header's {key!r} is a JSON {type(header[key]).__name__}, "
                            f"expected {'a string' if kind is str else 'an object'}")
    if not header.get("source"):
        raise BankError(f"{path}: the bank header names no source model")
    if version > BANK_FORMAT_VERSION:
        raise BankError(
            f"{path}: bank format version {header['version']} is newer than this ordersearch "
            f"understands ({BANK_FORMAT_VERSION}); upgrade ordersearch"
        )
    return header


def _load_saved(path: Path, *, data_config: dict[str, Any] | None, verify: bool) -> Bank:
    from safetensors.torch import load_model

    header = read_bank_header(path)
    model = build_source_model(header["source"], seed=None, **header.get("model_kwargs", {}))
    try:
        load_model(model, str(path), strict=True)
    except RuntimeError as exc:
        raise BankError(f"{path}: weights do not fit {header['source']}: {one_line(exc)}") from None
    config = dict(header.get("data_config") or {})
    config.update(data_config or {})
    bank = bank_from_model(
        model.eval(),
        adapter=header.get("adapter"),
        source=header["source"],
        model_kwargs=header.get("model_kwargs"),
        data_config=config,
        source_orders=header.get("source_orders"),
        verify=verify,
    )
    if header.get("fingerprint") and bank.fingerprint != header["fingerprint"]:
        raise BankError(f"{path}: weights do not match the fingerprint in the header (file altered?)")
    # banks saved before the digest existed have only the block fingerprint
    if header.get("digest") and not data_config and bank.digest != header["digest"]:
        raise BankError(f"{path}: weights or data config do not match the digest in the header (file altered?)")
    bank.path = str(path)
    log.info("loaded bank %s from %s", bank.describe_source(), path)
    return bank
