"""Finding the ink of a picture of a digit: which side is ink (dark on light or light on
dark), the paper's texture, lighting and noise removed, and whether there is any
structure at all ("blank"). Robust to digits cropped tight (ink touching the edges),
faint, blurred, tiny or noisy ones: nothing is estimated from the border alone.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .images import has_alpha, to_8bit

# Above this many pixels on the longer side the ink-finding steps work on a reduced copy:
# the result is 28x28 anyway, and a 12-megapixel photo would take seconds. The shorter
# side is kept at _MIN_WORK_SIDE or more (a strip's digit spans about its short side),
# within _WORK_PIXELS.
_WORK_SIDE = 512
_MIN_WORK_SIDE = 64
_WORK_PIXELS = 1 << 21


def gray_and_alpha(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Luminance in [0, 1] at real depth, and alpha in [0, 1] when the image has any."""
    img = to_8bit(img)
    alpha = None
    if has_alpha(img):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        gray = np.einsum("hwc,c->hw", rgba[..., :3],
                         np.array([0.299, 0.587, 0.114], dtype=np.float32))
        alpha = rgba[..., 3]
    else:
        gray = np.asarray(img.convert("L") if img.mode != "L" else img,
                          dtype=np.float32) / 255.0
    return gray, alpha


def _work_scale(h: int, w: int) -> float:
    """The factor (at most 1) an image of h x w is reduced by for the ink steps: the longer
    side to _WORK_SIDE, unless that takes the shorter one under _MIN_WORK_SIDE. A 3000x60
    form cell fitted to 512 px would keep its digit 10 px high, under the blur widths and
    stroke lengths that tell a digit from noise, and be called blank."""
    s = max(_WORK_SIDE / max(h, w), _MIN_WORK_SIDE / min(h, w))
    return min(1.0, s, float(np.sqrt(_WORK_PIXELS / (h * w))))


def scale_side(shape: tuple[int, ...]) -> int:
    """The side that sets the ink steps' blur widths: the longer one, but at most four times
    the shorter, since a digit in a strip is about as large as the strip is thin."""
    return max(1, min(max(shape), 4 * min(shape)))


def _shrink(a: np.ndarray) -> np.ndarray:
    h, w = a.shape
    s = _work_scale(h, w)
    if s >= 1.0:
        return a
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.asarray(Image.fromarray(a.astype(np.float32)).resize(size, Image.Resampling.BOX))


def _box_blur(a: np.ndarray, r: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window (edges replicated), by integral images."""
    if r < 1:
        return a
    p = np.pad(a.astype(np.float64), r, mode="edge")
    c = np.pad(p.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    k = 2 * r + 1
    s = c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]
    return (s / (k * k)).astype(np.float32)


def robust_sigma(x: np.ndarray) -> float:
    med = np.median(x)
    return float(1.4826 * np.median(np.abs(x - med)))


def _enlarge(a: np.ndarray, side: int) -> np.ndarray:
    """Tiny images (an 8x8 scan, a 16 px icon) upscaled bicubically until the longer side
    is at least ``side``: the blur and stroke steps below need a few pixels per stroke."""
    h, w = a.shape
    if max(h, w) >= side:
        return a
    f = -(-side // max(h, w))
    up = Image.fromarray(a.astype(np.float32)).resize((w * f, h * f), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(up), 0, 1)


def _noise_sigma(a: np.ndarray, step: int = 1) -> float:
    """Pixel noise from the differences of pixels ``step`` apart: a stroke's edges are a
    minority of the pairs, so their median is the noise's, whatever the ink covers."""
    step = max(1, step)  # a[0:] - a[:-0] would pair the image with nothing
    d = np.concatenate([(a[step:] - a[:-step]).ravel(), (a[:, step:] - a[:, :-step]).ravel()])
    if d.size == 0:  # a single pixel, or a strip thinner than the step both ways
        return 0.0
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2))


