"""Transformer building blocks shared by the priors: attention, a pre-norm block, a block stack,
and static key/value caches for generation.

The default block is the one the RQ-Transformer authors use (pre-LayerNorm GPT block, separate
key/query/value/proj Linears with bias, GELU MLP 4x, residual dropout after the projection and
after the MLP), with the same parameter names, so their checkpoints load without renaming inside
a block. `norm="rmsnorm"` and `mlp="swiglu"` are the modern alternatives.

Attention runs through flash-attn when it is installed and the inputs are CUDA fp16/bf16 without
a padding mask, otherwise through `F.scaled_dot_product_attention` (whose flash backend is a real
flash-attention kernel on GPU, and which also runs on CPU).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

try:  # optional GPU extra
    from flash_attn import flash_attn_func
except Exception:  # noqa: BLE001 - missing or broken build: fall back to SDPA
    flash_attn_func = None


@dataclass
class BlockConfig:
    embed_dim: int
    n_head: int
    mlp_ratio: float = 4.0
    bias: bool = True             # biases in attention and MLP Linears (the authors': True)
    attn_dropout: float = 0.0     # dropout on attention probabilities
    resid_dropout: float = 0.1    # dropout after the attention projection and after the MLP
    norm: str = "layernorm"       # layernorm (authors) | rmsnorm
    mlp: str = "gelu"             # gelu (authors) | swiglu
    use_flash_attn: bool = True   # use the flash-attn package when it can run (CUDA fp16/bf16, no mask)


class KVCache:
    """Static, pre-allocated keys and values of one attention layer: (B, H, max_len, head_dim).

    `append` writes the new keys/values at [length, length + n) and returns views of everything
    cached so far; nothing is reallocated during generation.
    """

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device | str):
        self.k = torch.zeros(batch, n_head, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.max_len = max_len
        self.length = 0

    def append(self, k_BHnd: torch.Tensor, v_BHnd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = k_BHnd.shape[2]
        if self.length + n > self.max_len:
            raise RuntimeError(f"KV cache overflow: {self.length} + {n} > max_len {self.max_len}")
        self.k[:, :, self.length:self.length + n] = k_BHnd
        self.v[:, :, self.length:self.length + n] = v_BHnd
        self.length += n
        return self.k[:, :, :self.length], self.v[:, :, :self.length]

    def reset(self) -> None:
        self.length = 0


def causal_mask(n_query: int, n_key: int, device) -> torch.Tensor:
    """(n_query, n_key) bool, True = may attend; the queries are the last n_query of the keys."""
    offset = n_key - n_query
    return torch.arange(n_query, device=device)[:, None] + offset >= torch.arange(n_key, device=device)[None, :]


class SelfAttention(nn.Module):
    """Causal multi-head self-attention with optional KV cache and key padding mask."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        if cfg.embed_dim % cfg.n_head:
            raise ValueError(f"embed_dim {cfg.embed_dim} is not divisible by n_head {cfg.n_head}")
        E = cfg.embed_dim
        self.key = nn.Linear(E, E, bias=cfg.bias)
        self.query = nn.Linear(E, E, bias=cfg.bias)
        self.value = nn.Linear(E, E, bias=cfg.bias)
        self.proj = nn.Linear(E, E, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.resid_dropout)
        self.n_head, self.attn_dropout, self.use_flash_attn = cfg.n_head, cfg.attn_dropout, cfg.use_flash_attn

    def _flash_ok(self, x: torch.Tensor, key_mask_BL) -> bool:
        return (self.use_flash_attn and flash_attn_func is not None and x.is_cuda
                and x.dtype in (torch.float16, torch.bfloat16) and key_mask_BL is None)

    def forward(self, x_BLE: torch.Tensor, cache: KVCache | None = None,
                key_mask_BL: torch.Tensor | None = None) -> torch.Tensor:
        """key_mask_BL: bool over all keys so far (cached + new), True = a real token (not padding)."""
        B, L, E = x_BLE.shape
        dropout_p = self.attn_dropout if self.training else 0.0
        # view + transpose instead of einops: the same strided views without parsing a pattern per call
        # (cached generation runs these once per token and layer, where per-call overhead shows).
        def heads(t_BLE: torch.Tensor) -> torch.Tensor:
            return t_BLE.view(B, L, self.n_head, E // self.n_head).transpose(1, 2)

        q, k, v = heads(self.query(x_BLE)), heads(self.key(x_BLE)), heads(self.value(x_BLE))
        if cache is not None:
            k, v = cache.append(k, v)
        n_key = k.shape[2]
        if self._flash_ok(x_BLE, key_mask_BL):
            # flash-attn aligns a shorter query block to the end of the keys (bottom-right causal).
            y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                dropout_p=dropout_p, causal=True)
            y = y.reshape(B, L, E)
        else:
            if key_mask_BL is None and n_key == L:
                mask, causal = None, True
            elif key_mask_BL is None and L == 1:
                mask, causal = None, False  # one new query may see every cached key
            else:
                mask, causal = causal_mask(L, n_key, x_BLE.device)[None, None], False
                if key_mask_BL is not None:
                    # A padding query would see no key at all (NaN): it always sees itself.
                    mask = (mask & key_mask_BL[:, None, None, :].bool()) | _diagonal(L, n_key, x_BLE.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
            y = y.transpose(1, 2).reshape(B, L, E)
        return self.resid_drop(self.proj(y))


def _diagonal(n_query: int, n_key: int, device) -> torch.Tensor:
    """(n_query, n_key) bool: each query's own key (the last n_query keys)."""
    return (torch.arange(n_query, device=device)[:, None] + (n_key - n_query)
            == torch.arange(n_key, device=device)[None, :])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(dim)
    if kind == "rmsnorm":
        return RMSNorm(dim)
    raise ValueError(f"norm {kind!r}: choose layernorm or rmsnorm")


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool, dropout: float):
        super().__init__()
        self.w_gate = nn.Linear(dim, hidden, bias=bias)
        self.w_up = nn.Linear(dim, hidden, bias=bias)
        self.w_down = nn.Linear(hidden, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.w_down(F.silu(self.w_gate(x)) * self.w_up(x)))


