"""kdbench.augment against Pillow itself: every op, the cutout and the whole RandAugment, bit for bit.

The references below are written with Pillow's own API (``ImageOps``, ``ImageEnhance``, ``Image.transform``,
``Image.rotate``, ``ImageDraw``) following the conventions of the official MLKD op functions
(Jin-Ying/Multi-Level-Logit-Distillation, ``mdistiller/dataset/cifar100.py``); no code is imported from there.
"""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from kdbench.augment import (
    CUTOUT_FILL,
    MAX_CUTOUT,
    OP_NAMES,
    OPS,
    RandAugmentParams,
    apply_op,
    cutout,
    draw,
    rand_augment,
)

# The official op functions, as Pillow calls on one image with value v.
PIL_OPS = {
    "AutoContrast": lambda im, v: ImageOps.autocontrast(im),
    "Brightness": lambda im, v: ImageEnhance.Brightness(im).enhance(v),
    "Color": lambda im, v: ImageEnhance.Color(im).enhance(v),
    "Contrast": lambda im, v: ImageEnhance.Contrast(im).enhance(v),
    "Equalize": lambda im, v: ImageOps.equalize(im),
    "Identity": lambda im, v: im,
    "Posterize": lambda im, v: ImageOps.posterize(im, max(1, int(v))),
    "Rotate": lambda im, v: im.rotate(v),
    "Sharpness": lambda im, v: ImageEnhance.Sharpness(im).enhance(v),
    "ShearX": lambda im, v: im.transform(im.size, Image.AFFINE, (1, v, 0, 0, 1, 0)),
    "ShearY": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, v, 1, 0)),
    "Solarize": lambda im, v: ImageOps.solarize(im, v),
    "TranslateX": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, v * im.size[0], 0, 1, 0)),
    "TranslateY": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, v * im.size[1])),
}
# Values beyond the drawn range that the helpers still reproduce (Pillow's rotate fast paths, integer thresholds).
EXTRA = {"Rotate": [0.0, 90.0, -90.0, 180.0, 270.0, 45.0, -360.0], "Solarize": [128.0, 127.5, 1.0, 255.0],
         "Posterize": [8.0, 7.999, 1.0], "ShearX": [0.0], "ShearY": [0.0], "TranslateX": [0.0, 0.5 / 32],
         "TranslateY": [0.0, -0.5 / 32]}


def images(n: int, c: int, seed: int, h: int = 32, w: int = 32) -> torch.Tensor:
    """uint8 [n, c, h, w] of five kinds, in turn: full-range noise, narrow-range noise (autocontrast and equalize have
    work to do), a smooth gradient with noise (geometry is visible), a two-level image, a constant one per channel."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (n, c, h, w), generator=g)
    lo = torch.randint(0, 200, (n, c, 1, 1), generator=g)
    span = torch.randint(1, 56, (n, c, 1, 1), generator=g)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    slope = torch.randint(1, 8, (n, c, 1, 1), generator=g)
    gradient = (xx * slope + yy * 3 + lo) % 256
    gradient = (gradient + noise % 9 - 4).clamp(0, 255)
    levels = torch.where(noise < 40, lo, lo + span)
    constant = lo.expand(n, c, h, w)
    kind = (torch.arange(n) % 5).view(n, 1, 1, 1)
    out = torch.where(kind == 0, noise, torch.where(kind == 1, lo + noise % span, torch.where(
        kind == 2, gradient, torch.where(kind == 3, levels, constant))))
    return out.to(torch.uint8)


def to_pil(image: torch.Tensor) -> Image.Image:
    a = image.permute(1, 2, 0).numpy()
    return Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a)


def from_pil(im: Image.Image) -> torch.Tensor:
    a = torch.from_numpy(np.array(im, dtype=np.uint8))
    return a[None] if a.dim() == 2 else a.permute(2, 0, 1)


def magnitudes(op: str, n: int, seed: int) -> torch.Tensor:
    """Both range ends, the middle, the op's extra values, then uniform draws inside the range."""
    _, low, high = OPS[OP_NAMES.index(op)]
    fixed = [low, high, (low + high) / 2] + EXTRA.get(op, [])
    rest = low + (high - low) * torch.rand(n - len(fixed), generator=torch.Generator().manual_seed(seed),
                                           dtype=torch.float64)
    return torch.cat([torch.tensor(fixed, dtype=torch.float64), rest])


def disagreement(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float]:
    """(max abs difference in uint8 levels, fraction of differing values)."""
    diff = (a.to(torch.int16) - b.to(torch.int16)).abs()
    return int(diff.max()), float((diff > 0).double().mean())


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("op", OP_NAMES)
def test_op_matches_pillow_exactly(op, channels):
    n = 200 if channels == 3 else 60
    x = images(n, channels, seed=OP_NAMES.index(op) + 100 * channels)
    v = magnitudes(op, n, seed=OP_NAMES.index(op))
    got = apply_op(x, op, v)
    want = torch.stack([from_pil(PIL_OPS[op](to_pil(img), float(m))) for img, m in zip(x, v.tolist())])
    assert got.dtype == torch.uint8 and got.shape == x.shape
    worst, frac = disagreement(got, want)
    assert (worst, frac) == (0, 0.0), f"{op} ({channels} channels): max |diff| {worst}, {frac:.4%} of values differ"
    assert torch.equal(apply_op(x, OP_NAMES.index(op), v), got)  # by index as by name


