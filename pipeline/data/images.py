"""One image on its way from a source to a shard: the record a source yields, the centre crop every
source applies, decoding an image file and encoding pixels for a shard."""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class LoadedImage:
    split: str
    position: int                 # place in the split's fixed order (also the sample key)
    label: int
    origin: str                   # relative path under the ImageFolder root, or "synthetic/<split>/<index>"
    pixels: np.ndarray | None     # (R, R, 3) uint8, None when rejected
    reason: str = ""              # why it was rejected
    name: str = ""                # the sample key when not derived from the position (webdataset source)

    @property
    def key(self) -> str:
        # webdataset splits keys at the first dot, so keys carry none.
        return self.name or f"{self.split}_{self.position:08d}"


def center_crop_resize(image: Image.Image, resolution: int) -> np.ndarray:
    """RGB, shorter side resized to `resolution` (antialiased bicubic), centre crop to a square."""
    if image.mode in ("P", "LA", "PA") or (image.mode == "RGBA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)  # transparent pixels become white, not black
    image = image.convert("RGB")
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if new_size != image.size:
        # PIL's bicubic widens its kernel by the downscale factor: antialiased like torchvision's.
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    left, top = (new_size[0] - resolution) // 2, (new_size[1] - resolution) // 2
    return np.asarray(image.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)


def decode_image_file(path: Path, resolution: int) -> tuple[np.ndarray | None, str]:
    """(pixels, "") or (None, reason); never raises for a bad file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()  # decode now: truncated data surfaces here, not later in a worker
                return center_crop_resize(image, resolution), ""
    except Exception as err:  # noqa: BLE001 -- any decoder failure is a rejected input, not a crash
        return None, f"{type(err).__name__}: {err}"


def encode_image(pixels: np.ndarray, encoding: str) -> bytes:
    """PNG (lossless, deterministic for a given Pillow) or JPEG quality 95."""
    buffer = io.BytesIO()
    if encoding == "png":
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=6)
    elif encoding == "jpeg":
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95, subsampling=0)
    else:
        raise ValueError(f"unknown image encoding {encoding!r}")
    return buffer.getvalue()
