"""MLKD's strong view: FixMatch-style ``RandAugment(2, 10)`` + Cutout on whole uint8 batches, on any device.

Reference: Jin et al., "Multi-Level Logit Distillation", CVPR 2023; official code
Jin-Ying/Multi-Level-Logit-Distillation, ``mdistiller/dataset/cifar100.py`` (``augment_list``,
``RandAugment.__call__``, ``Cutout``, ``CutoutAbs`` and the op functions), which applies, per PIL image on the CPU,
``RandomCrop(32, padding=4) -> RandomHorizontalFlip -> RandAugment(2, 10)``; the crop and flip are
:class:`kdbench.loader.DeviceLoader`'s.  The official ``RandAugment``:

- ``random.choices(augment_list(), k=2)``: two ops drawn uniformly *with replacement* from the 14 ops of :data:`OPS`;
- each op's value ``low + (high - low) * random.random()``, uniform in [low, high) (``m=10`` is unused);
- then ``Cutout(img, v)`` with ``v = random.random() * 0.5``: nothing when ``v == 0``, else ``CutoutAbs`` with a side of
  ``v * width`` pixels centred at ``np.random.uniform(w)``, which is uniform on (1, W], not [0, W) (``w`` is numpy's
  ``low``; see :func:`cutout`).

Here every draw comes from a ``torch.Generator`` (:func:`draw`), never Python's ``random``, so the same generator state
gives the same views, and :func:`rand_augment` applies them to a whole batch: the samples that drew an op are
transformed together, once per op and per step.

Agreement with Pillow (tests/test_augment.py checks every op against Pillow's own ``ImageOps``, ``ImageEnhance``,
``Image.transform``, ``Image.rotate`` and ``ImageDraw`` on random images, RGB and 1-channel, at the range ends and
inside): **every op and the cutout are bit-exact** on the CPU.  On CUDA the same integer, float32 and float64
element-wise kernels, gathers and exact integer reductions run, each rounded once as on the CPU, so the bits should be
the same; the gpu-marked test compares CUDA with the CPU (not yet run on a GPU when this was written).  That holds
because each op below redoes Pillow's own arithmetic (Pillow 13.0, ``src/libImaging`` and ``src/PIL``) instead of
a look-alike:

- AutoContrast: Pillow's LUT ``int(ix * scale + offset)`` with ``scale = 255.0 / (hi - lo)`` in float64, per channel.
- Brightness, Color, Contrast, Sharpness: ``ImageEnhance`` = ``Image.blend(degenerate, image, f)``, which Pillow
  computes as ``(UINT8)(in1 + (float)f * (in2 - in1))`` in float32 and truncates; reproduced with separate float32
  multiply and add kernels (no fused multiply-add).  The degenerate images are Pillow's: black; ``convert("L")`` with
  Pillow's integer luma ``(19595 R + 38470 G + 7471 B + 0x8000) >> 16``; a constant ``int(mean(L) + 0.5)``; the
  ``SMOOTH`` 3x3 filter (weights float32(1/13), float32(5/13), summed in Pillow's order from 0.5, truncated, border
  pixels copied).
- Equalize: torchvision's ``equalize`` (it builds Pillow's ``ImageOps.equalize`` LUT) on the whole group.
- Posterize: ``x & ~(2 ** (8 - int(v)) - 1)``, ``int(v)`` clamped to >= 1 as the official op does.
- Solarize: ``255 - x`` where ``x >= v`` (Pillow's LUT ``i < threshold``), compared exactly for any float threshold in
  [0, 256].
- Rotate, ShearX/Y, TranslateX/Y: Pillow's nearest-neighbour ``AFFINE`` transform, black fill: a matrix with
  ``a[1] == a[3] == 0`` goes through ``ImagingScaleAffine`` (source column ``COORD(a[2] + a[0] / 2 + x a[0])``
  accumulated in float64, as Pillow does), any other through ``affine_fixed`` (16.16 fixed point,
  ``FIX(v) = floor(v * 65536 + 0.5)``, source ``(a2 + x a0 + y a1) >> 16``); both are reproduced as an integer
  gather.  ``Image.rotate`` builds its matrix in Python (``round(cos, 15)`` etc.), which is redone here with the same
  Python float operations; its fast paths for 0, 90, 180 and 270 degrees are exact transposes.

Why not torchvision's tensor functionals (``torchvision.transforms.v2.functional``), measured against Pillow on 500
random RGB 32x32 images per op, values uniform in the op's range: ``autocontrast`` (float32 ``(x - lo) / ((hi - lo) /
255)``) is off by 1 level on 16% of the values, ``adjust_saturation`` (float luma weights, rounded) by 1 on 25%,
``adjust_contrast`` (unrounded float mean) by 1 on 27%, ``rotate`` (``grid_sample`` in float32 instead of Pillow's
16.16 fixed point) moves 0.01% of the values (any level), ``solarize`` compares in float32 and rejects a threshold of
256.  ``adjust_brightness``, ``adjust_sharpness``, ``posterize``, ``equalize`` and ``affine`` (shear with
``shear=degrees(atan(v))``, ``center=[0, 0]``; translate) matched Pillow there, but all except ``equalize`` take one
scalar per call, i.e. one call per sample; the broadcast versions here are batched and exact by construction.

Where the tensor version differs from the official pipeline (not from Pillow): (1) the random numbers come from a
``torch.Generator``, so the views have the official distribution but not its stream; (2) one-channel images
(Fashion-MNIST, stored as ``L``) have no official counterpart: Color is the identity there, as it is for an ``L`` image
in Pillow, and the cutout fill is the Pillow luma of the RGB fill (123 for ``(125, 123, 114)``; see :func:`cutout`).

Cost: every op works on the group of samples that drew it, with per-sample magnitudes by broadcasting; the only
per-sample Python work is building each affine op's matrix (a few float operations) and, for the two translations
(Pillow's ``ImagingScaleAffine``), a table of ``H + W`` source coordinates accumulated as Pillow does.  A batch of 64
RGB 32x32 images took about 3.4 ms on one thread of a busy 2-core CPU, about what Pillow takes image by image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

#: The official ``augment_list()``: (name, low, high), in its order; an op's value is uniform in [low, high).
OPS: tuple[tuple[str, float, float], ...] = (
    ("AutoContrast", 0.0, 1.0),
    ("Brightness", 0.05, 0.95),
    ("Color", 0.05, 0.95),
    ("Contrast", 0.05, 0.95),
    ("Equalize", 0.0, 1.0),
    ("Identity", 0.0, 1.0),
    ("Posterize", 4.0, 8.0),
    ("Rotate", -30.0, 30.0),
    ("Sharpness", 0.05, 0.95),
    ("ShearX", -0.3, 0.3),
    ("ShearY", -0.3, 0.3),
    ("Solarize", 0.0, 256.0),
    ("TranslateX", -0.3, 0.3),
    ("TranslateY", -0.3, 0.3),
)
OP_NAMES: tuple[str, ...] = tuple(name for name, _, _ in OPS)
#: ``CutoutAbs``'s fill colour.
CUTOUT_FILL: tuple[int, int, int] = (125, 123, 114)
#: Cutout side as a fraction of the image width: uniform in [0, MAX_CUTOUT).
MAX_CUTOUT = 0.5


@dataclass(frozen=True)
class RandAugmentParams:
    """One strong view per sample, as CPU tensors (see :func:`draw`).

    - ``ops``: int64 [n, k], indices into :data:`OPS`, applied in column order;
    - ``magnitudes``: float64 [n, k], each uniform in its op's [low, high);
    - ``cutout``: float64 [n], the cutout side as a fraction of the image width, uniform in [0, 0.5);
    - ``cutout_centre``: float64 [n, 2], the uniforms (u_x, u_y) in [0, 1) that place the cutout centre at
      ``(W + (1 - W) u_x, H + (1 - H) u_y)`` pixels, as the official ``np.random.uniform(w)`` does (see :func:`cutout`).
    """

    ops: torch.Tensor
    magnitudes: torch.Tensor
    cutout: torch.Tensor
    cutout_centre: torch.Tensor

    def __post_init__(self):
        n = self.ops.shape[0]
        if (self.ops.dim() != 2 or self.magnitudes.shape != self.ops.shape or self.cutout.shape != (n,)
                or self.cutout_centre.shape != (n, 2)):
            raise ValueError(f"inconsistent RandAugment parameters: ops {tuple(self.ops.shape)}, magnitudes "
                             f"{tuple(self.magnitudes.shape)}, cutout {tuple(self.cutout.shape)}, cutout_centre "
                             f"{tuple(self.cutout_centre.shape)}")

    def take(self, index: torch.Tensor) -> "RandAugmentParams":
        """The parameters of the samples at ``index`` (a CPU index tensor), in its order: a batch's rows of an
        epoch's draws, which are made per dataset index (kdbench.loader)."""
        return RandAugmentParams(self.ops[index], self.magnitudes[index], self.cutout[index], self.cutout_centre[index])

    def __len__(self) -> int:
        return self.ops.shape[0]