def test_ops_see_their_own_magnitude_in_a_mixed_batch():
    """Per-sample magnitudes: each image of a group gets its own value, not its neighbours'."""
    x = images(10, 3, seed=7)
    v = torch.linspace(-30, 30, 10, dtype=torch.float64)
    batch = apply_op(x, "Rotate", v)
    for i in range(10):
        assert torch.equal(batch[i:i + 1], apply_op(x[i:i + 1], "Rotate", v[i:i + 1]))


def hand_cutout(image: torch.Tensor, x0: int, x1: int, y0: int, y1: int, fill) -> torch.Tensor:
    """Fill rows y0..y1 and columns x0..x1 (inclusive) with `fill`."""
    out = image.clone()
    out[:, y0:y1 + 1, x0:x1 + 1] = torch.tensor(fill, dtype=torch.uint8).view(-1, 1, 1)
    return out


def test_cutout_position_size_clipping_and_fill_by_hand():
    x = images(5, 3, seed=3)
    fraction = torch.tensor([0.25, 0.25, 0.0, 0.001, 0.4999], dtype=torch.float64)
    centre = torch.tensor([[0.5, 0.0], [1 - 1e-9, 0.5], [0.5, 0.5], [0.25, 0.75], [0.0, 1 - 1e-9]],
                          dtype=torch.float64)
    got = cutout(x, fraction, centre)
    # Side 8, centre (32 - 31 * 0.5, 32) = (16.5, 32): x0 = int(12.5) = 12, x1 = 20 -> columns 12..20 (9 wide, as
    # ImageDraw fills inclusively); y0 = 28, y1 = min(32, 36) -> rows 28..31, clipped at the bottom.
    assert torch.equal(got[0], hand_cutout(x[0], 12, 20, 28, 31, CUTOUT_FILL))
    # Centre (1 + 31e-9, 16.5): x0 = max(0, -3) = 0, x1 = 8 -> columns 0..8, clipped at the left; rows 12..20.
    assert torch.equal(got[1], hand_cutout(x[1], 0, 8, 12, 20, CUTOUT_FILL))
    assert torch.equal(got[2], x[2])  # v == 0: no cutout
    # Side 0.032 at (24.25, 8.75): x0 = int(24.234) = 24, x1 = int(24.032) -> one pixel.
    assert torch.equal(got[3], hand_cutout(x[3], 24, 24, 8, 8, CUTOUT_FILL))
    # Side 15.9968 at (32, 1): x0 = int(24.0016) = 24 -> columns 24..31; y0 = 0, y1 = int(15.9968) = 15.
    assert torch.equal(got[4], hand_cutout(x[4], 24, 31, 0, 15, CUTOUT_FILL))
    # One channel: the Pillow grey of the RGB fill (123), or an explicit one-value fill.
    g = images(1, 1, seed=4)
    one = torch.tensor([0.25], dtype=torch.float64), torch.tensor([[0.5, 0.0]], dtype=torch.float64)
    assert torch.equal(cutout(g, *one)[0], hand_cutout(g[0], 12, 20, 28, 31, (123,)))
    assert torch.equal(cutout(g, *one, fill=(7,))[0], hand_cutout(g[0], 12, 20, 28, 31, (7,)))
    assert torch.equal(x, images(5, 3, seed=3))  # the input is left alone


def pil_cutout(im: Image.Image, v: float, u: tuple[float, float], fill) -> Image.Image:
    """The official Cutout/CutoutAbs with np.random.uniform(w) == w + (1 - w) * u spelled out, drawn by ImageDraw."""
    if v <= 0:
        return im
    w, h = im.size
    v = v * w
    x0, y0 = w + (1.0 - w) * u[0], h + (1.0 - h) * u[1]
    x0, y0 = int(max(0, x0 - v / 2.0)), int(max(0, y0 - v / 2.0))
    x1, y1 = min(w, x0 + v), min(h, y0 + v)
    im = im.copy()
    ImageDraw.Draw(im).rectangle((x0, y0, x1, y1), fill)
    return im


def test_cutout_matches_imagedraw():
    n = 200
    x = images(n, 3, seed=5)
    g = torch.Generator().manual_seed(5)
    fraction = torch.rand(n, generator=g, dtype=torch.float64) * MAX_CUTOUT
    centre = torch.rand(n, 2, generator=g, dtype=torch.float64)
    got = cutout(x, fraction, centre)
    want = torch.stack([from_pil(pil_cutout(to_pil(img), f, tuple(u), CUTOUT_FILL))
                        for img, f, u in zip(x, fraction.tolist(), centre.tolist())])
    assert torch.equal(got, want)


