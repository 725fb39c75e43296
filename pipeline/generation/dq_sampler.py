"""KV-cached DQ-Transformer sampling: one token per step and row, position then content.

At step s every row feeds its token s through the position transformer's static cache, draws
the position of token s+1 from the masked position logits, then feeds h_s + that position's
embedding through the content transformer's cache and draws the code. Rows may be in different
phases (coarse, fine, finished); the packed layout gives token s the same sequence index in every
row, so all rows advance in lockstep and a row's tokens never depend on the others.

Masks make every sample a valid tiling (`dq_order.from_dq_order` accepts it):
- coarse phase: an unused coarse cell, or EOS_c (allowed once the sequence fits `max_len`; forced
  when every coarse cell is used);
- after EOS_c the SOS_f token (class, fine segment) is forced;
- fine phase: an unproduced fine cell inside a region not coded coarse; EOS_f only, and then
  forced, once all 4 cells of every such region are produced;
- contents: codes only ([0, K)); an EOS token's content is EOS (forced).
With guidance the batch is doubled, rows [cond; null class] sharing every drawn token. Sample b
draws only from the uniforms of (seed, sample_indices[b]): two per step (position, content).
`cached_logits` runs the same cached path on given codes (the cached == full forward test).
"""
from __future__ import annotations

import torch
from einops import repeat

from ..models.dq_transformer import DQPacked, DQTransformer
from .sampling import SamplingOptions, draw, filter_logits, guidance_scale, guide, per_sample_uniforms

COARSE, TRANSITION, FINE, DONE = 0, 1, 2, 3


def _cache_dtype(model: DQTransformer) -> torch.dtype:
    """Keys/values are stored in the dtype the Linears produce (the autocast dtype under autocast)."""
    weight = model.content_head[1].weight
    device_type = weight.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype


