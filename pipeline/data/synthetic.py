"""The embedded default dataset: procedural, class-labelled images, no download.

Two styles (`data.synthetic_style`): `shapes` (synthetic_shapes.py: one large flat-coloured
object per image, classes told apart by shape and colour; the CPU demos use it) and `textures`
(this module: small textured objects, classes told apart by fine textures; harder).

In the `textures` style each image is a flat or smooth-gradient background (little information)
with one to three small objects carrying a fine texture (a lot of information), so a tokenizer
that spends codes where the information is (DQ-VAE) has something to find. The class is the object family
(shape + texture); classes beyond the twelve families reuse them at higher texture frequencies.

Every image is a pure function of (seed, split, index): its parameters come from a generator
seeded by those three numbers alone, so any worker can render any index in any order and two
renders of the same index are bit-identical. Rendering is vectorised numpy over a batch.
"""
from __future__ import annotations

import zlib

import numpy as np

from . import synthetic_shapes

FAMILIES = (
    "checker_disc", "striped_square", "dotted_triangle", "noise_blob", "striped_ring", "checker_cross",
    "ringed_diamond", "wavy_ellipse", "hatched_star", "plaid_hexagon", "spiral_disc", "speckled_rect",
)
# Texture cells across an object's half-width, per family (before per-image jitter).
_BASE_FREQUENCY = np.array([3.0, 3.5, 3.0, 4.0, 6.0, 4.0, 3.5, 3.0, 3.5, 3.0, 3.0, 7.0], dtype=np.float32)
MAX_OBJECTS = 3
_PARAMS_PER_OBJECT = 9
_NUM_PARAMS = 9 + MAX_OBJECTS * _PARAMS_PER_OBJECT
_RENDER_CHUNK = 256  # images per vectorised block: keeps the float32 working set in cache-sized pieces


STYLES = ("shapes", "textures")


def class_names(num_classes: int, style: str = "textures") -> list[str]:
    """textures: `family` for the first twelve classes, `family_fN` (N-th frequency variant) after
    that; shapes: `shape_colour`."""
    if style == "shapes":
        return synthetic_shapes.class_names(num_classes)
    names = []
    for label in range(num_classes):
        family, variant = label % len(FAMILIES), label // len(FAMILIES)
        names.append(FAMILIES[family] if variant == 0 else f"{FAMILIES[family]}_f{variant}")
    return names


def split_code(split: str) -> int:
    # A stable number per split name (crc32 is fixed across Python runs, unlike hash()).
    return zlib.crc32(split.encode("utf-8"))


def label_of(index: np.ndarray | int, num_classes: int):
    """Labels cycle through the classes, so every split is class-balanced."""
    return np.asarray(index, dtype=np.int64) % num_classes


def _image_uniforms(seed: int, split: str, indices: np.ndarray) -> np.ndarray:
    code = split_code(split)
    params = [np.random.default_rng([seed, code, int(i)]).random(_NUM_PARAMS) for i in indices]
    return np.stack(params).astype(np.float32)


def render(seed: int, split: str, indices, resolution: int, num_classes: int,
           style: str = "textures") -> tuple[np.ndarray, np.ndarray]:
    """Images (n, R, R, 3) uint8 and labels (n,) int64 for the given sample indices."""
    if style not in STYLES:
        raise ValueError(f"synthetic style {style!r}: choose one of {', '.join(STYLES)}")
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    images = np.empty((len(indices), resolution, resolution, 3), dtype=np.uint8)
    for start in range(0, len(indices), _RENDER_CHUNK):
        block = indices[start:start + _RENDER_CHUNK]
        if style == "shapes":
            u = _image_uniforms(seed, split, block)
            images[start:start + len(block)] = synthetic_shapes.render_block(u, label_of(block, num_classes),
                                                                             resolution)
        else:
            images[start:start + len(block)] = _render_block(seed, split, block, resolution, num_classes)
    return images, label_of(indices, num_classes)