def make_mlp(cfg: BlockConfig) -> nn.Module:
    E = cfg.embed_dim
    if cfg.mlp == "gelu":
        hidden = int(cfg.mlp_ratio * E)
        # Indices 0 and 2 hold the Linears, as in the authors' blocks (mlp.0.*, mlp.2.*).
        return nn.Sequential(nn.Linear(E, hidden, bias=cfg.bias), nn.GELU(), nn.Linear(hidden, E, bias=cfg.bias),
                             nn.Dropout(cfg.resid_dropout))
    if cfg.mlp == "swiglu":
        # 2/3 of the 4x width keeps the parameter count of the GELU MLP.
        return SwiGLU(E, int(round(cfg.mlp_ratio * E * 2 / 3)), cfg.bias, cfg.resid_dropout)
    raise ValueError(f"mlp {cfg.mlp!r}: choose gelu or swiglu")


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then + mlp(ln2(x))."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        self.ln1 = make_norm(cfg.norm, cfg.embed_dim)
        self.attn = SelfAttention(cfg)
        self.ln2 = make_norm(cfg.norm, cfg.embed_dim)
        self.mlp = make_mlp(cfg)

    def forward(self, x_BLE: torch.Tensor, cache: KVCache | None = None,
                key_mask_BL: torch.Tensor | None = None) -> torch.Tensor:
        x_BLE = x_BLE + self.attn(self.ln1(x_BLE), cache, key_mask_BL)
        return x_BLE + self.mlp(self.ln2(x_BLE))


class TransformerStack(nn.Module):
    """n_layer blocks (`blocks.i.*`, the authors' layout) with optional activation checkpointing."""

    def __init__(self, cfg: BlockConfig, n_layer: int, grad_checkpointing: bool = False):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(n_layer)])
        self.grad_checkpointing = grad_checkpointing

    def new_caches(self, batch: int, max_len: int, *, dtype: torch.dtype, device) -> list[KVCache]:
        head_dim = self.cfg.embed_dim // self.cfg.n_head
        return [KVCache(batch, self.cfg.n_head, max_len, head_dim, dtype=dtype, device=device) for _ in self.blocks]

    def forward(self, x_BLE: torch.Tensor, caches: list[KVCache] | None = None,
                key_mask_BL: torch.Tensor | None = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            if caches is None and self.grad_checkpointing and self.training and torch.is_grad_enabled():
                # Recompute the block in backward instead of storing its activations.
                x_BLE = checkpoint(block, x_BLE, None, key_mask_BL, use_reentrant=False)
            else:
                x_BLE = block(x_BLE, None if caches is None else caches[i], key_mask_BL)
        return x_BLE


# ---- shared by both priors -------------------------------------------------------------
def drop_labels(labels_B: torch.Tensor, p: float, null_class: int, generator: torch.Generator | None = None,
                u_B: torch.Tensor | None = None) -> torch.Tensor:
    """Label dropout for classifier-free guidance: each label becomes `null_class` with probability p
    (uniforms `u_B` when given, else drawn from `generator`)."""
    if p <= 0:
        return labels_B
    if u_B is None:
        u_B = torch.rand(labels_B.shape, generator=generator, device="cpu")
    return torch.where(u_B.to(labels_B.device) < p, torch.full_like(labels_B, null_class), labels_B)
