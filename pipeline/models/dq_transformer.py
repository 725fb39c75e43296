"""DQ-Transformer: a Position-Transformer that predicts where the next code goes and a
Content-Transformer stacked on it that predicts which code goes there (Huang et al., the authors'
`StackGPT`), over the variable-length coarse/fine codes of a DQ tokenizer.

Sequence (the PACKED layout), per image, right-padded only:

    [SOS_c, coarse codes (raster over the coarse grid), EOS_c, SOS_f, fine codes (raster over the fine grid), EOS_f]

Every token carries a content id, a position id in its own grid's table and a segment (0 coarse,
1 fine); its input embedding is content_emb + (coarse_pos_emb | fine_pos_emb) + seq_pos_emb[index]
+ segment_emb. Prediction t (from tokens 0..t) is token t+1: the position transformer's hidden
state h_t gives its position (position_head); the content transformer reads h_t + the position
embedding of token t+1 and gives its content (content_head).

Vocabularies (as the authors', with the null class where they have their pad entry):
    content:          [0, K) codes, K = EOS, K+1+c = SOS of class c (c = num_classes: the null class)
    coarse positions: [0, Nc) cells, Nc = EOS, Nc+1+c = SOS of class c
    fine positions:   [0, Nf) cells, Nf = EOS, Nf+1+c = SOS of class c
The class is the SOS of both parts (content and position); an unconditional model has one
learned SOS (class 0 = the "null class"). Both heads predict over their input vocabulary like
the authors' (content head: the content vocabulary; position head: the fine-position vocabulary,
coarse cell p and EOS_c sharing the indices of fine cell p and EOS_f); sampling masks the rest.

Why packed and not the authors' [coarse part, padding, fine part, padding]: there, a fine token's
sequence index (and the padding it attends over) depends on the longest coarse part in the batch,
so a sample depends on its batch. Packed, a token's index depends only on its own image, and the
causal mask alone keeps right padding invisible to real tokens (no key mask needed). Transition
tokens that are deterministic given the past (the content of an EOS, the whole SOS_f after EOS_c)
are not trained on and are forced during sampling.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import BlockConfig, KVCache, TransformerStack, drop_labels, make_norm
from .prior_config import CodeSpec, PriorConfig


@dataclass
class DQPacked:
    """Packed token sequences (B, T) and what each prediction t (of token t+1) is trained on."""
    content_BT: torch.Tensor     # content ids
    position_BT: torch.Tensor    # ids in the token's own position table (coarse if segment 0)
    segment_BT: torch.Tensor     # 0 coarse / 1 fine
    length_B: torch.Tensor       # real tokens per row, SOS and EOS included
    n_coarse_B: torch.Tensor     # coarse codes per row

    def target_masks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(coarse_position, fine_position, content) bool masks over the T-1 predictions.

        Coarse-position targets: coarse codes and EOS_c; fine-position targets: fine codes and
        EOS_f; content targets: codes only. Never: SOS_f (forced), padding.
        """
        T = self.content_BT.shape[1]
        t = torch.arange(T - 1, device=self.content_BT.device)[None]  # predicts token t + 1
        n, end = self.n_coarse_B[:, None], self.length_B[:, None] - 1  # end: index of EOS_f
        coarse_pos = t <= n                                   # tokens 1..n+1
        fine_pos = (t >= n + 2) & (t < end)                   # tokens n+3..end
        content = (t < n) | ((t >= n + 2) & (t < end - 1))    # tokens 1..n and n+3..end-1
        return coarse_pos, fine_pos, content