def _render_block(seed, split, indices, resolution, num_classes) -> np.ndarray:
    res = resolution
    u = _image_uniforms(seed, split, indices)
    grid = (np.arange(res, dtype=np.float32) + 0.5) / res
    ys, xs = grid[None, :, None], grid[None, None, :]

    # Background: muted colours, a linear gradient in a random direction, flat 30% of the time.
    c0 = 0.15 + 0.7 * u[:, 1:4]
    c1 = np.where(u[:, :1] < 0.3, c0, 0.15 + 0.7 * u[:, 4:7])
    angle = u[:, 7] * 2 * np.pi
    ramp = ((xs - 0.5) * np.cos(angle)[:, None, None] + (ys - 0.5) * np.sin(angle)[:, None, None]) / np.sqrt(2) + 0.5
    # Channels first while painting: numpy broadcasts over a trailing axis of 3 very slowly.
    canvas = c0[:, :, None, None] + (c1 - c0)[:, :, None, None] * ramp[:, None]

    labels = label_of(indices, num_classes)
    families, variants = labels % len(FAMILIES), labels // len(FAMILIES)
    num_objects = 1 + np.minimum((u[:, 8] * MAX_OBJECTS).astype(np.int64), MAX_OBJECTS - 1)
    # Paint in (family, most objects first) order: then each family's images holding a k-th
    # object are one contiguous slice, composited in place instead of gathered and scattered.
    order = np.lexsort((-num_objects, families))
    u, families, variants, num_objects = u[order], families[order], variants[order], num_objects[order]
    canvas = canvas[order]
    for k in range(MAX_OBJECTS):
        p = u[:, 9 + k * _PARAMS_PER_OBJECT: 9 + (k + 1) * _PARAMS_PER_OBJECT]
        half = 0.09 + 0.11 * p[:, 2]                      # half-size as a fraction of the image side
        cx, cy = half + (1 - 2 * half) * p[:, 0], half + (1 - 2 * half) * p[:, 1]
        rot = p[:, 3] * 2 * np.pi
        freq = (_BASE_FREQUENCY[families] * (1 + 0.5 * (variants % 4)) * (0.85 + 0.3 * p[:, 4])).astype(np.float32)
        phase = p[:, 5] * 2 * np.pi
        color_a = p[:, 6:9]
        color_b = np.where(color_a > 0.5, color_a - 0.5, color_a + 0.5)  # a contrasting partner colour
        for family in np.unique(families):
            first = np.searchsorted(families, family)
            rows = slice(first, first + int(np.count_nonzero((families == family) & (num_objects > k))))
            if rows.stop == rows.start:
                continue
            cos, sin = np.cos(rot[rows])[:, None, None], np.sin(rot[rows])[:, None, None]
            dx, dy = xs - cx[rows, None, None], ys - cy[rows, None, None]
            h = half[rows, None, None]
            lu, lv = (dx * cos + dy * sin) / h, (-dx * sin + dy * cos) / h
            extent, texture = _FAMILY_FUNCS[family](lu, lv, freq[rows, None, None], phase[rows, None, None])
            # One-pixel soft edge: (1 - extent) is the distance to the outline in half-size units.
            alpha = np.clip((1 - extent) * h * res + 0.5, 0, 1)[:, None]
            color = color_b[rows, :, None, None] + (color_a - color_b)[rows, :, None, None] * texture[:, None]
            target = canvas[rows]
            target += (color - target) * alpha
    canvas = canvas[np.argsort(order)]
    return np.clip(canvas * 255 + 0.5, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


# Each family: (u, v, freq, phase) in object coordinates (outline at extent == 1) ->
# (extent, texture in [0, 1]).

def _radius(u, v):
    return np.sqrt(u * u + v * v)


def _cell_hash(i, j, phase):
    """A per-cell value in [0, 1) from integer mixing: exact on every CPU, unlike a sine hash."""
    with np.errstate(over="ignore"):
        h = (i.astype(np.int64).astype(np.uint32) * np.uint32(0x9E3779B1)) ^ \
            (j.astype(np.int64).astype(np.uint32) * np.uint32(0x85EBCA77)) ^ (phase * 1e6).astype(np.uint32)
        h ^= h >> np.uint32(15)
        h *= np.uint32(0x2C1B3C6D)
        h ^= h >> np.uint32(12)
    return (h >> np.uint32(8)).astype(np.float32) / np.float32(1 << 24)


def _checker_disc(u, v, f, ph):
    return _radius(u, v), ((np.floor(u * f) + np.floor(v * f)) % 2).astype(np.float32)


def _striped_square(u, v, f, ph):
    return np.maximum(np.abs(u), np.abs(v)), (np.sin(u * f * np.pi + ph) > 0).astype(np.float32)


def _dotted_triangle(u, v, f, ph):
    extent = 2 * np.maximum(np.maximum(-v, 0.5 * v + 0.866 * u), 0.5 * v - 0.866 * u)
    fu, fv = np.modf(np.abs(u * f + 10))[0] - 0.5, np.modf(np.abs(v * f + 10))[0] - 0.5
    return extent, (fu * fu + fv * fv < 0.09).astype(np.float32)


def _noise_blob(u, v, f, ph):
    a = np.arctan2(v, u)
    extent = _radius(u, v) / (0.8 + 0.15 * np.sin(3 * a + ph) + 0.08 * np.sin(5 * a + 2 * ph))
    return extent, _cell_hash(np.floor(u * f), np.floor(v * f), ph)


def _striped_ring(u, v, f, ph):
    r = _radius(u, v)
    return np.abs(r - 0.7) / 0.3, (np.sin(np.arctan2(v, u) * np.round(f * 2) + ph) > 0).astype(np.float32)


def _checker_cross(u, v, f, ph):
    au, av = np.abs(u), np.abs(v)
    extent = np.minimum(np.maximum(au, 2.8 * av), np.maximum(2.8 * au, av))
    return extent, ((np.floor((u + v) * f) + np.floor((u - v) * f)) % 2).astype(np.float32)


def _ringed_diamond(u, v, f, ph):
    return np.abs(u) + np.abs(v), (np.sin(_radius(u, v) * f * np.pi + ph) > 0).astype(np.float32)


def _wavy_ellipse(u, v, f, ph):
    extent = np.sqrt(u * u + (1.6 * v) ** 2)
    return extent, (np.sin((v + 0.15 * np.sin(u * f * 0.8 * np.pi + ph)) * f * np.pi) > 0).astype(np.float32)


def _hatched_star(u, v, f, ph):
    a = np.arctan2(v, u) + ph
    extent = _radius(u, v) / (0.45 + 0.55 * (0.5 + 0.5 * np.cos(5 * a)) ** 2)
    return extent, (np.sin((u + v) * f * np.pi) > 0).astype(np.float32)


def _plaid_hexagon(u, v, f, ph):
    au, av = np.abs(u), np.abs(v)
    extent = np.maximum(0.866 * au + 0.5 * av, av)
    texture = 0.5 * (np.sin(u * f * np.pi + ph) > 0) + 0.5 * (np.sin(v * f * 0.7 * np.pi) > 0)
    return extent, texture.astype(np.float32)


def _spiral_disc(u, v, f, ph):
    return _radius(u, v), (np.sin(2 * np.arctan2(v, u) + _radius(u, v) * f * np.pi + ph) > 0).astype(np.float32)


def _speckled_rect(u, v, f, ph):
    extent = np.maximum(np.abs(u), 1.6 * np.abs(v))
    return extent, (_cell_hash(np.floor(u * f), np.floor(v * f), ph) > 0.5).astype(np.float32)


_FAMILY_FUNCS = (_checker_disc, _striped_square, _dotted_triangle, _noise_blob, _striped_ring, _checker_cross,
                 _ringed_diamond, _wavy_ellipse, _hatched_star, _plaid_hexagon, _spiral_disc, _speckled_rect)
assert len(_FAMILY_FUNCS) == len(FAMILIES)
