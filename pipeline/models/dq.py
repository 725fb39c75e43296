"""DQ-VAE: dynamic (coarse/fine) quantization with a learned or an entropy router.

One encoder trunk, two heads: fine features at the level whose side is 2x the coarse grid, coarse
at the last level. A router picks, per coarse region, either one coarse code or four fine codes.
The chosen features are merged into one fine-grid map (coarse cells copied 2x2), quantized by a
single shared VQ, and decoded by a decoder that adds 2-D position embeddings, since the copied
coarse codes otherwise carry no information about where inside the region a cell lies.

By default training follows the authors' code (docs/fidelity.md), each item switchable by its
`tokenizer.*` key: the learned router's gradient comes from multiplying the chosen branch by its
hard gate (`dq_gate_on_chosen`), the VQ loss / EMA use the authors' weighting (`dq_unweighted_vq`,
in the quantizer), the entropy router uses a Gaussian-kernel histogram (`dq_gaussian_entropy`), and
the router's GroupNorm and the decoder's Fourier + row/column position embedding are theirs
(`dq_authors_layers`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from .autoencoder import Decoder, EncoderHead, EncoderTrunk, Normalize
from .quantizer import VectorQuantizer
from .tokenizer_config import fidelity
from .tokenizers import Tokenizer, TokenizerAux, _arch_kwargs, quantizer_kwargs


def _keep_mask(granularity_BHcWc: torch.Tensor) -> torch.Tensor:
    """(B, Hc*Wc, 4) bool: which of a region's 2x2 fine-cell codes enter the sequence."""
    fine = rearrange(granularity_BHcWc.bool(), "b h w -> b (h w) 1")
    return torch.cat([torch.ones_like(fine), fine.expand(-1, -1, 3)], dim=-1)


@dataclass
class DQCodes:
    """Variable-length DQ codes.

    sequences: per image, raster order over coarse regions; a coarse region contributes 1 code,
      a fine region its 4 codes in 2x2 raster order. Length = coarse regions + 4 * fine regions.
    granularity_BHcWc: int64, 0 coarse / 1 fine.
    code_map_BHW: int64 fine-grid codes (2Hc x 2Wc), coarse codes copied to their 4 cells.
    """
    sequences: list[torch.Tensor]
    granularity_BHcWc: torch.Tensor
    code_map_BHW: torch.Tensor

    @classmethod
    def from_code_map(cls, code_map_BHW: torch.Tensor, granularity_BHcWc: torch.Tensor) -> "DQCodes":
        blocks = rearrange(code_map_BHW, "b (h p) (w q) -> b (h w) (p q)", p=2, q=2)
        keep = _keep_mask(granularity_BHcWc)
        return cls([blocks[b][keep[b]] for b in range(blocks.shape[0])], granularity_BHcWc, code_map_BHW)

    @classmethod
    def from_sequences(cls, sequences: list[torch.Tensor], granularity_BHcWc: torch.Tensor) -> "DQCodes":
        """Inverse of `from_code_map` (what a DQ prior produces -> what the decoder needs)."""
        B, Hc, Wc = granularity_BHcWc.shape
        keep = _keep_mask(granularity_BHcWc)
        blocks = torch.zeros(B, Hc * Wc, 4, dtype=torch.long, device=granularity_BHcWc.device)
        for b, seq in enumerate(sequences):
            if seq.numel() != int(keep[b].sum()):
                raise ValueError(f"image {b}: sequence has {seq.numel()} codes, granularity map needs "
                                 f"{int(keep[b].sum())} (coarse regions + 4 x fine regions)")
            blocks[b][keep[b]] = seq.to(blocks.device)
        coarse = ~keep[..., 1]
        blocks[coarse] = blocks[coarse][:, :1].expand(-1, 4)
        code_map = rearrange(blocks, "b (h w) (p q) -> b (h p) (w q)", h=Hc, w=Wc, p=2, q=2)
        return cls(list(sequences), granularity_BHcWc, code_map)

    def lengths(self) -> torch.Tensor:
        g = self.granularity_BHcWc
        return (g == 0).sum((1, 2)) + 4 * (g == 1).sum((1, 2))


