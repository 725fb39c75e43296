"""The tokenizer interface shared by VQ, RQ and DQ, and the VQ/RQ tokenizer.

Every tokenizer maps images in [-1, 1] to discrete codes and back:
  encode(images_BCHW) -> codes          decode(codes) -> images_BCHW
  codes_per_image(codes) -> LongTensor  forward(images) -> (recon, TokenizerAux)   [training]
  get_last_layer() -> decoder's final conv weight (for the adaptive GAN weight)
VQ is not a separate class: it is `RQTokenizer` with depth 1 (see quantizer.VectorQuantizer).
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch
from torch import nn

from .autoencoder import Decoder, Encoder
from .quantizer import ResidualQuantizer


@dataclass
class TokenizerAux:
    """What `forward` returns beside the reconstruction: losses to add and stats to log."""
    quant_loss: torch.Tensor                    # beta * commitment (VQ) loss, already weighted
    usage_D: torch.Tensor                       # codebook usage % per depth (local batch)
    perplexity_D: torch.Tensor                  # code perplexity per depth
    fine_ratio: torch.Tensor | None = None      # DQ: mean fraction of fine regions (learned router: with grad)
    extra: dict = field(default_factory=dict)   # anything model-specific worth logging

    def logs(self) -> dict[str, float]:
        out = {"quant_loss": float(self.quant_loss.detach())}
        for d in range(self.usage_D.numel()):
            out[f"usage_d{d}"] = float(self.usage_D[d])
            out[f"perplexity_d{d}"] = float(self.perplexity_D[d])
        if self.fine_ratio is not None:
            out["fine_ratio"] = float(self.fine_ratio.detach())
        out.update({k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in self.extra.items()})
        return out


class Tokenizer(nn.Module, abc.ABC):
    """Abstract base: the interface the trainers and the priors rely on (a subclass that misses
    a method cannot be instantiated)."""

    resolution: int

    @abc.abstractmethod
    def encode(self, images_BCHW: torch.Tensor):
        """images in [-1, 1] -> codes (RQ/VQ: LongTensor B,H,W,D; DQ: DQCodes)."""

    @abc.abstractmethod
    def decode(self, codes) -> torch.Tensor:
        """codes -> images (B, 3, R, R)."""

    @abc.abstractmethod
    def codes_per_image(self, codes) -> torch.Tensor:
        """LongTensor (B,): how many codes each image spends."""

    @abc.abstractmethod
    def forward(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, TokenizerAux]:
        """Training pass: (reconstruction, losses and stats)."""

    def get_last_layer(self) -> torch.Tensor:
        return self.decoder.last_layer


def _arch_kwargs(cfg) -> dict:
    return dict(ch=cfg.ch, ch_mult=list(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
                attn_resolutions=list(cfg.attn_resolutions), dropout=cfg.dropout,
                grad_checkpointing=cfg.grad_checkpointing, patch_size=cfg.patch_size,
                norm_groups=getattr(cfg, "norm_groups", 0))


def quantizer_kwargs(cfg) -> dict:
    from .tokenizer_config import fidelity  # the authors' EMA / restart behaviour unless switched off

    return dict(decay=cfg.ema_decay, eps=cfg.ema_eps, beta=cfg.beta, dead_code_threshold=cfg.dead_code_threshold,
                kmeans_init=cfg.kmeans_init, per_depth_update=fidelity(cfg, "ema_per_depth"),
                authors_restart=fidelity(cfg, "authors_restart"))


class RQTokenizer(Tokenizer):
    """images (B,3,R,R) -> codes (B, R/f, R/f, D); VQ when depth == 1."""

    def __init__(self, cfg, resolution: int):
        super().__init__()
        self.resolution = resolution
        self.encoder = Encoder(resolution=resolution, z_channels=cfg.z_channels, **_arch_kwargs(cfg))
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.quantizer = ResidualQuantizer(cfg.z_channels, cfg.codebook_size, cfg.depth,
                                           shared_codebook=cfg.shared_codebook, **quantizer_kwargs(cfg))
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)
        self.decoder = Decoder(resolution=resolution, z_channels=cfg.z_channels, **_arch_kwargs(cfg))
        self.latent_side = resolution // cfg.downsample_factor
        self.depth = cfg.depth

    @property
    def code_shape(self) -> tuple[int, int, int]:
        return (self.latent_side, self.latent_side, self.depth)

    def encode_latent(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(images_BCHW))

    @torch.no_grad()
    def encode(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """images in [-1, 1] -> int64 codes (B, H, W, D)."""
        return self.quantizer.encode(self.encode_latent(images_BCHW))

    def decode(self, codes_BHWD: torch.Tensor) -> torch.Tensor:
        return self.decode_latent(self.quantizer.lookup(codes_BHWD))

    def decode_latent(self, zq_BCHW: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(zq_BCHW))

    def codes_per_image(self, codes_BHWD: torch.Tensor) -> torch.Tensor:
        B, H, W, D = codes_BHWD.shape
        return torch.full((B,), H * W * D, dtype=torch.long, device=codes_BHWD.device)

    @torch.no_grad()
    def soft_codes(self, images_BCHW: torch.Tensor, tau: float, *, sample: bool = False,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(probs_BHWDK, codes_BHWD): Q_tau soft labels / stochastic codes for training the prior."""
        return self.quantizer.soft_codes(self.encode_latent(images_BCHW), tau,
                                         sample=sample, generator=generator)

    def forward(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, TokenizerAux]:
        q = self.quantizer(self.encode_latent(images_BCHW))
        recon = self.decode_latent(q.zq_BCHW)
        return recon, TokenizerAux(quant_loss=q.loss, usage_D=q.usage_D,
                                   perplexity_D=q.perplexity_D, extra={})