class DQTransformer(nn.Module):
    """DQ prior. `forward`/`loss` take the stored batch format (`collate_codes`): positions_L,
    contents_L, granularity_L (all coarse codes, then all fine codes), mask_L, label."""

    def __init__(self, cfg: PriorConfig, spec: CodeSpec):
        super().__init__()
        if spec.kind != "dq" or spec.height != spec.width or spec.depth != 1:
            raise ValueError(f"DQTransformer needs square DQ codes of depth 1, got {spec}")
        self.cfg, self.spec = cfg, spec
        self.K = spec.codebook_size
        self.coarse_side = spec.height
        self.Nc = spec.height * spec.width
        self.Nf = 4 * self.Nc
        self.num_classes = cfg.num_classes
        self.n_sos = cfg.num_classes + 1                 # the classes + the null class (or one learned SOS)
        self.content_vocab = self.K + 1 + self.n_sos
        self.coarse_pos_vocab = self.Nc + 1 + self.n_sos
        self.fine_pos_vocab = self.Nf + 1 + self.n_sos  # also the position head's output size
        self.max_tokens = self.Nf + 4                    # longest packed sequence (every region fine)
        E = cfg.embed_dim

        self.content_emb = nn.Embedding(self.content_vocab, E)
        self.coarse_pos_emb = nn.Embedding(self.coarse_pos_vocab, E)
        self.fine_pos_emb = nn.Embedding(self.fine_pos_vocab, E)
        self.seq_pos_emb = nn.Embedding(self.max_tokens, E)
        self.segment_emb = nn.Embedding(2, E)
        self.embed_drop = nn.Dropout(cfg.embed_dropout)
        block = BlockConfig(embed_dim=E, n_head=cfg.n_head, mlp_ratio=cfg.mlp_ratio, bias=cfg.bias,
                            attn_dropout=cfg.attn_dropout, resid_dropout=cfg.dropout, norm=cfg.norm, mlp=cfg.mlp,
                            use_flash_attn=cfg.use_flash_attn)
        self.position_transformer = TransformerStack(block, cfg.position_layers, cfg.grad_checkpointing)
        self.content_transformer = TransformerStack(block, cfg.content_layers, cfg.grad_checkpointing)
        self.position_head = nn.Sequential(make_norm(cfg.norm, E), nn.Linear(E, self.fine_pos_vocab, bias=False))
        self.content_head = nn.Sequential(make_norm(cfg.norm, E), nn.Linear(E, self.content_vocab, bias=False))
        self.apply(self._init_weights)
        nn.init.zeros_(self.seq_pos_emb.weight)  # the authors' sequence-index embedding starts at zero

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ---- ids -------------------------------------------------------------------------------
    @property
    def null_class(self) -> int:
        """The class of the unconditional rows of classifier-free guidance (the learned SOS when
        the model is unconditional)."""
        return self.num_classes

    @property
    def eos_content(self) -> int:
        return self.K

    @property
    def eos_head(self) -> int:
        """Position-head index of EOS (for both parts)."""
        return self.Nf

    def sos_class(self, labels_B: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        """The SOS class per row: the label, or the null class (unconditional model / no labels)."""
        if self.num_classes == 0 or labels_B is None:
            if self.num_classes and labels_B is None:
                raise ValueError("this prior is class-conditional: pass labels")
            return torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        labels_B = labels_B.to(device).long()
        if labels_B.shape != (batch,):
            raise ValueError(f"labels: expected shape ({batch},), got {tuple(labels_B.shape)}")
        if ((labels_B < 0) | (labels_B > self.num_classes)).any():
            raise ValueError(f"labels must lie in [0, {self.num_classes}] ({self.num_classes} = the null class)")
        return labels_B

    def drop_labels(self, labels_B: torch.Tensor, generator: torch.Generator | None = None,
                    u_B: torch.Tensor | None = None) -> torch.Tensor:
        """Classifier-free guidance training: each label becomes the null class with probability
        cfg.class_dropout (unchanged for an unconditional model)."""
        return drop_labels(labels_B, self.cfg.class_dropout if self.num_classes else 0.0, self.null_class,
                           generator, u_B)

    def head_index(self, position_BT: torch.Tensor, segment_BT: torch.Tensor) -> torch.Tensor:
        """Own-table position ids -> position-head indices (coarse cell p -> p, EOS_c -> Nf, ...)."""
        coarse_shift = torch.where(position_BT >= self.Nc, position_BT + (self.Nf - self.Nc), position_BT)
        return torch.where(segment_BT == 0, coarse_shift, position_BT)

    # ---- layout ----------------------------------------------------------------------------
    def pack(self, positions_BL: torch.Tensor, contents_BL: torch.Tensor, granularity_BL: torch.Tensor,
             mask_BL: torch.Tensor, labels_B: torch.Tensor | None) -> DQPacked:
        """The stored format (all coarse codes, then all fine codes, right-padded) -> packed tokens."""
        device = positions_BL.device
        B, L = positions_BL.shape
        mask = mask_BL.bool()
        gran = granularity_BL.long()
        length = mask.sum(1)
        if not bool((mask == (torch.arange(L, device=device)[None] < length[:, None])).all()):
            raise ValueError("mask_L must be True on a prefix of each row (right padding only)")
        n = (mask & (gran == 0)).sum(1)
        if not bool(((gran != 0) | ~mask | (torch.arange(L, device=device)[None] < n[:, None])).all()):
            raise ValueError("granularity_L: coarse codes must all come before the fine codes")
        sos = self.sos_class(labels_B, B, device)
        T = int(length.max()) + 4 if B else 4
        idx = torch.arange(T, device=device)[None]
        n_, end = n[:, None], (length + 3)[:, None]  # end: index of EOS_f
        content = torch.full((B, T), self.eos_content, dtype=torch.long, device=device)
        position = torch.full((B, T), self.Nf, dtype=torch.long, device=device)
        segment = (idx > n_ + 1).long().expand(B, T).clone()
        # Codes: coarse j -> j + 1, fine j -> j + 3.
        dest = torch.arange(L, device=device)[None] + torch.where(gran == 0, 1, 3)
        dest = torch.where(mask, dest, T)  # padding goes to a scratch column
        scratch_c = torch.cat([content, content[:, :1]], 1)
        scratch_p = torch.cat([position, position[:, :1]], 1)
        scratch_c.scatter_(1, dest, contents_BL.long())
        scratch_p.scatter_(1, dest, positions_BL.long())
        content, position = scratch_c[:, :T], scratch_p[:, :T]
        # SOS_c, EOS_c, SOS_f, EOS_f (padding keeps EOS_f's ids).
        sos_c, eos_c, sos_f = idx == 0, idx == n_ + 1, idx == n_ + 2
        content = torch.where(sos_c | sos_f, self.K + 1 + sos[:, None], content)
        content = torch.where(eos_c | (idx >= end), self.eos_content, content)
        position = torch.where(sos_c, self.Nc + 1 + sos[:, None], position)
        position = torch.where(eos_c, self.Nc, position)
        position = torch.where(sos_f, self.Nf + 1 + sos[:, None], position)
        position = torch.where(idx >= end, self.Nf, position)
        return DQPacked(content, position, segment, length + 4, n)

    # ---- the two transformers ----------------------------------------------------------------
    def position_embedding(self, position_BT: torch.Tensor, segment_BT: torch.Tensor) -> torch.Tensor:
        """Each token's position embedding from its own grid's table."""
        coarse = self.coarse_pos_emb(position_BT.clamp_max(self.coarse_pos_vocab - 1))
        fine = self.fine_pos_emb(position_BT)
        return torch.where((segment_BT == 0)[..., None], coarse, fine)

    def position_hidden(self, content_BT: torch.Tensor, position_BT: torch.Tensor, segment_BT: torch.Tensor,
                        start: int = 0, caches: list[KVCache] | None = None) -> torch.Tensor:
        """Position-transformer hidden states of tokens at sequence indices start..start+T-1."""
        T = content_BT.shape[1]
        if start + T > self.max_tokens:
            raise ValueError(f"sequence of {start + T} tokens exceeds the longest DQ sequence ({self.max_tokens})")
        seq = torch.arange(start, start + T, device=content_BT.device)
        x = (self.content_emb(content_BT) + self.position_embedding(position_BT, segment_BT)
             + self.seq_pos_emb(seq)[None] + self.segment_emb(segment_BT))
        return self.position_transformer(self.embed_drop(x), caches)

    def content_logits(self, hidden_BTE: torch.Tensor, next_position_BT: torch.Tensor,
                       next_segment_BT: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        """Content logits of the next tokens, given their positions (own-table ids and segments)."""
        x = hidden_BTE + self.position_embedding(next_position_BT, next_segment_BT)
        return self.content_head(self.content_transformer(x, caches))

    def forward_packed(self, packed: DQPacked) -> tuple[torch.Tensor, torch.Tensor]:
        """(position logits (B, T-1, fine_pos_vocab), content logits (B, T-1, content_vocab)):
        prediction t is token t+1, from tokens 0..t (and token t+1's position for the content)."""
        c, p, s = packed.content_BT, packed.position_BT, packed.segment_BT
        h = self.position_hidden(c[:, :-1], p[:, :-1], s[:, :-1])
        return self.position_head(h), self.content_logits(h, p[:, 1:], s[:, 1:])

    def forward(self, positions_BL: torch.Tensor, contents_BL: torch.Tensor, granularity_BL: torch.Tensor,
                mask_BL: torch.Tensor, labels_B: torch.Tensor | None = None) -> dict:
        """Logits and targets over the packed predictions (B, T-1): position_logits, content_logits,
        position_target (head indices), content_target, coarse_position_mask, fine_position_mask,
        content_mask (which predictions count in the loss)."""
        packed = self.pack(positions_BL, contents_BL, granularity_BL, mask_BL, labels_B)
        position_logits, content_logits = self.forward_packed(packed)
        coarse_mask, fine_mask, content_mask = packed.target_masks()
        return dict(position_logits=position_logits, content_logits=content_logits,
                    position_target=self.head_index(packed.position_BT[:, 1:], packed.segment_BT[:, 1:]),
                    content_target=packed.content_BT[:, 1:], coarse_position_mask=coarse_mask,
                    fine_position_mask=fine_mask, content_mask=content_mask)

    def loss(self, positions_BL: torch.Tensor, contents_BL: torch.Tensor, granularity_BL: torch.Tensor,
             mask_BL: torch.Tensor, labels_B: torch.Tensor | None = None) -> dict:
        """loss = content CE + mean(coarse-position CE, fine-position CE); each CE is a mean over its
        real targets in the batch (padding and forced tokens ignored). Labels are used as given:
        apply `drop_labels` first when training for guidance."""
        return self.loss_from_outputs(self(positions_BL, contents_BL, granularity_BL, mask_BL, labels_B))

    @staticmethod
    def loss_from_outputs(out: dict) -> dict:
        """The losses of a `forward` output (the trainer runs forward through its engine)."""
        def ce(logits, target, mask):
            return F.cross_entropy(logits[mask].float(), target[mask]) if mask.any() else logits.sum() * 0.0

        content = ce(out["content_logits"], out["content_target"], out["content_mask"])
        coarse = ce(out["position_logits"], out["position_target"], out["coarse_position_mask"])
        fine = ce(out["position_logits"], out["position_target"], out["fine_position_mask"])
        position = (coarse + fine) / 2
        return {"loss": content + position, "content_loss": content, "position_loss": position,
                "coarse_position_loss": coarse, "fine_position_loss": fine}

    # ---- generation --------------------------------------------------------------------------
    def new_caches(self, batch: int, *, dtype: torch.dtype, device, max_len: int | None = None
                   ) -> tuple[list[KVCache], list[KVCache]]:
        """Static KV caches (position transformer, content transformer) for `batch` rows."""
        n = self.max_tokens if max_len is None else max_len
        return (self.position_transformer.new_caches(batch, n, dtype=dtype, device=device),
                self.content_transformer.new_caches(batch, n, dtype=dtype, device=device))