def patch_entropy(images_BCHW: torch.Tensor, grid: int, bins: int = 32, *, kernel: str = "gaussian",
                  sigma: float = 0.01) -> torch.Tensor:
    """Entropy (nats) of a soft grayscale histogram with `bins` centres over [-1, 1] in each of
    grid x grid patches. Returns (B, grid, grid).

    kernel="gaussian" (the authors' Entropy module): gray = 0.2989 R + 0.5870 G + 0.1140 B, not
    clamped; each pixel adds exp(-(v - c)^2 / (2 sigma^2)) to every bin c; the patch histogram is the
    mean over its pixels, normalised to sum 1 (+1e-40), and +1e-40 inside the log. With sigma 0.01
    and 32 bins (spacing 0.065) a pixel counts only near a bin centre: a flat patch scores ~0.
    kernel="triangular" (ours before): linear bin assignment on clamped gray (0.299/0.587/0.114), a
    smooth function of the pixels whose weights sum to 1 per pixel; a flat patch between two
    centres scores up to ln 2.
    """
    rgb = images_BCHW.float()
    centers_K = torch.linspace(-1, 1, bins, device=rgb.device)
    if kernel == "gaussian":
        gray_BHW = (0.2989 * rgb[:, 0] + 0.5870 * rgb[:, 1] + 0.1140 * rgb[:, 2]) if rgb.shape[1] == 3 else rgb[:, 0]
        w_BHWK = torch.exp(-0.5 * ((gray_BHW[..., None] - centers_K) / sigma).pow(2))
        pdf = rearrange(w_BHWK, "b (h p) (w q) k -> b h w (p q) k", h=grid, w=grid).mean(-2)
        pdf = pdf / (pdf.sum(-1, keepdim=True) + 1e-40) + 1e-40
        return -(pdf * torch.log(pdf)).sum(-1)
    if kernel != "triangular":
        raise ValueError(f"patch_entropy: unknown kernel {kernel!r}; 'gaussian' or 'triangular'")
    rgb = rgb.clamp(-1, 1)
    gray_BHW = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]) if rgb.shape[1] == 3 else rgb[:, 0]
    w_BHWK = F.relu(1 - (gray_BHW[..., None] - centers_K).abs() * ((bins - 1) / 2))
    hist = rearrange(w_BHWK, "b (h p) (w q) k -> b h w (p q) k", h=grid, w=grid).mean(-2)
    return -(hist * torch.log(hist.clamp_min(1e-12))).sum(-1)


class AuthorsPositionEmbedding(nn.Module):
    """The authors' DQ decoder position bias ("fourier+learned"), added to the side x side latent:
    sin(W [x, y] + b) with (x, y) on linspace(-1, 1) grids (x along the width) and W uniform in
    +-sqrt(9/2) (a SIREN-style first layer), then row_embed[i] + col_embed[j], both truncated
    normal (std 1, cut at +-2)."""

    def __init__(self, channels: int, side: int):
        super().__init__()
        self.side = side
        self.fourier = nn.Conv2d(2, channels, 1)
        nn.init.uniform_(self.fourier.weight, -math.sqrt(9 / 2), math.sqrt(9 / 2))
        self.row_embed = nn.Embedding(side, channels)
        self.col_embed = nn.Embedding(side, channels)
        for emb in (self.row_embed, self.col_embed):
            nn.init.trunc_normal_(emb.weight, std=1.0, a=-2.0, b=2.0)

    def coords(self, device, dtype) -> torch.Tensor:
        """(1, 2, side, side): channel 0 = x (varies along the width), 1 = y (along the height)."""
        t = torch.linspace(-1, 1, self.side, device=device, dtype=dtype)
        return torch.stack([t[None, :].expand(self.side, -1), t[:, None].expand(-1, self.side)])[None]

    def forward(self, h_BCHW: torch.Tensor) -> torch.Tensor:
        h_BCHW = h_BCHW + torch.sin(self.fourier(self.coords(h_BCHW.device, h_BCHW.dtype)))
        pos = self.row_embed.weight[:, None, :] + self.col_embed.weight[None, :, :]  # (rows, cols, C)
        return h_BCHW + rearrange(pos, "h w c -> 1 c h w").to(h_BCHW.dtype)