def test_draw_is_a_pure_function_of_the_generator():
    a = draw(torch.Generator().manual_seed(11), 64)
    b = draw(torch.Generator().manual_seed(11), 64)
    c = draw(torch.Generator().manual_seed(12), 64)
    for field in ("ops", "magnitudes", "cutout", "cutout_centre"):
        assert torch.equal(getattr(a, field), getattr(b, field))
        assert getattr(a, field).device.type == "cpu"
    assert not torch.equal(a.magnitudes, c.magnitudes)
    assert draw(torch.Generator().manual_seed(11), 64, ops=3).ops.shape == (64, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.ops = c.ops


def test_draw_distribution():
    n = 20000
    p = draw(torch.Generator().manual_seed(0), n)
    assert p.ops.shape == p.magnitudes.shape == (n, 2) and p.cutout.shape == (n,) and p.cutout_centre.shape == (n, 2)
    assert p.ops.dtype == torch.int64 and p.magnitudes.dtype == torch.float64
    # random.choices: uniform over the 14 ops, with replacement (both steps can draw the same op).
    for step in range(2):
        counts = torch.bincount(p.ops[:, step], minlength=len(OPS)).double() / n
        assert counts.min() > 0.8 / len(OPS) and counts.max() < 1.2 / len(OPS)
    same = (p.ops[:, 0] == p.ops[:, 1]).double().mean()
    assert 0.5 / len(OPS) < same < 1.5 / len(OPS)
    for i, (name, low, high) in enumerate(OPS):
        m = p.magnitudes[p.ops == i]
        assert (m >= low).all() and (m < high).all(), name
        assert m.min() < low + 0.05 * (high - low) and m.max() > high - 0.05 * (high - low), name
    assert (p.cutout >= 0).all() and (p.cutout < MAX_CUTOUT).all() and p.cutout.max() > 0.49
    assert (p.cutout_centre >= 0).all() and (p.cutout_centre < 1).all()


def pil_rand_augment(image: torch.Tensor, ops: list[int], mags: list[float], v: float, u, fill) -> torch.Tensor:
    im = to_pil(image)
    for op, m in zip(ops, mags):
        im = PIL_OPS[OP_NAMES[op]](im, m)
    return from_pil(pil_cutout(im, v, u, fill))


@pytest.mark.parametrize("channels", [3, 1])
def test_rand_augment_matches_pillow_pipeline(channels):
    n = 96 if channels == 3 else 48
    x = images(n, channels, seed=20 + channels)
    p = draw(torch.Generator().manual_seed(channels), n)
    got = rand_augment(x, p)
    fill = CUTOUT_FILL if channels == 3 else 123
    want = torch.stack([pil_rand_augment(img, ops, mags, v, u, fill) for img, ops, mags, v, u in zip(
        x, p.ops.tolist(), p.magnitudes.tolist(), p.cutout.tolist(), p.cutout_centre.tolist())])
    assert got.dtype == torch.uint8 and torch.equal(got, want)
    assert torch.equal(x, images(n, channels, seed=20 + channels))  # the input is left alone


def test_rand_augment_does_not_depend_on_the_batch():
    """An image's view depends only on its parameters, not on which other images share its batch or op group."""
    x = images(40, 3, seed=9)
    p = draw(torch.Generator().manual_seed(9), 40)
    full = rand_augment(x, p)
    sub = torch.tensor([3, 17, 18, 39])
    part = RandAugmentParams(p.ops[sub], p.magnitudes[sub], p.cutout[sub], p.cutout_centre[sub])
    assert torch.equal(rand_augment(x[sub], part), full[sub])
    assert torch.equal(rand_augment(x.contiguous(memory_format=torch.channels_last), p), full)
    with pytest.raises(ValueError):
        rand_augment(x[:3], p)


def test_params_forcing_one_op_then_no_cutout_equal_apply_op_twice():
    x = images(8, 3, seed=1)
    op = OP_NAMES.index("Sharpness")
    v = torch.full((8, 2), 0.3, dtype=torch.float64)
    p = RandAugmentParams(torch.full((8, 2), op), v, torch.zeros(8, dtype=torch.float64),
                          torch.zeros(8, 2, dtype=torch.float64))
    assert torch.equal(rand_augment(x, p), apply_op(apply_op(x, op, v[:, 0]), op, v[:, 1]))


@pytest.mark.gpu
def test_cuda_matches_cpu_bit_for_bit():
    for channels in (3, 1):
        x = images(256, channels, seed=channels)
        p = draw(torch.Generator().manual_seed(channels), 256)
        got = rand_augment(x.cuda(), p)
        assert got.device.type == "cuda"
        assert torch.equal(got.cpu(), rand_augment(x, p))
        for op in OP_NAMES:
            v = magnitudes(op, 32, seed=1)
            assert torch.equal(apply_op(x[:32].cuda(), op, v).cpu(), apply_op(x[:32], op, v)), op
