"""VQGAN-style convolutional encoder/decoder shared by the VQ, RQ and DQ tokenizers.

Layout (encoder): [pixel-unshuffle stem] -> conv_in -> one level per `ch_mult` entry (num_res_blocks
ResnetBlocks, attention where the feature side is in `attn_resolutions`, Downsample after every level
but the last) -> head (mid: res/attn/res, GroupNorm, SiLU, conv_out to z_channels). The trunk and
the head are separate modules because DQ attaches two heads (fine and coarse) to one trunk.

`patch_size` p > 1 folds each p x p pixel patch into channels before conv_in (PixelUnshuffle) and
unfolds the decoder's output the same way (PixelShuffle), so every level runs at R/p: the total
downsampling is p * 2**(len(ch_mult)-1). With p = 1 this is exactly VQGAN's layout. At small
resolutions it drops the full-resolution levels (few channels over many pixels), which cost as
much compute as the rest together: a fixed CPU budget then buys twice the steps (docs/stages.md: what the
CPU demos reach).

With patch_size 1 and norm_groups 32 this is layer for layer the authors' RQ-VAE encoder/decoder
(kakaobrain/rq-vae-transformer, rqvae/models/rqvae/{modules,layers}.py): same GroupNorm eps,
SiLU, right/bottom-padded stride-2 Downsample, nearest Upsample + conv, 1x1 skip convs, dropout
between the second SiLU and conv2, mid block res/attn/res. Only parameter names differ (their
q/k/v convs are our stacked `qkv`): pipeline/importers/rq_official.py maps them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

MIN_CHANNELS_PER_GROUP = 4


def Normalize(channels: int, groups: int = 0) -> nn.GroupNorm:
    """GroupNorm (eps 1e-6, affine). groups=0: adaptive (below); groups=N: exactly N groups, as
    the authors' VQGAN / RQ-VAE code (always 32) -- needed to load their checkpoints exactly."""
    if groups:
        if channels % groups:
            raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} groups "
                             f"(tokenizer.norm_groups)")
        return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)
    # VQGAN's 32 groups assume >= 128 channels (4 per group). Narrower nets keep >= 4 channels per
    # group: with 1 channel per group GroupNorm becomes InstanceNorm, which erases each image's
    # per-channel mean -- its flat background colour -- so the decoder could not reproduce it.
    # From 128 channels on (multiples of 32) this is the same 32 groups as the authors' code.
    groups = 32
    while groups > 1 and (channels % groups or channels // groups < MIN_CHANNELS_PER_GROUP):
        groups //= 2
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.0, norm_groups: int = 0):
        super().__init__()
        self.norm1, self.conv1 = Normalize(in_ch, norm_groups), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = Normalize(out_ch, norm_groups), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x_BCHW)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x_BCHW) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention (fused SDPA kernel instead of an explicit HW x HW matrix).

    `qkv` is the authors' three 1x1 convs q, k, v stacked along the output channels (same math,
    one matmul); softmax scale 1/sqrt(C) as theirs."""

    def __init__(self, ch: int, norm_groups: int = 0):
        super().__init__()
        self.norm = Normalize(ch, norm_groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        H, W = x_BCHW.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x_BCHW)), "b (three c) h w -> three b 1 (h w) c", three=3)
        out = F.scaled_dot_product_attention(q, k, v)
        return x_BCHW + self.proj(rearrange(out, "b 1 (h w) c -> b c h w", h=H, w=W))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        # Asymmetric pad (right/bottom) so a stride-2 3x3 conv halves even sides exactly (VQGAN).
        return self.conv(F.pad(x_BCHW, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x_BCHW, scale_factor=2.0, mode="nearest"))


class _Checkpointed(nn.Module):
    """Runs blocks in sequence, recomputing each in backward when enabled (saves activation memory)."""

    def __init__(self, blocks: list[nn.Module], grad_checkpointing: bool):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.grad_checkpointing = grad_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


def _mid_blocks(ch: int, dropout: float, norm_groups: int = 0) -> list[nn.Module]:
    return [ResnetBlock(ch, ch, dropout, norm_groups), AttnBlock(ch, norm_groups),
            ResnetBlock(ch, ch, dropout, norm_groups)]


class EncoderTrunk(nn.Module):
    """conv_in and the down levels; returns every level's output (before its downsampling)."""

    def __init__(self, *, resolution: int, ch: int, ch_mult: list[int], num_res_blocks: int,
                 attn_resolutions: list[int], dropout: float = 0.0, in_channels: int = 3,
                 grad_checkpointing: bool = False, patch_size: int = 1, norm_groups: int = 0):
        super().__init__()
        self.stem = nn.PixelUnshuffle(patch_size) if patch_size > 1 else nn.Identity()
        self.conv_in = nn.Conv2d(in_channels * patch_size ** 2, ch, 3, padding=1)
        self.levels, self.downs = nn.ModuleList(), nn.ModuleList()
        self.level_channels, self.level_sides = [], []
        side, in_ch = resolution // patch_size, ch
        for i, mult in enumerate(ch_mult):
            out_ch, blocks = ch * mult, []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(in_ch, out_ch, dropout, norm_groups))
                in_ch = out_ch
                if side in attn_resolutions:
                    blocks.append(AttnBlock(out_ch, norm_groups))
            self.levels.append(_Checkpointed(blocks, grad_checkpointing))
            self.level_channels.append(out_ch)
            self.level_sides.append(side)
            if i < len(ch_mult) - 1:
                self.downs.append(Downsample(out_ch))
                side //= 2

    def forward(self, x_BCHW: torch.Tensor) -> list[torch.Tensor]:
        h, outs = self.conv_in(self.stem(x_BCHW)), []
        for i, level in enumerate(self.levels):
            h = level(h)
            outs.append(h)
            if i < len(self.downs):
                h = self.downs[i](h)
        return outs


