"""Encoding images into code rows, and writing one code unit (an MDS directory + sidecar).

    layout = CodeLayout.for_tokenizer(model, tokenizer_meta, store_latents=...)
    encoder = CodeEncoder(model, layout, device, precision)
    rows = encoder.encode(images_BCHW, labels_B, indices_B, keys, views, stats)   # one row per (image, view)
    fields = write_code_unit(path, rows_iter, layout, stats)     # inside pipeline.runner.units.publish_unit

Rows of a unit are image-major (image i: views 0..V-1), so the row of (image, view) is
`(image - unit.start) * V + view`. Columns (MDS encodings):

    RQ/VQ: codes_HWD  ndarray int16 (int32 when K > 32767)      latent_CHW  ndarray float16 (store_latents)
    DQ:    positions_L / contents_L / granularity_L (DQ-Transformer order, see models/dq_order),
           length int, granularity_map_HcWc uint8
    all:   key str, label int, index int (position in the split), view int
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from ..models.dq_order import to_dq_order
from .shards import write_mds_dir

VIEW_NAMES = {"none": ["orig"], "hflip": ["orig", "hflip"],
              "tencrop": ["orig", "tl", "tr", "bl", "br", "center",
                          "flip_tl", "flip_tr", "flip_bl", "flip_br", "flip_center"]}


def code_dtype(codebook_size: int) -> str:
    return "int16" if codebook_size <= np.iinfo(np.int16).max else "int32"


@dataclass(frozen=True)
class CodeLayout:
    kind: str                      # vq | rq | dq
    codebook_size: int
    code_shape: tuple              # RQ: (H, W, D); DQ: (Hc, Wc) coarse grid (fine grid is 2x)
    latent_shape: tuple | None     # RQ with store_latents: (C, H, W)
    columns: dict = field(default_factory=dict)

    @classmethod
    def for_tokenizer(cls, model, meta: dict, *, store_latents: bool) -> "CodeLayout":
        tok = meta["tokenizer"]
        kind, K = tok["kind"], int(tok["codebook_size"])
        dt = code_dtype(K)
        columns = {"key": "str", "label": "int", "index": "int", "view": "int"}
        if kind == "dq":
            side = int(model.coarse_side)
            pos_dt = code_dtype((2 * side) ** 2)
            columns.update({"positions_L": f"ndarray:{pos_dt}", "contents_L": f"ndarray:{dt}",
                            "granularity_L": "ndarray:uint8", "length": "int",
                            "granularity_map_HcWc": f"ndarray:uint8:{side},{side}"})
            return cls(kind, K, (side, side), None, columns)
        H, W, D = model.code_shape
        columns["codes_HWD"] = f"ndarray:{dt}:{H},{W},{D}"
        latent = None
        if store_latents:
            latent = (int(tok["z_channels"]), H, W)
            columns["latent_CHW"] = "ndarray:float16:" + ",".join(map(str, latent))
        return cls(kind, K, (H, W, D), latent, columns)

    @property
    def histogram_rows(self) -> list[str]:
        """What each row of the code histogram counts: a depth (RQ) or a granularity (DQ)."""
        return ["coarse", "fine"] if self.kind == "dq" else [f"depth{d}" for d in range(self.code_shape[2])]


class UnitStats:
    """Per-unit counts: images, rows, code histogram per depth/granularity, DQ lengths."""

    def __init__(self, layout: CodeLayout):
        self.histogram_RK = torch.zeros(len(layout.histogram_rows), layout.codebook_size, dtype=torch.long)
        self.images = self.samples = self.length_sum = self.length_max = 0

    def to_json(self) -> dict:
        return {"images": self.images, "samples": self.samples, "length_sum": self.length_sum,
                "length_max": self.length_max, "histogram": self.histogram_RK.tolist()}


def make_views(images_BCHW: torch.Tensor, augment: str, crop_range: float) -> list[torch.Tensor]:
    """The encoded views of a batch, indexed by view id (VIEW_NAMES). View 0 is always the image itself.

    tencrop follows LlamaGen: upscale by crop_range, take the 4 corner crops and the center crop at
    the original size, then the same five of the horizontally flipped upscale.
    """
    views = [images_BCHW]
    if augment == "hflip":
        views.append(images_BCHW.flip(-1))
    elif augment == "tencrop":
        R = images_BCHW.shape[-1]
        S = max(R, int(round(R * crop_range)))
        big = F.interpolate(images_BCHW.float(), size=(S, S), mode="bicubic", align_corners=False).clamp_(-1, 1)
        m, c = S - R, int(round((S - R) / 2.0))
        offsets = [(0, 0), (0, m), (m, 0), (m, m), (c, c)]
        for source in (big, big.flip(-1)):
            views.extend(source[..., top:top + R, left:left + R] for top, left in offsets)
    return views


class CodeEncoder:
    """Runs the tokenizer on batches and turns its outputs into MDS rows."""

    def __init__(self, model, layout: CodeLayout, device: torch.device, precision: str):
        self.model, self.layout, self.device = model, layout, device
        self.bf16 = precision == "bf16"
        self.np_dtype = np.dtype(code_dtype(layout.codebook_size))

    def autocast(self):
        """bf16 autocast when configured, else a no-op context."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @torch.no_grad()
    def encode_view(self, images_BCHW: torch.Tensor):
        """RQ: (codes_BHWD int64, latent_BCHW fp16 or None); DQ: DQCodes. All on the CPU."""
        x = images_BCHW.to(self.device, non_blocking=True)
        with self.autocast():
            if self.layout.kind == "dq":
                codes = self.model.encode(x)
                codes.code_map_BHW, codes.granularity_BHcWc = codes.code_map_BHW.cpu(), codes.granularity_BHcWc.cpu()
                return codes
            z_BCHW = self.model.encode_latent(x)
            codes_BHWD = self.model.quantizer.encode(z_BCHW).cpu()
        latent = z_BCHW.float().half().cpu() if self.layout.latent_shape is not None else None
        return codes_BHWD, latent

    def encode(self, images_BCHW: torch.Tensor, labels_B, indices_B, keys: list[str], views: list[torch.Tensor],
               stats: UnitStats) -> list[dict]:
        """Rows for every (image, view), image-major; updates `stats`."""
        B, V = images_BCHW.shape[0], len(views)
        per_view = [self._rows(view, labels_B, indices_B, keys, v, stats) for v, view in enumerate(views)]
        stats.images += B
        stats.samples += B * V
        return [per_view[v][b] for b in range(B) for v in range(V)]

    def _rows(self, view_BCHW, labels_B, indices_B, keys, view_id: int, stats: UnitStats) -> list[dict]:
        out = self.encode_view(view_BCHW)
        base = [{"key": keys[b], "label": int(labels_B[b]), "index": int(indices_B[b]), "view": view_id}
                for b in range(len(keys))]
        K = self.layout.codebook_size
        if self.layout.kind == "dq":
            for b, row in enumerate(base):
                pos, content, gran = to_dq_order(out.code_map_BHW[b], out.granularity_BHcWc[b])
                pos_dt = self.layout.columns["positions_L"].split(":")[1]
                row.update(positions_L=pos.numpy().astype(pos_dt), contents_L=content.numpy().astype(self.np_dtype),
                           granularity_L=gran.numpy().astype(np.uint8), length=int(pos.numel()),
                           granularity_map_HcWc=out.granularity_BHcWc[b].numpy().astype(np.uint8))
                for g in (0, 1):
                    stats.histogram_RK[g] += torch.bincount(content[gran == g], minlength=K)
                stats.length_sum += int(pos.numel())
                stats.length_max = max(stats.length_max, int(pos.numel()))
            return base
        codes_BHWD, latent = out
        for d in range(codes_BHWD.shape[-1]):
            stats.histogram_RK[d] += torch.bincount(codes_BHWD[..., d].flatten(), minlength=K)
        codes_np = codes_BHWD.numpy().astype(self.np_dtype)
        for b, row in enumerate(base):
            row["codes_HWD"] = codes_np[b]
            if latent is not None:
                row["latent_CHW"] = latent[b].numpy()
        return base


def write_code_unit(path: Path, rows: Iterable[dict], layout: CodeLayout, stats: UnitStats) -> dict:
    """Write one code unit (an MDS directory, renamed into place); returns its sidecar fields."""
    count = write_mds_dir(path, layout.columns, rows)
    return {"count": count, **stats.to_json()}