class DQTokenizer(Tokenizer):
    """images (B,3,R,R) -> DQCodes over a coarse grid R/f and a fine grid 2R/f."""

    def __init__(self, cfg, resolution: int):
        super().__init__()
        if cfg.granularities != 2:
            raise ValueError("DQTokenizer implements granularities=2 (coarse + fine) only")
        z = cfg.z_channels
        self.resolution, self.router_kind = resolution, cfg.router
        self.target_ratio = cfg.target_ratio
        self.gumbel_tau, self.coarse_vq_weight = cfg.gumbel_tau, cfg.coarse_vq_weight
        self.entropy_bins = cfg.entropy_bins
        self.coarse_side = resolution // cfg.downsample_factor
        # Fidelity switches (see the module docstring); each follows tokenizer.reference_behaviour.
        self.gate_on_chosen = fidelity(cfg, "dq_gate_on_chosen")
        self.entropy_kernel = "gaussian" if fidelity(cfg, "dq_gaussian_entropy") else "triangular"
        self.entropy_sigma = getattr(cfg, "entropy_sigma", 0.01)
        self.authors_layers = fidelity(cfg, "dq_authors_layers")
        arch = _arch_kwargs(cfg)
        self.trunk = EncoderTrunk(resolution=resolution, **arch)
        self.fine_head = EncoderHead(self.trunk.level_channels[-2], z, cfg.dropout, cfg.grad_checkpointing)
        self.coarse_head = EncoderHead(self.trunk.level_channels[-1], z, cfg.dropout, cfg.grad_checkpointing)
        if self.authors_layers:  # the authors' "group-32" (gcd: GroupNorm needs a divisor of z)
            self.router_norm_fine = nn.GroupNorm(math.gcd(32, z), z, eps=1e-6, affine=True)
            self.router_norm_coarse = nn.GroupNorm(math.gcd(32, z), z, eps=1e-6, affine=True)
        else:
            self.router_norm_fine, self.router_norm_coarse = Normalize(z), Normalize(z)
        self.router_mlp = nn.Sequential(nn.Linear(2 * z, 2 * z), nn.SiLU(), nn.Linear(2 * z, 2))
        self.quant_conv = nn.Conv2d(z, z, 1)
        self.quantizer = VectorQuantizer(z, cfg.codebook_size, **quantizer_kwargs(cfg),
                                         authors_weighting=fidelity(cfg, "dq_unweighted_vq"))
        self.post_quant_conv = nn.Conv2d(z, z, 1)
        if self.authors_layers:
            self.position_bias = AuthorsPositionEmbedding(z, 2 * self.coarse_side)
        else:
            self.pos_embed = nn.Parameter(torch.randn(1, z, 2 * self.coarse_side, 2 * self.coarse_side) * 0.02)
        # The decoder starts from the fine grid: one level (one upsampling) fewer than the encoder.
        self.decoder = Decoder(resolution=resolution, z_channels=z, **dict(arch, ch_mult=list(cfg.ch_mult)[:-1]))
        # Entropy router threshold: set by `calibrate_entropy_threshold`, saved with the model.
        self.register_buffer("entropy_threshold", torch.tensor(float("nan")))

    # ---- routing -------------------------------------------------------------------------
    def router_logits(self, h_fine_BCHW: torch.Tensor, h_coarse_BCHW: torch.Tensor) -> torch.Tensor:
        """(B, Hc, Wc, 2) logits [coarse, fine] per coarse region."""
        fine = F.avg_pool2d(self.router_norm_fine(h_fine_BCHW), 2)
        feats = torch.cat([self.router_norm_coarse(h_coarse_BCHW), fine], dim=1)
        return self.router_mlp(rearrange(feats, "b c h w -> b h w c"))

    def patch_entropy(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """The entropy router's statistic (B, Hc, Wc) with this model's histogram settings."""
        return patch_entropy(images_BCHW, self.coarse_side, self.entropy_bins, kernel=self.entropy_kernel,
                             sigma=self.entropy_sigma)

    def route(self, images_BCHW, h_fine_BCHW, h_coarse_BCHW) -> torch.Tensor:
        """One-hot gates (B, Hc, Wc, 2) [coarse, fine] in {0, 1}; straight-through (hard Gumbel-softmax)
        in learned training mode, so both entries carry the router's gradient."""
        if self.router_kind == "entropy":
            if torch.isnan(self.entropy_threshold):
                raise RuntimeError("DQ entropy router: threshold not set; call "
                                   "pipeline.models.dq.calibrate_entropy_threshold(model, batches) first")
            fine = (self.patch_entropy(images_BCHW) > self.entropy_threshold).to(h_fine_BCHW.dtype)
            return torch.stack([1 - fine, fine], dim=-1)
        logits = self.router_logits(h_fine_BCHW, h_coarse_BCHW)
        if self.training:
            return F.gumbel_softmax(logits.float(), tau=self.gumbel_tau, hard=True).to(h_fine_BCHW.dtype)
        return F.one_hot(logits.argmax(-1), 2).to(h_fine_BCHW.dtype)

    @staticmethod
    def merge(h_fine_BCHW, h_coarse_BCHW, gate_BHcWc2, gate_on_chosen: bool = True) -> torch.Tensor:
        """One fine-grid map: fine features where the gate says fine, coarse features copied 2x2 elsewhere.

        gate_on_chosen (the authors): the chosen branch times its gate entry (1 in value), so a gate's
        gradient is <g, h_chosen> over its 2x2 cells. Otherwise gate*fine + (1-gate)*coarse with the
        fine entry, gradient <g, h_fine - h_coarse>: what switching would change. Same forward value.
        """
        coarse_up = F.interpolate(h_coarse_BCHW, scale_factor=2.0, mode="nearest")
        if gate_on_chosen:
            fine = repeat(gate_BHcWc2.argmax(-1) == 1, "b h w -> b 1 (h p) (w q)", p=2, q=2)
            chosen = repeat(gate_BHcWc2.max(-1).values, "b h w -> b 1 (h p) (w q)", p=2, q=2)
            merged = torch.where(fine, h_fine_BCHW, coarse_up)
            return merged * chosen if chosen.requires_grad else merged
        gate = repeat(gate_BHcWc2[..., 1], "b h w -> b 1 (h p) (w q)", p=2, q=2)
        return gate * h_fine_BCHW + (1 - gate) * coarse_up

    def _features(self, images_BCHW):
        """(quant_conv(merged features), one-hot gates (B, Hc, Wc, 2))."""
        levels = self.trunk(images_BCHW)
        h_fine, h_coarse = self.fine_head(levels[-2]), self.coarse_head(levels[-1])
        gate = self.route(images_BCHW, h_fine, h_coarse)
        return self.quant_conv(self.merge(h_fine, h_coarse, gate, self.gate_on_chosen)), gate

    # ---- interface -----------------------------------------------------------------------
    def forward(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, TokenizerAux]:
        z_BCHW, gate2 = self._features(images_BCHW)
        gate = gate2[..., 1]  # 1 = fine
        # Each of a coarse code's 4 copies weighs coarse_vq_weight (0.25: the code counts once).
        hard_gate = gate.detach().round()  # straight-through gates can be 1 +- 1 ulp; weights must be exact
        fine_cells = repeat(hard_gate, "b h w -> b (h p) (w q)", p=2, q=2)
        weight_BHW = fine_cells + (1 - fine_cells) * self.coarse_vq_weight
        q = self.quantizer(z_BCHW, weight_BHW)
        recon = self.decode_latent(q.zq_BCHW)
        # With the learned router the ratio keeps its gradient (straight-through gates), so the
        # budget loss (pipeline.losses.budget, added by the trainer) can move the router.
        fine_ratio = gate.mean()
        codes_per_image = (1 + 3 * hard_gate).sum((1, 2)).float().mean()
        return recon, TokenizerAux(quant_loss=q.loss, usage_D=q.usage_D, perplexity_D=q.perplexity_D,
                                   fine_ratio=fine_ratio, extra={"codes_per_image": codes_per_image})

    def decode_latent(self, zq_BCHW: torch.Tensor) -> torch.Tensor:
        h = self.post_quant_conv(zq_BCHW)
        return self.decoder(self.position_bias(h) if self.authors_layers else h + self.pos_embed)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A DQ tokenizer saved before the fidelity switches existed has one learned position map and adaptive
        # router groups.
        if self.authors_layers and prefix + "pos_embed" in state_dict:
            raise RuntimeError("this DQ tokenizer was trained with the single learned position map (before the "
                               "authors' layers became the default): load it with tokenizer.dq_authors_layers: false")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def encode(self, images_BCHW: torch.Tensor) -> DQCodes:
        was_training = self.training
        self.eval()  # argmax routing; never touch the EMA codebook
        try:
            z_BCHW, gate = self._features(images_BCHW)
            code_map = self.quantizer.encode(z_BCHW)[..., 0]
        finally:
            self.train(was_training)
        return DQCodes.from_code_map(code_map, gate[..., 1].long())

    def decode(self, codes: DQCodes) -> torch.Tensor:
        return self.decode_latent(self.quantizer.lookup(codes.code_map_BHW[..., None]))

    def codes_per_image(self, codes: DQCodes) -> torch.Tensor:
        return codes.lengths()


@torch.no_grad()
def calibrate_entropy_threshold(model: DQTokenizer, batches: Iterable[torch.Tensor],
                                max_batches: int | None = None) -> float:
    """Set the entropy router's threshold to the data percentile that makes `target_ratio` of regions fine.

    `batches` yields images (B,3,R,R) in [-1,1] (or (images, labels) tuples). Returns the threshold.
    """
    values = []
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        values.append(model.patch_entropy(images).flatten().cpu())
    if not values:
        raise ValueError("calibrate_entropy_threshold: the batch iterator yielded no images")
    ent = torch.cat(values).sort().values
    # Regions strictly above the (1 - target) quantile are fine, so ~target_ratio of them end up fine.
    k = min(int(round((1.0 - model.target_ratio) * ent.numel())), ent.numel() - 1)
    threshold = float(ent[k]) if model.target_ratio < 1.0 else float(ent[0]) - 1.0
    model.entropy_threshold.fill_(threshold)
    return threshold