def draw(generator: torch.Generator, n: int, ops: int = 2) -> RandAugmentParams:
    """Draw ``n`` strong views from ``generator`` (a CPU ``torch.Generator``), as the official ``RandAugment(2, 10)``:
    ``ops`` op indices uniform over :data:`OPS` with replacement (``random.choices``), each magnitude
    ``low + (high - low) * U``, the cutout fraction ``0.5 * U`` and the two centre uniforms; U uniform in [0, 1) in
    float64.  The draws come in that order (op indices, magnitudes, cutout, centre), so the same generator state gives
    the same parameters."""
    if n < 0 or ops < 0:
        raise ValueError(f"need n >= 0 and ops >= 0, got n={n}, ops={ops}")
    op_idx = torch.randint(0, len(OPS), (n, ops), generator=generator)
    low = torch.tensor([lo for _, lo, _ in OPS], dtype=torch.float64)
    high = torch.tensor([hi for _, _, hi in OPS], dtype=torch.float64)
    u = torch.rand((n, ops), generator=generator, dtype=torch.float64)
    magnitudes = low[op_idx] + (high - low)[op_idx] * u
    cutout = torch.rand(n, generator=generator, dtype=torch.float64) * MAX_CUTOUT
    centre = torch.rand((n, 2), generator=generator, dtype=torch.float64)
    return RandAugmentParams(op_idx, magnitudes, cutout, centre)