def _otsu(a: np.ndarray) -> float:
    """The value that best splits ``a`` into two classes (Otsu 1979), over its own range."""
    lo, hi = float(a.min(initial=0.0)), float(a.max(initial=0.0))
    if hi - lo < 1e-6:
        return hi
    hist = np.bincount(((a - lo) / (hi - lo) * 255).astype(np.int64).ravel(), minlength=256)
    p = hist / max(hist.sum(), 1)
    w0 = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w0 - mu) ** 2 / (w0 * (1 - w0))
    level = int(np.nanargmax(np.nan_to_num(between[:-1], nan=-1.0))) + 1
    return lo + level / 255 * (hi - lo)


def ink_side(gray: np.ndarray) -> tuple[bool, float]:
    """Whether the ink is darker than the paper, and how sure that is (0 to 0.5).

    Otsu's threshold splits the pixels into two classes; the ink is the one that holds
    less of three things, averaged: the image's area, its border and its four corners.
    No cue is safe alone: a tightly cropped digit's strokes touch the border, thick
    strokes can cover half the area, a 7's bar reaches two corners; a digit rarely
    holds the majority of all three."""
    # Lighting first: against a blur a quarter of the image wide, vignetting and
    # gradients of a photo are gone, and the digit of a tight crop stays as it is.
    h, w = gray.shape
    detrended = _box_blur(gray, 1) - _box_blur(gray, max(1, scale_side(gray.shape) // 4))
    dark = detrended < _otsu(detrended)
    ch, cw = max(1, h // 6), max(1, w // 6)
    border = np.concatenate([dark[0], dark[-1], dark[1:-1, 0], dark[1:-1, -1]]).mean()
    corners = np.mean([dark[:ch, :cw].mean(), dark[:ch, -cw:].mean(),
                       dark[-ch:, :cw].mean(), dark[-ch:, -cw:].mean()])
    share = (dark.mean() + border + corners) / 3  # the dark class's
    return bool(share <= 0.5), float(abs(share - 0.5))


def _flatten(gray: np.ndarray, dark_ink: bool) -> tuple[np.ndarray, np.ndarray]:
    """Subtract a smooth background (uneven lighting, grey paper): a quadratic surface
    fitted to the paper, found again after each fit as the pixels that Otsu's threshold
    puts on the paper's side, less the half of them nearest the threshold (blurred
    edges). Returns the residual, oriented so that ink is positive, and the paper mask.

    The paper is chosen by a threshold, not by a noise level: a noise level measured on
    the paper grows with every blurred edge it takes in, and a large blurred digit then
    ends up counted as paper."""
    h, w = gray.shape
    sign = -1.0 if dark_ink else 1.0
    step = max(1, int(np.sqrt(h * w / 10000)))  # a lighting surface needs few samples
    ys, xs = np.mgrid[0:h:step, 0:w:step]
    v = gray[::step, ::step].ravel()

    def design(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        u, t = xx.ravel() / max(w - 1, 1) - 0.5, yy.ravel() / max(h - 1, 1) - 0.5
        return np.stack([np.ones_like(u), u, t, u * u, u * t, t * t], axis=1)

    a = design(ys, xs)
    noise = _noise_sigma(gray)
    keep = _paper_side(sign * v, noise)
    coef = np.zeros(6)
    for _ in range(8):
        if keep.sum() < 12:
            break
        # Normal equations with einsum, solved at 6x6: a least-squares call on the whole
        # sample starts OpenBLAS's threads, which then fight torch's for the cores (the
        # demo's p95 latency went from 23 ms to 114 ms on 2 cores).
        sub = a[keep]
        coef = np.linalg.lstsq(np.einsum("ij,ik->jk", sub, sub),
                               np.einsum("ij,i->j", sub, v[keep]), rcond=None)[0]
        ink = sign * (v - np.einsum("ij,j->i", a, coef))
        new = _paper_side(ink, noise)
        if np.array_equal(new, keep):
            break
        keep = new
    u = np.arange(w, dtype=np.float64)[None, :] / max(w - 1, 1) - 0.5
    t = np.arange(h, dtype=np.float64)[:, None] / max(h - 1, 1) - 0.5
    surface = (coef[0] + coef[1] * u + coef[2] * t + coef[3] * u * u + coef[4] * u * t
               + coef[5] * t * t)
    residual = (sign * (gray - surface)).astype(np.float32)
    return residual, _paper_side(residual, noise)


def _paper_side(ink: np.ndarray, noise: float) -> np.ndarray:
    """The pixels on the paper's side of Otsu's threshold (ink is positive), less those
    nearer the threshold than the paper's median level; all pixels when the two sides are
    within two noise levels of each other (Otsu splits pure noise in half too, and a
    surface fitted to one half would sit below the rest)."""
    t = _otsu(ink)
    below = ink[ink < t]
    level = float(np.median(below)) if below.size else t
    if t - level < 2 * noise:
        return np.ones(ink.shape, dtype=bool)
    return ink < 0.5 * (level + t)


# The smallest contrast read as ink, after blurring: 8 grey levels. Below it, an image
# with no noise to compare against (a flat or nearly flat field) is blank.
_MIN_CONTRAST = 8 / 255


def ink_map(img: Image.Image) -> np.ndarray:
    """Ink as light-on-dark float (H, W) in [0, 1], paper texture, lighting and noise
    removed, grey levels kept inside the strokes. All zero when there is no ink."""
    gray = _work_gray(img)
    return _ink(gray, ink_side(gray)[0])


def _work_gray(img: Image.Image) -> np.ndarray:
    """Luminance in [0, 1] with transparency resolved, at a size the ink steps work at."""
    gray, alpha = gray_and_alpha(img)
    if alpha is not None and (alpha < 0.9).mean() > 0.01:
        opaque = gray[alpha > 0.5]
        if opaque.size and (opaque.size >= 0.5 * alpha.size or opaque.std() > 0.15):
            # An opaque sheet (paper and ink) with transparent margins: margins are paper.
            paper = float(np.median(opaque))
            gray = gray * alpha + paper * (1 - alpha)
        else:
            # Strokes of one colour on a transparent canvas: the alpha channel is the ink,
            # whatever colour the strokes were given.
            gray = alpha
    return _enlarge(_shrink(gray), _MIN_WORK_SIDE)


def _ink(gray: np.ndarray, dark_ink: bool) -> np.ndarray:
    """The ink map of a working-size image whose polarity is given."""
    ink, paper = _flatten(gray, dark_ink)
    sigma = max(robust_sigma(ink[paper]) if paper.sum() >= 12 else _noise_sigma(gray),
                1.0 / 255)
    # Find the strokes on a blurred copy (noise averages out, strokes do not), then keep
    # the unblurred grey levels near them. Failing that, once more three times as
    # blurred: a digit printed in separate dots (a receipt, a dot-matrix display) joins
    # up there, where noise has flattened out further still.
    r0 = max(1, round(scale_side(gray.shape) / 160))
    for r in (r0, 3 * r0):
        strokes = _strokes(ink, paper, r)
        if strokes is not None:
            break
    else:
        return np.zeros_like(ink)
    strokes = _without_strays(strokes)
    near = _box_blur(strokes.astype(np.float32), r) > 0
    hi = float(np.percentile(ink[strokes], 90))
    lo = min(max(4 * sigma, 0.2 * hi), 0.5 * hi)
    return np.clip((ink - lo) / max(hi - lo, 1e-6), 0, 1) * near


def _strokes(ink: np.ndarray, paper: np.ndarray, r: int) -> np.ndarray | None:
    """Where the strokes are, found on ``ink`` blurred over (2r+1)^2 pixels, or None where
    that shows no structure."""
    blurred = _box_blur(ink, r)
    base = float(np.median(blurred[paper])) if paper.sum() >= 12 else 0.0
    # The blurred noise, from differences of pixels a blur's width apart: independent of
    # which pixels are paper, and a digit's edges are too few to move their median.
    k = min(2 * r + 1, min(ink.shape) - 1)
    sigma_b = max(_noise_sigma(blurred, k), 0.5 / 255)
    # The strongest point away from the edges, where the blur averages fewer pixels.
    inner = blurred[r:-r, r:-r] if min(blurred.shape) > 4 * r else blurred
    peak = float(inner.max(initial=0.0)) - base
    if peak < max(6 * sigma_b, _MIN_CONTRAST):
        return None
    # Structure, not specks: some connected stroke must span more than a few blur widths
    # (salt-and-pepper noise passes every level test above). Measured on the strongest
    # half of the ink, which a digit's strokes hold and scattered specks do not join up
    # in. Any stroke, not the one at the strongest point: that may be a stray dot beside
    # the digit (a pen touching the paper), which alone would call the image blank.
    core = blurred - base > max(5 * sigma_b, 0.5 * peak)
    if _largest_extent(core) < max(3 * (2 * r + 1), 0.08 * min(ink.shape)):
        return None
    return blurred - base > max(5 * sigma_b, 0.25 * peak)


def _parts(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The 8-connected parts of ``mask``, on a copy reduced (by maximum) by a factor f to
    at most 128 px a side: (labels, f), where a part's pixels share the smallest index
    among them and the background is labelled h * w. Labels spread by repeated 3x3
    minimum filters inside the mask until nothing changes."""
    f = max(1, -(-max(mask.shape) // 128))
    h, w = -(-mask.shape[0] // f), -(-mask.shape[1] // f)
    padded = np.zeros((h * f, w * f), dtype=bool)
    padded[:mask.shape[0], :mask.shape[1]] = mask
    small = padded.reshape(h, f, w, f).any(axis=(1, 3))
    none = h * w
    labels = np.where(small, np.arange(h * w).reshape(h, w), none)
    while small.any():
        p = np.pad(labels, 1, constant_values=none)
        spread = np.minimum.reduce([p[dy:dy + h, dx:dx + w]
                                    for dy in range(3) for dx in range(3)])
        spread = np.where(small, spread, none)
        if np.array_equal(spread, labels):
            break
        labels = spread
    return labels, f


def _part_sides(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each part's label, pixel count and longer bounding-box side (reduced pixels)."""
    rows, cols = np.nonzero(labels < labels.size)
    ids, part, counts = np.unique(labels[rows, cols], return_inverse=True, return_counts=True)
    sides = []
    for coord in (rows, cols):
        low = np.full(ids.size, labels.size)
        high = np.full(ids.size, -1)
        np.minimum.at(low, part, coord)
        np.maximum.at(high, part, coord)
        sides.append(high - low + 1)
    return ids, counts, np.maximum(*sides)


def _largest_extent(mask: np.ndarray) -> int:
    """The longer side, in pixels, of the bounding box of the largest 8-connected part of
    ``mask`` (measured at the reduced size of ``_parts``)."""
    labels, f = _parts(mask)
    sides = _part_sides(labels)[2]
    return f * int(sides.max()) if sides.size else 0


# Stray marks: a part with under 10 % of the strokes' pixels, farther than a fifth of the
# largest part's extent from any other part. At most this many small parts are weighed;
# ink in more pieces than that (dot-matrix print, broken strokes) is kept as it is.
_STRAY_SHARE, _STRAY_DISTANCE, _MAX_SMALL_PARTS = 0.1, 0.2, 24


def _without_strays(strokes: np.ndarray) -> np.ndarray:
    """``strokes`` without stray marks (a dot where the pen touched the paper, a speck of
    dust): the MNIST procedure crops to all the ink, and one speck far from the digit
    would shrink the digit into a corner."""
    labels, f = _parts(strokes)
    ids, counts, sides = _part_sides(labels)
    small = ids[(counts < _STRAY_SHARE * counts.sum()) & (counts < counts.max())]
    if ids.size < 2 or small.size == 0 or small.size > _MAX_SMALL_PARTS:
        return strokes
    reach = max(1, round(_STRAY_DISTANCE * int(sides.max())))
    stray = np.zeros(labels.shape, dtype=bool)
    for part in small:
        this = labels == part
        others = (labels < labels.size) & ~this
        if not (_box_blur(this.astype(np.float32), reach) > 0)[others].any():
            stray |= this
    if not stray.any():
        return strokes
    full = np.repeat(np.repeat(stray, f, axis=0), f, axis=1)[:strokes.shape[0], :strokes.shape[1]]
    return strokes & ~full


def bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
