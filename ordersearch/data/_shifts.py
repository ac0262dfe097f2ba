"""Named domain shifts: seeded, vectorised image transforms that turn one dataset into a new
domain (rotated, inverted, noisy, blurred, zoomed, thicker or thinner strokes, ...).

Every shift maps a batch of images ``x`` (N, C, H, W) with values in [0, 1] to a batch of the
same shape with values in [0, 1]. Shifts compose in the order they are written, and all the
randomness of a chain comes from one generator seeded once, so a chain equals its shifts
applied one after another with that generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import DataError

__all__ = ["Shift", "SHIFTS", "register_shift", "apply_shifts", "describe_shifts"]

ShiftFn = Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class Shift:
    """One named shift and the single number that parametrises it.

    Attributes:
        name: Name used in data specs (``digits:<name>=<value>``).
        fn: ``fn(x, value, generator) -> x`` on (N, C, H, W) images in [0, 1].
        param: What the value means, with its unit (shown in listings and errors).
        low: Smallest allowed value.
        high: Largest allowed value.
        default: Value used when the shift is written without one (``invert``), or None
            if a value is required.
        identity: The value at which the shift leaves images unchanged.
        random: Whether the shift draws random numbers (then the spec's ``seed`` matters).
    """

    name: str
    fn: ShiftFn
    param: str
    low: float
    high: float
    default: float | None = None
    identity: float | None = None
    random: bool = False

    def check(self, value: float) -> float:
        """``value`` as a float, or a DataError that names the allowed range."""
        value = float(value)
        if not (math.isfinite(value) and self.low <= value <= self.high):
            raise DataError(
                f"{self.name}={_fmt(value)} is out of range: {self.name} takes {self.param} "
                f"in {_fmt(self.low)}..{_fmt(self.high)}"
            )
        return value

    def usage(self) -> str:
        """One line for listings: ``name=VALUE  param (low..high[, default d])``."""
        extra = f", default {_fmt(self.default)}" if self.default is not None else ""
        return f"{self.name}: {self.param} ({_fmt(self.low)}..{_fmt(self.high)}{extra})"

    def __call__(self, x: torch.Tensor, value: float, generator: torch.Generator | None = None) -> torch.Tensor:
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        return self.fn(x, self.check(value), g).clamp_(0.0, 1.0)


SHIFTS: dict[str, Shift] = {}
"""The registry of named shifts, in the order they were registered."""


def register_shift(
    name: str,
    *,
    param: str,
    low: float,
    high: float,
    default: float | None = None,
    identity: float | None = None,
    random: bool = False,
) -> Callable[[ShiftFn], ShiftFn]:
    """Register ``fn(x, value, generator)`` as the shift ``name`` (decorator).

    The function receives images (N, C, H, W) in [0, 1] and must return a tensor of the
    same shape; values are clamped to [0, 1] afterwards. It must draw random numbers only
    from ``generator`` so that data specs stay reproducible.

    Example:
        >>> @register_shift("darken", param="factor", low=0, high=1, identity=1)
        ... def _darken(x, value, generator):
        ...     return x * value
        >>> "darken" in SHIFTS
        True
        >>> _ = SHIFTS.pop("darken")
    """
    if not name.isidentifier() or name in SHIFTS:
        raise ValueError(f"shift name {name!r} is not an identifier or is already registered")

    def wrap(fn: ShiftFn) -> ShiftFn:
        SHIFTS[name] = Shift(name, fn, param, float(low), float(high), default, identity, random)
        return fn

    return wrap


def apply_shifts(
    x: torch.Tensor,
    shifts: Iterable[tuple[str, float]] | str,
    *,
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Apply named shifts to images, in order.

    Args:
        x: Images (N, C, H, W) or (N, H, W) with values in [0, 1]; not modified.
        shifts: ``(name, value)`` pairs, or their text form ``"rotate=30,noise=0.2"``.
        seed: Seed of the one generator that every random shift of the chain draws from.
        generator: Use this generator instead of one seeded with ``seed``.

    Returns:
        A new tensor of the same shape, values in [0, 1].

    Example:
        >>> x = torch.rand(4, 1, 32, 32)
        >>> y = apply_shifts(x, "rotate=30,noise=0.1", seed=1)
        >>> y.shape, bool(y.min() >= 0 and y.max() <= 1)
        (torch.Size([4, 1, 32, 32]), True)
    """
    if isinstance(shifts, str):
        from ._spec import parse_shifts

        shifts = parse_shifts(shifts)
    squeeze = x.ndim == 3
    out = x.unsqueeze(1) if squeeze else x
    if out.ndim != 4:
        raise DataError(f"shifts need images of shape (N, C, H, W) or (N, H, W), got {tuple(x.shape)}")
    out = out.float().clone()
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    for name, value in shifts:
        out = get_shift(name)(out, value, g)
    return out.squeeze(1) if squeeze else out


def get_shift(name: str) -> Shift:
    """The registered shift ``name``, or a DataError listing the known ones."""
    try:
        return SHIFTS[name]
    except KeyError:
        raise DataError(f"unknown shift {name!r}; shifts: {', '.join(SHIFTS)}") from None


def describe_shifts() -> str:
    """One line per registered shift: its name, parameter, range and default."""
    return "\n".join(s.usage() for s in SHIFTS.values())


def _fmt(v: float | None) -> str:
    return "none" if v is None else format(float(v), ".12g")


# --- geometry -------------------------------------------------------------------------------
def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample ``x`` (N, C, H, W) with one 2x3 affine map in normalised coordinates; pixels
    from outside the image are 0 (torchvision's default fill)."""
    n = x.shape[0]
    grid = F.affine_grid(theta.expand(n, 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@register_shift("rotate", param="angle in degrees, counter-clockwise", low=-360, high=360, identity=0)
def _rotate(x: torch.Tensor, degrees: float, g: torch.Generator) -> torch.Tensor:
    h, w = x.shape[-2:]
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    # affine_grid maps output to input coordinates in [-1, 1] per axis; the aspect terms keep
    # non-square images rotating rigidly, and the sign makes positive angles counter-clockwise
    # on screen (y points down)
    theta = torch.tensor([[c, -s * h / w, 0.0], [s * w / h, c, 0.0]], dtype=x.dtype)
    return _affine(x, theta)


@register_shift("scale", param="zoom factor about the centre (>1 zooms in)", low=0.1, high=10, identity=1)
def _scale(x: torch.Tensor, factor: float, g: torch.Generator) -> torch.Tensor:
    theta = torch.tensor([[1 / factor, 0.0, 0.0], [0.0, 1 / factor, 0.0]], dtype=x.dtype)
    return _affine(x, theta)


@register_shift("shiftx", param="horizontal translation as a fraction of the width (>0 moves right)",
                low=-1, high=1, identity=0)
def _shiftx(x: torch.Tensor, frac: float, g: torch.Generator) -> torch.Tensor:
    theta = torch.tensor([[1.0, 0.0, -2 * frac], [0.0, 1.0, 0.0]], dtype=x.dtype)
    return _affine(x, theta)


@register_shift("shifty", param="vertical translation as a fraction of the height (>0 moves down)",
                low=-1, high=1, identity=0)
def _shifty(x: torch.Tensor, frac: float, g: torch.Generator) -> torch.Tensor:
    theta = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, -2 * frac]], dtype=x.dtype)
    return _affine(x, theta)


# --- intensity ------------------------------------------------------------------------------
@register_shift("invert", param="strength (1 maps v to 1-v)", low=0, high=1, default=1, identity=0)
def _invert(x: torch.Tensor, strength: float, g: torch.Generator) -> torch.Tensor:
    return x + strength * (1 - 2 * x)


@register_shift("contrast", param="factor about mid-grey 0.5 (<1 lowers contrast)", low=0, high=10, identity=1)
def _contrast(x: torch.Tensor, factor: float, g: torch.Generator) -> torch.Tensor:
    # a fixed midpoint rather than the image mean: digits are mostly background, and a
    # per-image mean would make the shift depend on how much ink a digit has
    return 0.5 + factor * (x - 0.5)


@register_shift("noise", param="std of additive gaussian noise on the [0, 1] scale", low=0, high=1,
                identity=0, random=True)
def _noise(x: torch.Tensor, std: float, g: torch.Generator) -> torch.Tensor:
    return x + std * torch.randn(x.shape, generator=g, dtype=x.dtype)


@register_shift("blur", param="gaussian sigma in pixels of the working image", low=0, high=16, identity=0)
def _blur(x: torch.Tensor, sigma: float, g: torch.Generator) -> torch.Tensor:
    if sigma == 0:
        return x
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    n, c, h, w = x.shape
    y = x.reshape(n * c, 1, h, w)
    # separable: rows then columns; replicate padding keeps the border from darkening and
    # works for any radius (reflect needs the radius to be below the image size)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return y.reshape(n, c, h, w)


# --- strokes --------------------------------------------------------------------------------
def _morph(x: torch.Tensor, strength: float, dilate: bool) -> torch.Tensor:
    """Grey-level dilation (erosion) by ``strength`` 3x3 steps; a fractional strength blends
    the two nearest whole numbers of steps so that the shift is continuous in its value."""
    whole = math.floor(strength)
    frac = strength - whole
    y = x if dilate else -x  # erosion is the dilation of the negative
    steps = [y]
    for _ in range(whole + (1 if frac > 0 else 0)):
        steps.append(F.max_pool2d(steps[-1], 3, stride=1, padding=1))
    out = steps[whole] if frac == 0 else (1 - frac) * steps[whole] + frac * steps[whole + 1]
    return out if dilate else -out


@register_shift("thicken", param="growth of bright strokes, in pixels of the working image (grey dilation)",
                low=0, high=8, default=1, identity=0)
def _thicken(x: torch.Tensor, strength: float, g: torch.Generator) -> torch.Tensor:
    return _morph(x, strength, dilate=True)


@register_shift("thin", param="shrinkage of bright strokes, in pixels of the working image (grey erosion)",
                low=0, high=8, default=1, identity=0)
def _thin(x: torch.Tensor, strength: float, g: torch.Generator) -> torch.Tensor:
    return _morph(x, strength, dilate=False)