# ---------------------------------------------------------------------------------------------------------- helpers

def _factor(magnitudes: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Per-sample blend factors as Pillow receives them: the Python float rounded to a C float, shaped [m, 1, 1, 1]."""
    return magnitudes.to(torch.float32).to(device).view(-1, 1, 1, 1)


def _blend(degenerate: torch.Tensor, images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Pillow's ``Image.blend(degenerate, images, factor)`` (``ImagingBlend``): ``(UINT8)(in1 + f * (in2 - in1))`` in
    float32, clipped (Pillow clips only when extrapolating; inside [0, 1] the value cannot leave [0, 255]).  The
    multiply and the add are separate kernels, each rounded to float32 as Pillow's C is (no fused multiply-add)."""
    d = degenerate.to(torch.int16)
    diff = (images.to(torch.int16) - d).to(torch.float32)
    out = d.to(torch.float32) + factor * diff
    return out.clamp_(0, 255).to(torch.uint8)


def _luma(images: torch.Tensor) -> torch.Tensor:
    """Pillow's ``convert("L")`` of uint8 [m, 3, H, W] RGB: ``(19595 R + 38470 G + 7471 B + 0x8000) >> 16`` as int32
    [m, 1, H, W] (a 1-channel image is returned as it is)."""
    if images.shape[1] == 1:
        return images.to(torch.int32)
    x = images.to(torch.int32)
    return (x[:, 0:1] * 19595 + x[:, 1:2] * 38470 + x[:, 2:3] * 7471 + 0x8000) >> 16


def _coord(v: float) -> int:
    """Pillow's ``COORD``: -1 (outside) for negative coordinates, else the truncation."""
    return -1 if v < 0.0 else int(v)


def _fix(v: float) -> int:
    """Pillow's 16.16 fixed point ``FIX(v) = FLOOR(v * 65536.0 + 0.5)``."""
    return math.floor(v * 65536.0 + 0.5)


_ONE = 65536
_HALF = 32768


class _Fixed(tuple):
    """Fixed-point coefficients (a0, a1, a2, a3, a4, a5), already as Pillow's ``affine_fixed`` holds them."""


def _transpose_coefficients(angle: float, h: int, w: int) -> _Fixed:
    """Pillow's exact ``transpose`` for ``rotate`` by 90, 180 or 270 degrees, as fixed-point coefficients
    (a0, a1, a2, a3, a4, a5): source column ``(a2 + x a0 + y a1) >> 16``, row ``(a5 + x a3 + y a4) >> 16``."""
    if angle == 180:  # ROTATE_180: (y, x) <- (h-1-y, w-1-x)
        return _Fixed((-_ONE, 0, (w - 1) * _ONE + _HALF, 0, -_ONE, (h - 1) * _ONE + _HALF))
    if angle == 90:  # ROTATE_90 (counter-clockwise), square images: (y, x) <- (x, w-1-y)
        return _Fixed((0, -_ONE, (w - 1) * _ONE + _HALF, _ONE, 0, _HALF))
    # ROTATE_270 (clockwise), square images: (y, x) <- (h-1-x, y)
    return _Fixed((0, _ONE, _HALF, -_ONE, 0, (h - 1) * _ONE + _HALF))


def _rotate_matrix(v: float, h: int, w: int) -> tuple[float, ...]:
    """``Image.rotate(v)`` (nearest, no expand, centre ``(w / 2, h / 2)``): the inverse affine matrix Pillow hands to
    ``Image.transform``, built with the same Python float operations, or exact transpose coefficients (ints) for its
    fast paths (a :class:`_Fixed`).  Counter-clockwise degrees."""
    angle = v % 360.0
    if angle == 0:
        return (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # Pillow copies; the scale path with this matrix is the identity
    if angle == 180 or (angle in (90, 270) and w == h):
        return _transpose_coefficients(angle, h, w)
    cx, cy = w / 2, h / 2
    a = -math.radians(angle)
    m = [round(math.cos(a), 15), round(math.sin(a), 15), 0.0, round(-math.sin(a), 15), round(math.cos(a), 15), 0.0]
    tx = m[0] * -cx + m[1] * -cy + m[2]
    ty = m[3] * -cx + m[4] * -cy + m[5]
    m[2], m[5] = tx + cx, ty + cy
    return tuple(m)


def _affine(images: torch.Tensor, matrices: Sequence[tuple]) -> torch.Tensor:
    """Pillow's ``Image.transform(size, AFFINE, matrix)`` (nearest, black fill) of each image with its own matrix.

    A float matrix with ``a[1] == a[3] == 0`` follows ``ImagingScaleAffine``: the source column of output column x is
    ``COORD(xo)`` with ``xo`` starting at ``a[2] + a[0] * 0.5`` and incremented by ``a[0]`` in float64 (rows likewise),
    tabulated here in Python (H + W float additions per image) because the accumulated rounding has no closed form.
    Any other matrix follows ``affine_fixed`` (16.16 fixed point), computed as integers on the device; a
    :class:`_Fixed` is already fixed point (an exact transpose).  Pixels whose source falls outside the image are
    black (0).
    """
    m, c, h, w = images.shape
    dev = images.device
    fixed_i, fixed_c, scale_i, scale_x, scale_y = [], [], [], [], []
    for i, a in enumerate(matrices):
        if isinstance(a, _Fixed):
            fixed_i.append(i)
            fixed_c.append(a)
        elif a[1] == 0 and a[3] == 0:
            xo, yo = a[2] + a[0] * 0.5, a[5] + a[4] * 0.5
            xs, ys = [], []
            for _ in range(w):
                xs.append(_coord(xo))
                xo += a[0]
            for _ in range(h):
                ys.append(_coord(yo))
                yo += a[4]
            scale_i.append(i)
            scale_x.append(xs)
            scale_y.append(ys)
        else:
            corners = ((0, 0), (w, h), (0, h), (w, 0))
            if not all(abs(x * a[0] + y * a[1] + a[2]) < 32768.0 and abs(x * a[3] + y * a[4] + a[5]) < 32768.0
                       for x, y in corners):
                raise ValueError(f"affine matrix {a} leaves Pillow's fixed-point range on a {w}x{h} image")
            fixed_i.append(i)
            fixed_c.append((_fix(a[0]), _fix(a[1]), _fix(a[2] + a[0] * 0.5 + a[1] * 0.5),
                            _fix(a[3]), _fix(a[4]), _fix(a[5] + a[3] * 0.5 + a[4] * 0.5)))
    src_y = torch.empty(m, h, w, dtype=torch.long, device=dev)
    src_x = torch.empty(m, h, w, dtype=torch.long, device=dev)
    if fixed_i:
        k = torch.tensor(fixed_c, dtype=torch.long).to(dev)[:, :, None, None]
        ys = torch.arange(h, device=dev)[:, None]
        xs = torch.arange(w, device=dev)[None, :]
        idx = torch.tensor(fixed_i).to(dev)
        # C's ``>> 16`` on a negative int is an arithmetic shift: a floor division.
        src_x[idx] = torch.div(k[:, 2] + xs * k[:, 0] + ys * k[:, 1], _ONE, rounding_mode="floor")
        src_y[idx] = torch.div(k[:, 5] + xs * k[:, 3] + ys * k[:, 4], _ONE, rounding_mode="floor")
    if scale_i:
        idx = torch.tensor(scale_i).to(dev)
        src_x[idx] = torch.tensor(scale_x, dtype=torch.long).to(dev)[:, None, :].expand(-1, h, w)
        src_y[idx] = torch.tensor(scale_y, dtype=torch.long).to(dev)[:, :, None].expand(-1, h, w)
    valid = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)
    flat = (src_y * w + src_x).masked_fill_(~valid, 0).view(m, 1, h * w).expand(m, c, h * w)
    out = images.reshape(m, c, h * w).gather(2, flat).view(m, c, h, w)
    return out.masked_fill_(~valid[:, None], 0)


# -------------------------------------------------------------------------------------------------------------- ops
# Each op takes uint8 [m, C, H, W] images and float64 CPU magnitudes [m] (one per image) and returns uint8 [m, C, H, W].

def _autocontrast(images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """``ImageOps.autocontrast(img)``, per channel: with lo/hi the channel's extremes, ``int(ix * scale + offset)``,
    ``scale = 255.0 / (hi - lo)``, ``offset = -lo * scale`` in float64 (as Python floats), clipped; the identity if
    hi <= lo."""
    lo = images.amin(dim=(2, 3), keepdim=True).to(torch.float64)
    hi = images.amax(dim=(2, 3), keepdim=True).to(torch.float64)
    flat = hi <= lo
    # A tensor divided by a tensor: ``255.0 / tensor`` would multiply by a rounded reciprocal, not divide.
    scale = torch.where(flat, 1.0, torch.full_like(lo, 255.0) / torch.where(flat, 1.0, hi - lo))
    offset = torch.where(flat, 0.0, -lo * scale)
    return (images.to(torch.float64) * scale + offset).trunc_().clamp_(0, 255).to(torch.uint8)


def _brightness(images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Brightness(img).enhance(v)``: a blend with black."""
    return _blend(torch.zeros((), dtype=torch.uint8, device=images.device), images,
                  _factor(magnitudes, images.device))


def _color(images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Color(img).enhance(v)``: a blend with Pillow's grey ``convert("L")``.  The identity on 1-channel
    images, as in Pillow (an ``L`` image blended with itself)."""
    if images.shape[1] == 1:
        return images.clone()
    return _blend(_luma(images), images, _factor(magnitudes, images.device))


def _contrast(images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Contrast(img).enhance(v)``: a blend with the constant ``int(mean(L) + 0.5)``, L Pillow's grey;
    the mean is the exact integer sum divided in float64, as ``ImageStat`` does."""
    luma = _luma(images)
    total = luma.sum(dim=(1, 2, 3), dtype=torch.int64).to(torch.float64)
    # Divided by a full tensor: CUDA divides by a host scalar as a multiplication by its rounded reciprocal.
    mean = (total / torch.full_like(total, luma.shape[2] * luma.shape[3]) + 0.5).floor_().to(torch.int16)
    return _blend(mean.view(-1, 1, 1, 1), images, _factor(magnitudes, images.device))


def _equalize(images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """``ImageOps.equalize(img)``, per channel: torchvision's ``equalize``, which builds Pillow's LUT
    (``step = (count - count of the top level) // 255``, ``lut[i] = (step // 2 + cumsum[i - 1]) // step``)."""
    from torchvision.transforms.v2.functional import equalize
    return equalize(images)


def _identity(images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    return images.clone()


def _posterize(images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """``ImageOps.posterize(img, max(1, int(v)))``: keep the top ``bits`` bits, ``bits`` per image by broadcasting."""
    bits = magnitudes.trunc().to(torch.int64).clamp_(min=1)
    if (bits > 8).any():
        raise ValueError(f"Posterize keeps 1 to 8 bits, got {magnitudes.max().item()}")
    mask = (256 - 2 ** (8 - bits)).to(torch.uint8)
    return images & mask.to(images.device).view(-1, 1, 1, 1)


def _rotate(images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """``img.rotate(v)``: v degrees counter-clockwise about the centre, nearest, black fill."""
    h, w = images.shape[2:]
    return _affine(images, [_rotate_matrix(v, h, w) for v in magnitudes.tolist()])


def _sharpness(images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Sharpness(img).enhance(v)``: a blend with ``img.filter(ImageFilter.SMOOTH)``.

    Pillow's ``ImagingFilter3x3``: weights ``float32(1) / float32(13)`` and ``float32(5) / float32(13)``; per output
    pixel ``ss = 0.5``, then ``ss += row(y+1)``, ``ss += row(y)``, ``ss += row(y-1)``, each row
    ``(p[x-1] k0 + p[x] k1) + p[x+1] k2`` in float32; ``(UINT8)`` of ``ss`` clipped to [0, 255]; the first and last rows
    and columns copied.  Every product and sum is its own float32 kernel here, in that order.
    """
    _, _, h, w = images.shape
    if h < 3 or w < 3:
        return images.clone()  # Pillow's filter returns a copy; the blend of an image with itself is the image
    k = (np.array([1, 1, 1, 1, 5, 1, 1, 1, 1], dtype=np.float32) / np.float32(13)).tolist()  # float32, as Pillow
    x = images.to(torch.float32)

    def row(r: torch.Tensor, k0: float, k1: float, k2: float) -> torch.Tensor:
        return (r[..., :-2] * k0 + r[..., 1:-1] * k1) + r[..., 2:] * k2

    ss = row(x[:, :, 2:], *k[0:3]) + 0.5
    ss = ss + row(x[:, :, 1:-1], *k[3:6])
    ss = ss + row(x[:, :, :-2], *k[6:9])
    smooth = images.clone()
    smooth[:, :, 1:-1, 1:-1] = ss.clamp_(0, 255).to(torch.uint8)
    return _blend(smooth, images, _factor(magnitudes, images.device))


def _affine_op(build):
    def op(images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[2:]
        return _affine(images, [build(v, h, w) for v in magnitudes.tolist()])
    return op


def _solarize(images: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
    """``ImageOps.solarize(img, v)``: ``255 - x`` where ``x >= v`` (exact for a float v: ``x >= ceil(v)``)."""
    threshold = magnitudes.ceil().to(torch.int16).to(images.device).view(-1, 1, 1, 1)
    return torch.where(images.to(torch.int16) >= threshold, 255 - images, images)


_KERNELS = {
    "AutoContrast": _autocontrast,
    "Brightness": _brightness,
    "Color": _color,
    "Contrast": _contrast,
    "Equalize": _equalize,
    "Identity": _identity,
    "Posterize": _posterize,
    "Rotate": _rotate,
    "Sharpness": _sharpness,
    # img.transform(img.size, Image.AFFINE, matrix): the matrix maps output (x, y) to its source pixel.
    "ShearX": _affine_op(lambda v, h, w: (1.0, v, 0.0, 0.0, 1.0, 0.0)),
    "ShearY": _affine_op(lambda v, h, w: (1.0, 0.0, 0.0, v, 1.0, 0.0)),
    "Solarize": _solarize,
    "TranslateX": _affine_op(lambda v, h, w: (1.0, 0.0, v * w, 0.0, 1.0, 0.0)),
    "TranslateY": _affine_op(lambda v, h, w: (1.0, 0.0, 0.0, 0.0, 1.0, v * h)),
}


def _check_images(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 [N, C, H, W] images with C in (1, 3), got {images.dtype} "
                         f"{tuple(images.shape)}")


def apply_op(images: torch.Tensor, op: int | str, magnitudes) -> torch.Tensor:
    """Apply one op of :data:`OPS` (index or name) to every image, image i with value ``magnitudes[i]``, as the
    official op function does to a PIL image (see the module docstring).  ``images``: uint8 [N, C, H, W] (C = 1 or 3)
    on any device; ``magnitudes``: N values (a CPU tensor or a sequence: the per-sample work reads them on the host).
    Returns a new uint8 tensor on the same device."""
    _check_images(images)
    name = op if isinstance(op, str) else OP_NAMES[op]
    mags = torch.as_tensor(magnitudes, dtype=torch.float64).cpu().reshape(-1)
    if mags.shape[0] != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {mags.shape[0]} magnitudes")
    if images.shape[0] == 0:
        return images.clone()
    return _KERNELS[name](images, mags)


def _fill_value(fill: Sequence[int], channels: int) -> list[int]:
    fill = [int(f) for f in fill]
    if len(fill) == channels:
        return fill
    if channels == 1 and len(fill) == 3:
        r, g, b = fill
        return [(r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16]
    raise ValueError(f"a fill of {len(fill)} values for {channels}-channel images")


def cutout(images: torch.Tensor, fraction: torch.Tensor, centre: torch.Tensor,
           fill: Sequence[int] = CUTOUT_FILL) -> torch.Tensor:
    """The official ``Cutout(img, v)`` / ``CutoutAbs`` of each image; uint8 [N, C, H, W] in, a new tensor out.

    For image i with ``v = fraction[i]`` (CPU float64): nothing if ``v <= 0``; else side ``s = v * W`` pixels, centre
    ``cx = W + (1 - W) u_x``, ``cy = H + (1 - H) u_y`` with ``(u_x, u_y) = centre[i]``.  That is what the official
    ``np.random.uniform(w)`` computes: its single argument is ``low`` (with ``high = 1``), so the centre is uniform on
    (1, W] x (1, H], not over [0, W) x [0, H).  Then ``x0 = int(max(0, cx - s / 2))``, ``x1 = min(W, x0 + s)`` (y
    likewise) and ``ImageDraw.rectangle((x0, y0, x1, y1), fill)``, which truncates the corners to ints and fills them
    *inclusively*: columns ``x0 .. int(x1)`` and rows ``y0 .. int(y1)``, clipped to the image (so any ``v > 0`` covers
    at least one pixel, and a square of side s covers ``int(x0 + s) - x0 + 1`` columns).  All of it in float64 with
    Python's operations, so the square matches Pillow's exactly.

    ``fill`` has one value per channel; for 1-channel images (Fashion-MNIST) an RGB fill is replaced by its Pillow
    luma ``(19595 R + 38470 G + 7471 B + 0x8000) >> 16`` (123 for the official ``(125, 123, 114)``): the grey that
    colour becomes under ``convert("L")``.  Pillow itself refuses a 3-value ink on an ``L`` image and the official code
    never sees one, so there is no official value; the grey of the official colour keeps the cutout at the same
    brightness as on CIFAR.
    """
    _check_images(images)
    n, c, h, w = images.shape
    fill_values = _fill_value(fill, c)
    v = torch.as_tensor(fraction, dtype=torch.float64).cpu().reshape(n)
    u = torch.as_tensor(centre, dtype=torch.float64).cpu().reshape(n, 2)
    side = v * w
    cx = w + (1.0 - w) * u[:, 0]
    cy = h + (1.0 - h) * u[:, 1]
    x0 = (cx - side / 2.0).clamp(min=0).trunc()
    y0 = (cy - side / 2.0).clamp(min=0).trunc()
    x1 = torch.minimum(x0 + side, torch.tensor(float(w), dtype=torch.float64)).trunc()
    y1 = torch.minimum(y0 + side, torch.tensor(float(h), dtype=torch.float64)).trunc()
    x1 = torch.where(v > 0, x1, -1.0)  # an empty range where there is no cutout
    bounds = torch.stack([x0, x1, y0, y1], dim=1).to(torch.long).to(images.device)
    cols = torch.arange(w, device=images.device)
    rows = torch.arange(h, device=images.device)
    in_x = (cols >= bounds[:, 0:1]) & (cols <= bounds[:, 1:2])  # [n, W]
    in_y = (rows >= bounds[:, 2:3]) & (rows <= bounds[:, 3:4])  # [n, H]
    mask = (in_y[:, :, None] & in_x[:, None, :])[:, None]
    colour = torch.tensor(fill_values, dtype=torch.uint8, device=images.device).view(1, c, 1, 1)
    return torch.where(mask, colour, images)


def rand_augment(images: torch.Tensor, params: RandAugmentParams,
                 fill: Sequence[int] = CUTOUT_FILL) -> torch.Tensor:
    """The official ``RandAugment(2, 10)`` (``ops`` then ``Cutout``) of each image with its drawn parameters.

    ``images``: uint8 [N, C, H, W] (C = 3, or 1 for Fashion-MNIST) on any device, N == ``len(params)``; returns a new
    uint8 tensor on the same device.  Image i gets ``params.ops[i, 0]``, then ``params.ops[i, 1]`` (...), then its
    cutout (see :func:`cutout`; for C = 1 the RGB ``fill`` becomes its Pillow luma, 123 by default).  Per step, the
    images that drew the same op are transformed together in one call of that op; the parameters are CPU tensors, so
    the grouping costs no device synchronisation.
    """
    _check_images(images)
    if images.shape[0] != len(params):
        raise ValueError(f"{images.shape[0]} images but parameters for {len(params)}")
    out = images.clone()
    ops = params.ops.cpu()
    mags = params.magnitudes.cpu().to(torch.float64)
    identity = OP_NAMES.index("Identity")
    for step in range(ops.shape[1]):
        column = ops[:, step]
        for op in torch.unique(column).tolist():
            if op == identity:
                continue
            sel = (column == op).nonzero().squeeze(1)
            idx = sel.to(images.device)
            out.index_copy_(0, idx, _KERNELS[OP_NAMES[op]](out.index_select(0, idx), mags[sel, step]))
    return cutout(out, params.cutout, params.cutout_centre, fill)