class EncoderHead(nn.Module):
    """mid block + norm + SiLU + conv_out: maps one trunk level to z_channels."""

    def __init__(self, in_ch: int, z_channels: int, dropout: float = 0.0, grad_checkpointing: bool = False,
                 norm_groups: int = 0):
        super().__init__()
        self.mid = _Checkpointed(_mid_blocks(in_ch, dropout, norm_groups), grad_checkpointing)
        self.norm_out = Normalize(in_ch, norm_groups)
        self.conv_out = nn.Conv2d(in_ch, z_channels, 3, padding=1)

    def forward(self, h_BCHW: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.mid(h_BCHW))))


class Encoder(nn.Module):
    """images (B,3,R,R) -> z (B, z_channels, R/f, R/f) with f = patch_size * 2**(len(ch_mult)-1)."""

    def __init__(self, *, resolution: int, ch: int, ch_mult: list[int], num_res_blocks: int,
                 attn_resolutions: list[int], z_channels: int, dropout: float = 0.0, in_channels: int = 3,
                 grad_checkpointing: bool = False, patch_size: int = 1, norm_groups: int = 0):
        super().__init__()
        self.trunk = EncoderTrunk(resolution=resolution, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                                  attn_resolutions=attn_resolutions, dropout=dropout, in_channels=in_channels,
                                  grad_checkpointing=grad_checkpointing, patch_size=patch_size,
                                  norm_groups=norm_groups)
        self.head = EncoderHead(self.trunk.level_channels[-1], z_channels, dropout, grad_checkpointing, norm_groups)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x_BCHW)[-1])


class Decoder(nn.Module):
    """z (B, z_channels, r, r) -> images (B, 3, r*f, r*f); mirror of the encoder with one extra block per level."""

    def __init__(self, *, resolution: int, ch: int, ch_mult: list[int], num_res_blocks: int,
                 attn_resolutions: list[int], z_channels: int, dropout: float = 0.0, out_channels: int = 3,
                 grad_checkpointing: bool = False, patch_size: int = 1, norm_groups: int = 0):
        super().__init__()
        side = resolution // (patch_size * 2 ** (len(ch_mult) - 1))
        in_ch = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, in_ch, 3, padding=1)
        self.mid = _Checkpointed(_mid_blocks(in_ch, dropout, norm_groups), grad_checkpointing)
        self.levels, self.ups = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(ch_mult))):
            out_ch, blocks = ch * ch_mult[i], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(in_ch, out_ch, dropout, norm_groups))
                in_ch = out_ch
                if side in attn_resolutions:
                    blocks.append(AttnBlock(out_ch, norm_groups))
            self.levels.append(_Checkpointed(blocks, grad_checkpointing))
            if i > 0:
                self.ups.append(Upsample(out_ch))
                side *= 2
        self.norm_out = Normalize(in_ch, norm_groups)
        self.conv_out = nn.Conv2d(in_ch, out_channels * patch_size ** 2, 3, padding=1)
        self.unstem = nn.PixelShuffle(patch_size) if patch_size > 1 else nn.Identity()

    def forward(self, z_BCHW: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z_BCHW))
        for i, level in enumerate(self.levels):
            h = level(h)
            if i < len(self.ups):
                h = self.ups[i](h)
        return self.unstem(self.conv_out(F.silu(self.norm_out(h))))

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the final conv: the adaptive GAN weight compares gradient norms here."""
        return self.conv_out.weight
