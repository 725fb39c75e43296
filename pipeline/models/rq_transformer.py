"""RQ-Transformer: a spatial transformer over the H*W positions and a depth transformer over the D
codes of each position, built as the authors' released models are (kakaobrain/rq-vae-transformer,
every released config: input_emb_vqvae, head_emb_vqvae, cumsum_depth_ctx, shared_tok_emb,
shared_cls_emb).

Inputs are the tokenizer's frozen code vectors e (a buffer here, not a parameter):

    spatial input, position t:  [cond, u_0, ..., u_{T-2}] + dropout,
        cond = class_emb(c) + cond_pos,   u_s = sum_d input_mlp(e_{s,d}) + pos_hw[s]
        (the Linear comes before the sum, so its bias counts D times; the input that predicts
        position t carries position t-1's embedding)
    depth input at position t:  [h_t, head_mlp(z_{t,1}), ..., head_mlp(z_{t,D-1})] + pos_d,
        z_{t,d} = e_{t,0} + ... + e_{t,d-1} (running sums); causal over d, batch (B*T, D, E)
    head: LayerNorm + one Linear(E, K) shared by the depths.

`input_embedding="learned"` swaps the code vectors for a learned table (shared by the depths)
with the same structure. Class 'num_classes' is the null class used by classifier-free guidance.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from .attention import BlockConfig, KVCache, TransformerStack, drop_labels, make_norm
from .prior_config import CodeSpec, PriorConfig


def block_config(cfg: PriorConfig) -> BlockConfig:
    return BlockConfig(embed_dim=cfg.embed_dim, n_head=cfg.n_head, mlp_ratio=cfg.mlp_ratio, bias=cfg.bias,
                       attn_dropout=cfg.attn_dropout, resid_dropout=cfg.dropout, norm=cfg.norm, mlp=cfg.mlp,
                       use_flash_attn=cfg.use_flash_attn)


@dataclass
class RQCaches:
    """Generation state: one static KV cache per spatial layer (length T) and per depth layer (length D)."""
    spatial: list[KVCache]
    depth: list[KVCache]


class RQTransformer(nn.Module):
    def __init__(self, cfg: PriorConfig, spec: CodeSpec, codebook_BKC: torch.Tensor | None = None):
        super().__init__()
        if spec.kind != "rq":
            raise ValueError(f"RQTransformer needs RQ/VQ codes, got a {spec.kind!r} tokenizer")
        if cfg.depth_layers == 0 and spec.depth > 1:
            raise ValueError("depth_layers=0 (a plain raster transformer) needs codes of depth 1")
        E, K = cfg.embed_dim, spec.codebook_size
        self.spec, self.cfg = spec, cfg
        self.T, self.D, self.K = spec.height * spec.width, spec.depth, K
        self.num_classes = cfg.num_classes
        self.null_class = cfg.num_classes  # the extra row of class_emb; unconditional: the start token
        # Frozen tokenizer codebook (books = 1 shared, or D per-depth books), not a parameter.
        if cfg.input_embedding == "codebook":
            self.register_buffer("codebook", torch.zeros(1, K, spec.code_dim))
            if codebook_BKC is not None:
                self.set_codebook(codebook_BKC)
            self.input_mlp = nn.Linear(spec.code_dim, E)
            self.head_mlp = nn.Linear(spec.code_dim, E)
        else:
            self.tok_emb = nn.Embedding(K, E)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, E)
        self.cond_pos = nn.Parameter(torch.zeros(1, 1, E))
        self.pos_hw = nn.Parameter(torch.zeros(1, self.T, E))
        self.pos_d = nn.Parameter(torch.zeros(1, self.D, E))
        for p in (self.cond_pos, self.pos_hw, self.pos_d):
            nn.init.normal_(p, std=0.02)
        self.embed_drop = nn.Dropout(cfg.embed_dropout)
        block = block_config(cfg)
        self.spatial = TransformerStack(block, cfg.spatial_layers, cfg.grad_checkpointing)
        self.depth = TransformerStack(block, cfg.depth_layers, cfg.grad_checkpointing)
        self.head_norm = make_norm(cfg.norm, E)
        self.head = nn.Linear(E, K)

    # ---- embeddings ----------------------------------------------------------------------
    def set_codebook(self, codebook_BKC: torch.Tensor) -> None:
        """Load the tokenizer's code vectors ((K, C) or (books, K, C))."""
        book = codebook_BKC if codebook_BKC.dim() == 3 else codebook_BKC[None]
        if book.shape[1:] != self.codebook.shape[1:] or book.shape[0] not in (1, self.D):
            raise ValueError(f"codebook shape {tuple(book.shape)} does not match the prior's "
                             f"(1 or {self.D}, {self.K}, {self.spec.code_dim})")
        self.codebook = book.detach().to(self.codebook.device, torch.float32).clone()

    def code_vectors(self, codes_BTD: torch.Tensor) -> torch.Tensor:
        """(B, T, D) codes -> (B, T, D, C) frozen code vectors (depth d uses book d, or the shared one)."""
        if self.codebook.shape[0] == 1:
            return self.codebook[0][codes_BTD]
        return torch.stack([self.codebook[d][codes_BTD[..., d]] for d in range(codes_BTD.shape[-1])], dim=-2)

    def spatial_inputs(self, codes_BTD: torch.Tensor, first: int = 0) -> torch.Tensor:
        """u_s for the given positions (first, first+1, ...): (B, n, E)."""
        n = codes_BTD.shape[1]
        pos = self.pos_hw[:, first:first + n]
        if self.cfg.input_embedding == "codebook":
            emb = self.input_mlp(self.code_vectors(codes_BTD).to(self.input_mlp.weight.dtype))
        else:
            emb = self.tok_emb(codes_BTD)
        return emb.sum(dim=-2) + pos

    def depth_inputs(self, codes_BTD: torch.Tensor) -> torch.Tensor:
        """head_mlp(z_{t,d}) for d = 1..D (running sums over depth): (B, T, D, E); the last is unused in training."""
        if self.cfg.input_embedding == "codebook":
            z = torch.cumsum(self.code_vectors(codes_BTD), dim=-2)
            return self.head_mlp(z.to(self.head_mlp.weight.dtype))
        return torch.cumsum(self.tok_emb(codes_BTD), dim=-2)

    def cond_input(self, labels_B: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        if labels_B is None or self.num_classes == 0:
            labels_B = torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        return self.class_emb(labels_B)[:, None] + self.cond_pos

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_norm(h))

    # ---- training / full forward -------------------------------------------------------
    def forward(self, codes_BHWD: torch.Tensor, labels_B: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits (B, H, W, D, K) for codes (B, H, W, D); labels may hold the null class."""
        B, H, W, D = codes_BHWD.shape
        logits = self.forward_sequence(rearrange(codes_BHWD, "b h w d -> b (h w) d"), labels_B)
        return rearrange(logits, "b (h w) d k -> b h w d k", h=H, w=W)

    def forward_sequence(self, codes_BTD: torch.Tensor, labels_B: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T', D, K) for the first T' <= T positions in raster order (codes (B, T', D))."""
        B, T, D = codes_BTD.shape
        seq = torch.cat([self.cond_input(labels_B, B, codes_BTD.device), self.spatial_inputs(codes_BTD[:, :-1])], 1)
        h_BTE = self.spatial(self.embed_drop(seq))
        depth_in = torch.cat([h_BTE[:, :, None], self.depth_inputs(codes_BTD)[:, :, :-1]], 2) + self.pos_d[:, None]
        out = self.depth(rearrange(depth_in, "b t d e -> (b t) d e"))
        return rearrange(self.logits(out), "(b t) d k -> b t d k", b=B, t=T)

    def drop_labels(self, labels_B: torch.Tensor, generator: torch.Generator | None = None,
                    u_B: torch.Tensor | None = None) -> torch.Tensor:
        return drop_labels(labels_B, self.cfg.class_dropout if self.num_classes else 0.0, self.null_class,
                           generator, u_B)

    # ---- cached generation steps (driven by pipeline.generation.rq_sampler) -------------
    def new_caches(self, batch: int, *, dtype: torch.dtype, device) -> RQCaches:
        return RQCaches(self.spatial.new_caches(batch, self.T, dtype=dtype, device=device),
                        self.depth.new_caches(batch, self.D, dtype=dtype, device=device))

    def spatial_step(self, caches: RQCaches, t: int, labels_B: torch.Tensor | None,
                     prev_codes_BD: torch.Tensor | None) -> torch.Tensor:
        """Spatial hidden state h_t (B, 1, E): feeds the input for position t (cond at t=0, else u_{t-1})."""
        if t == 0:
            x = self.cond_input(labels_B, caches.spatial[0].k.shape[0], self.pos_hw.device)
        else:
            x = self.spatial_inputs(prev_codes_BD[:, None], first=t - 1)
        return self.spatial(x, caches.spatial)

    def depth_step(self, caches: RQCaches, d: int, h_B1E: torch.Tensor,
                   codes_so_far_Bd: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, K) of depth d at the current position (depth cache reset by the caller at d=0)."""
        if d == 0:
            x = h_B1E
        else:
            x = self.depth_inputs(codes_so_far_Bd[:, None])[:, :, d - 1]
        x = x + self.pos_d[:, d:d + 1]
        return self.logits(self.depth(x, caches.depth))[:, 0]