def _position_mask(model: DQTransformer, phase_B: torch.Tensor, coarse_used_BN: torch.Tensor,
                   fine_left_BN: torch.Tensor, n_coarse_B: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B, fine_pos_vocab) bool, True = the next position may be drawn there."""
    B, Nc, Nf = phase_B.shape[0], model.Nc, model.Nf
    allowed = torch.zeros(B, model.fine_pos_vocab, dtype=torch.bool, device=phase_B.device)
    coarse, fine = phase_B == COARSE, phase_B == FINE
    allowed[:, :Nc] = coarse[:, None] & ~coarse_used_BN
    allowed[:, :Nf] |= fine[:, None] & fine_left_BN
    # Ending the coarse part now fixes the length: 1 + n + 1 + 1 + 4 (Nc - n) + 1 tokens.
    coarse_eos_ok = 4 * Nc - 3 * n_coarse_B + 4 <= max_len
    fine_eos_ok = ~fine_left_BN.any(1)
    allowed[:, model.eos_head] = (coarse & coarse_eos_ok) | (fine & fine_eos_ok) | ~(coarse | fine)
    return allowed


@torch.no_grad()
def _run(model: DQTransformer, labels_B: torch.Tensor | None, batch: int, opts: SamplingOptions,
         uniforms_BN: torch.Tensor | None, max_len: int, given: DQPacked | None = None,
         guided: bool | None = None):
    device = model.content_emb.weight.device
    K, Nc, Nf = model.K, model.Nc, model.Nf
    guided = (opts.guided and given is None) if guided is None else guided
    sos = model.sos_class(labels_B, batch, device)
    rows_sos = sos
    if guided:
        if model.num_classes == 0:
            raise ValueError("classifier-free guidance needs a class-conditional prior (num_classes > 0)")
        rows_sos = torch.cat([sos, torch.full_like(sos, model.null_class)])
    R = rows_sos.shape[0]
    n_steps = max_len - 1 if given is None else given.content_BT.shape[1] - 1
    caches_p, caches_c = model.new_caches(R, dtype=_cache_dtype(model), device=device, max_len=max(n_steps, 1))

    def rows(x_B: torch.Tensor) -> torch.Tensor:  # (B,) -> (R,): the null-class rows copy the tokens
        return x_B.repeat(2) if guided else x_B

    phase = torch.full((batch,), COARSE, dtype=torch.long, device=device)
    coarse_used = torch.zeros(batch, Nc, dtype=torch.bool, device=device)
    fine_left = torch.zeros(batch, Nf, dtype=torch.bool, device=device)
    n_coarse = torch.zeros(batch, dtype=torch.long, device=device)
    out = torch.zeros(3, batch, max(n_steps, 1), dtype=torch.long, device=device)  # position, content, granularity
    n_out = torch.zeros(batch, dtype=torch.long, device=device)
    b_idx = torch.arange(batch, device=device)

    cur_c, cur_p = K + 1 + rows_sos, Nc + 1 + rows_sos   # SOS_c
    cur_s = torch.zeros(R, dtype=torch.long, device=device)
    if given is not None:
        cur_c, cur_p, cur_s = given.content_BT[:, 0], given.position_BT[:, 0], given.segment_BT[:, 0]
    logits = []
    for s in range(n_steps):
        h = model.position_hidden(cur_c[:, None], cur_p[:, None], cur_s[:, None], start=s, caches=caches_p)
        pos_logits = model.position_head(h)[:, 0]
        if given is not None:
            next_p, next_s = given.position_BT[:, s + 1], given.segment_BT[:, s + 1]
            con_logits = model.content_logits(h, next_p[:, None], next_s[:, None], caches=caches_c)[:, 0]
            logits.append((pos_logits, con_logits))
            cur_c, cur_p, cur_s = given.content_BT[:, s + 1], next_p, next_s
            continue

        scale = guidance_scale(opts, s, n_steps)
        if guided:
            pos_logits = guide(pos_logits, scale)
        allowed = _position_mask(model, phase, coarse_used, fine_left, n_coarse, max_len)
        pos_probs = filter_logits(pos_logits.float().masked_fill(~allowed, float("-inf")),
                                  opts.position_temperature, opts.position_top_k, opts.position_top_p)
        idx = draw(pos_probs, uniforms_BN[:, 2 * s])
        coarse, fine, transition = phase == COARSE, phase == FINE, phase == TRANSITION
        eos = idx == model.eos_head
        is_code = (coarse | fine) & ~eos
        # Token s+1's position in its own table: coarse EOS is Nc there; finished rows pad with EOS_f.
        next_p = torch.where(coarse, torch.where(eos, Nc, idx), torch.where(fine, idx, Nf))
        next_s = (~coarse).long()
        trans_R = rows(transition)
        next_p_R = torch.where(trans_R, Nf + 1 + rows_sos, rows(next_p))
        next_s_R = rows(next_s)

        con_logits = model.content_logits(h, next_p_R[:, None], next_s_R[:, None], caches=caches_c)[:, 0]
        if guided:
            con_logits = guide(con_logits, scale)
        con_logits = con_logits.float()
        con_logits[:, K:] = float("-inf")  # never EOS, SOS or a class as a code
        con_probs = filter_logits(con_logits, opts.temperature, opts.depth_top_k(0), opts.depth_top_p(0))
        code = draw(con_probs, uniforms_BN[:, 2 * s + 1])
        next_c = torch.where(is_code, code, model.eos_content)
        next_c_R = torch.where(trans_R, K + 1 + rows_sos, rows(next_c))

        # Record the codes and advance the masks.
        slot = n_out.clamp_max(out.shape[2] - 1)
        for i, value in enumerate((idx, code, next_s)):
            out[i, b_idx, slot] = torch.where(is_code, value, out[i, b_idx, slot])
        n_out += is_code.long()
        new_coarse = coarse & ~eos
        coarse_used[b_idx, idx.clamp_max(Nc - 1)] |= new_coarse
        n_coarse += new_coarse.long()
        fine_left[b_idx, idx.clamp_max(Nf - 1)] &= ~(fine & ~eos)
        end_coarse = coarse & eos
        fine_left |= end_coarse[:, None] & repeat(~coarse_used, "b (h w) -> b (h p w q)", h=model.coarse_side,
                                                  p=2, q=2)
        phase = torch.where(end_coarse, TRANSITION, torch.where(transition, FINE,
                                                                torch.where(fine & eos, DONE, phase)))
        cur_c, cur_p, cur_s = next_c_R, next_p_R, next_s_R
        if bool((phase == DONE).all()):
            break
    if given is not None:
        return logits
    if not bool((phase == DONE).all()):  # cannot happen: the masks bound the length by max_len
        raise RuntimeError("DQ sampling did not finish within max_len")
    out, n_out = out.cpu(), n_out.cpu()
    return [(out[0, b, :n_out[b]], out[1, b, :n_out[b]], out[2, b, :n_out[b]]) for b in range(batch)]


def sample_dq(model: DQTransformer, labels_B: torch.Tensor | None, sample_indices_B, seed: int,
              opts: SamplingOptions | None = None, max_len: int | None = None
              ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Draw one DQ code sequence per row: [(positions_L, contents_L, granularity_L)] (CPU int64,
    in generation order; `to_dq_order(*from_dq_order(...))` gives the stored raster order).

    labels_B: int64 classes (None for an unconditional prior). max_len caps the packed length
    (SOS/EOS included, default and most 4 * coarse cells + 4): the coarse EOS is then forbidden
    until enough regions are coarse. Sample b depends only on (seed, sample_indices_B[b]), not on
    the batch. Put the model in eval mode (dropout off) for reproducible samples.
    """
    opts = opts or SamplingOptions()
    indices = [int(i) for i in sample_indices_B]
    max_len = model.max_tokens if max_len is None else int(max_len)
    if not model.Nc + 4 <= max_len <= model.max_tokens:
        raise ValueError(f"max_len {max_len}: must lie in [{model.Nc + 4}, {model.max_tokens}] "
                         f"(every region coarse .. every region fine, SOS and EOS included)")
    device = model.content_emb.weight.device
    uniforms = per_sample_uniforms(seed, indices, 2 * (max_len - 1)).to(device)
    return _run(model, labels_B, len(indices), opts, uniforms, max_len)


def cached_logits(model: DQTransformer, positions_BL: torch.Tensor, contents_BL: torch.Tensor,
                  granularity_BL: torch.Tensor, mask_BL: torch.Tensor, labels_B: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The generation path's (position logits, content logits), (B, T-1, .) each, fed with the given
    codes one token per step through the KV caches; equal to `model(...)`'s logits."""
    packed = model.pack(positions_BL, contents_BL, granularity_BL, mask_BL, labels_B)
    steps = _run(model, labels_B, packed.content_BT.shape[0], SamplingOptions(), None, model.max_tokens, packed)
    return torch.stack([p for p, _ in steps], 1), torch.stack([c for _, c in steps], 1)
