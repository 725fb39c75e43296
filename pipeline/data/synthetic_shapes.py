"""The `shapes` style of the embedded dataset: one large, flat-coloured object per image.

The demo's style. A class is a (shape, colour) pair that survives a coarse code grid: a disc,
a square, a triangle, ... in saturated hues, filling a third to most of the image on a muted
background, so a tokenizer trained for minutes on a CPU keeps what makes each class and a
class-conditional prior has something to learn (the `textures` style tells classes apart by 1-2 px
textures, which such a tokenizer blurs away). Two classes share each hue (red disc, red square;
yellow triangle, yellow cross; ...), so colour alone identifies only the pair: recognising the
class needs the shape too. With more classes than shapes, shapes repeat with other hues
(golden-ratio spaced), so every class is still a distinct pair.

Like the textured style, every image is a pure function of (seed, split, index).
"""
from __future__ import annotations

import numpy as np

SHAPES = ("disc", "square", "triangle", "cross", "ring", "diamond", "star", "hexagon", "ellipse", "bar")
_NUM_PARAMS = 12


def class_names(num_classes: int) -> list[str]:
    return [f"{SHAPES[label % len(SHAPES)]}_{_hue_name(class_hue(label))}" for label in range(num_classes)]


def class_hue(label: int) -> float:
    """Classes 2k and 2k+1 share a hue (five hues for the first ten classes), so neither colour nor
    shape alone tells every class apart: a reconstruction (or a sample) must keep both. Past the
    first len(SHAPES) classes, golden-ratio steps."""
    if label < len(SHAPES):
        return (label // 2) / (len(SHAPES) // 2)
    return (label * 0.6180339887) % 1.0


def _hue_name(hue: float) -> str:
    names = ("red", "orange", "yellow", "lime", "green", "teal", "cyan", "blue", "purple", "magenta")
    return names[int(hue * len(names) + 0.5) % len(names)]


def render_block(u: np.ndarray, labels: np.ndarray, resolution: int) -> np.ndarray:
    """(n, R, R, 3) uint8 images from per-image uniforms `u` (n, >= _NUM_PARAMS) and labels."""
    res, n = resolution, len(labels)
    grid = (np.arange(res, dtype=np.float32) + 0.5) / res
    ys, xs = grid[None, :, None], grid[None, None, :]

    # Background: low-saturation colours with a gentle gradient, so the object's hue stands out.
    grey = 0.25 + 0.5 * u[:, 0:1]
    tint = 0.12 * (u[:, 1:4] - 0.5)
    c0 = np.clip(grey + tint, 0, 1)
    c1 = np.clip(c0 + 0.15 * (u[:, 4:5] - 0.5), 0, 1)
    angle = u[:, 5] * 2 * np.pi
    ramp = ((xs - 0.5) * np.cos(angle)[:, None, None] + (ys - 0.5) * np.sin(angle)[:, None, None]) / np.sqrt(2) + 0.5
    canvas = c0[:, :, None, None] + (c1 - c0)[:, :, None, None] * ramp[:, None]

    half = (0.28 + 0.14 * u[:, 6]).astype(np.float32)
    cx, cy = 0.5 + 0.16 * (u[:, 7] - 0.5), 0.5 + 0.16 * (u[:, 8] - 0.5)
    rot = (u[:, 9] - 0.5) * np.pi / 6  # +-15 degrees: a square never turns into the diamond class
    hue = np.array([class_hue(int(label)) for label in labels], dtype=np.float32)
    color = _hsv_to_rgb(hue, 0.75 + 0.25 * u[:, 10], 0.75 + 0.25 * u[:, 11])

    cos, sin = np.cos(rot)[:, None, None], np.sin(rot)[:, None, None]
    dx, dy = xs - cx[:, None, None], ys - cy[:, None, None]
    h = half[:, None, None]
    lu, lv = (dx * cos + dy * sin) / h, (-dx * sin + dy * cos) / h
    extent = np.empty((n, res, res), dtype=np.float32)
    shapes = labels % len(SHAPES)
    for shape in np.unique(shapes):
        rows = shapes == shape
        extent[rows] = _EXTENTS[shape](lu[rows], lv[rows])
    # One-pixel soft edge: (1 - extent) is the distance to the outline in half-size units.
    alpha = np.clip((1 - extent) * h * res + 0.5, 0, 1)[:, None]
    canvas += (color[:, :, None, None] - canvas) * alpha
    return np.clip(canvas * 255 + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0], dtype=np.float32)[None] + h[:, None] * 6) % 6
    return (v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1)).astype(np.float32)


# Each shape: object coordinates (u, v) -> extent (the outline at extent == 1).
def _radius(u, v):
    return np.sqrt(u * u + v * v)


def _star(u, v):
    a = np.arctan2(v, u) - np.pi / 2
    return _radius(u, v) / (0.5 + 0.5 * (0.5 + 0.5 * np.cos(5 * a)) ** 1.5)


_EXTENTS = (
    _radius,                                                                     # disc
    lambda u, v: np.maximum(np.abs(u), np.abs(v)) * 1.15,                        # square
    lambda u, v: 2 * np.maximum(np.maximum(-v - 0.1, 0.5 * (v + 0.1) + 0.866 * u), 0.5 * (v + 0.1) - 0.866 * u),
    lambda u, v: np.minimum(np.maximum(np.abs(u), 2.6 * np.abs(v)), np.maximum(2.6 * np.abs(u), np.abs(v))),
    lambda u, v: np.abs(_radius(u, v) - 0.68) / 0.32,                            # ring
    lambda u, v: np.abs(u) + np.abs(v),                                          # diamond
    _star,
    lambda u, v: np.maximum(0.866 * np.abs(u) + 0.5 * np.abs(v), np.abs(v)) * 1.05,  # hexagon
    lambda u, v: np.sqrt(u * u + (1.7 * v) ** 2),                                # ellipse
    lambda u, v: np.maximum(np.abs(u), 3.0 * np.abs(v)),                         # bar
)
assert len(_EXTENTS) == len(SHAPES)
