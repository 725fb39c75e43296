"""Plain-torch reference implementation of the codebook-search ops.

Materialises the full N x K surrogate-distance matrix, so it is only meant for small inputs, for
tests, and for `TESSERA_KERNELS=reference`. The chunked CPU path and the CUDA kernels implement the
same rules, defined here once:

* Search distance. The argmin runs on the surrogate d_k = ||e_k||^2 - 2 x.e_k in fp32 (inputs
  upcast, products accumulated in fp32). ||x||^2 is the same for every code of a row, so dropping
  it changes no ranking and avoids the cancellation of adding a large constant before comparing.
* Ties resolve to the lowest code index. Identical codes are tied exactly, but BLAS may round
  their products differently depending on the column position (MKL's tail kernels do), so the
  CPU paths map every chosen code to the lowest-index code with the same bits (lowest_duplicate).
* A candidate is selectable only if its surrogate is finite. So a code with a NaN/inf entry is
  never chosen, and a row of x holding NaN/inf (every surrogate non-finite) gets index -1.
  Index -1 comes with sqdist NaN; in residual_quantize an index -1 contributes NaN to the partial
  sums, so every later depth of that row is -1 as well.
* Returned sqdist is ||x - e_idx||^2 recomputed directly in fp32 (not the surrogate), so it is
  non-negative and free of the expansion's cancellation error.

Arguments are assumed validated and contiguous (see kernels/_checks.py).
"""
from __future__ import annotations

import torch

NAN = float("nan")


def codebook_sqnorm(codebook_KC: torch.Tensor) -> torch.Tensor:
    """||e_k||^2 in fp32."""
    cb = codebook_KC.float()
    return (cb * cb).sum(-1)


def surrogate_into(out_NK, x_NC, codebook_f32_KC, sqnorm_K):
    """out = ||e||^2 - 2 x.e (fp32); x is upcast here, the codebook must already be fp32."""
    return torch.addmm(sqnorm_K.unsqueeze(0), x_NC.float(), codebook_f32_KC.t(), beta=1, alpha=-2, out=out_NK)


def masked_min(d_NK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row (min, argmin) over finite entries, lowest index on ties; (inf, -1) for rows with none.

    torch.min returns the first minimal index; it propagates NaN and would pick -inf, so rows whose
    plain minimum is not finite are redone with non-finite entries masked to +inf.
    """
    vals_N, idx_N = d_NK.min(dim=1)
    bad_N = ~torch.isfinite(vals_N)
    if bool(bad_N.any()):
        sub = d_NK[bad_N]
        sub = torch.where(torch.isfinite(sub), sub, torch.full_like(sub, float("inf")))
        sub_vals, sub_idx = sub.min(dim=1)
        sub_idx[~torch.isfinite(sub_vals)] = -1
        vals_N[bad_N] = sub_vals
        idx_N[bad_N] = sub_idx
    return vals_N, idx_N


def _hash_rows(rows_RC: torch.Tensor, rows_per_chunk: int) -> torch.Tensor:
    """int64 hash of each row's bit pattern (equal rows -> equal hash), O(chunk x C) memory."""
    R, C = rows_RC.shape
    int_type = torch.int32 if rows_RC.element_size() == 4 else torch.int16
    # + 0.0 turns -0.0 into +0.0: the same point must hash the same.
    bits = (rows_RC + 0.0).view(int_type)
    weights_C = torch.randint(1, 2**62, (C,), generator=torch.Generator().manual_seed(0x7E55E7A), dtype=torch.int64)
    weights_C = weights_C.to(rows_RC.device) | 1
    out_R = torch.empty(R, dtype=torch.int64, device=rows_RC.device)
    for r0 in range(0, R, rows_per_chunk):
        out_R[r0 : r0 + rows_per_chunk] = (bits[r0 : r0 + rows_per_chunk].to(torch.int64) * weights_C).sum(1)
    return out_R


def lowest_duplicate(codebook_KC: torch.Tensor, chunk_bytes: int = 16 << 20, hash_all: bool = False, sqnorm_K=None):
    """canon_K mapping each code to the lowest index holding the same vector, or None if all
    codes are distinct.

    On CPU identical rows get bitwise identical ||e||^2 (one reduction algorithm per row), so only
    codes sharing their ||e||^2 with another code can be duplicates: for a generic codebook this
    is one sort of K floats. Candidates are then grouped by a hash of their bits (exact integer
    arithmetic, so order-independent) and verified. hash_all=True skips the ||e||^2 prefilter
    (used on GPU, where hashing every row is cheap and no reduction-order assumption is needed).
    sqnorm_K: codebook_sqnorm(codebook_KC) if the caller already has it (never a user's value).
    """
    K, C = codebook_KC.shape
    if K < 2:
        return None
    if hash_all:
        cand_R = torch.arange(K, device=codebook_KC.device)
    else:
        sqnorm_K = codebook_sqnorm(codebook_KC) if sqnorm_K is None else sqnorm_K
        _, sq_inverse, sq_counts = torch.unique(sqnorm_K, return_inverse=True, return_counts=True)
        cand_R = torch.nonzero(sq_counts[sq_inverse] > 1).squeeze(1)
    if cand_R.numel() == 0:
        return None
    hash_R = _hash_rows(codebook_KC[cand_R], max(1, chunk_bytes // (8 * C)))
    _, inverse_R, counts = torch.unique(hash_R, return_inverse=True, return_counts=True)
    if int(counts.max()) == 1:
        return None
    first = torch.full((counts.numel(),), K, dtype=torch.int64, device=codebook_KC.device)
    first.scatter_reduce_(0, inverse_R, cand_R, reduce="amin")
    target_R = first[inverse_R]
    # A hash collision between different vectors is possible in principle: verify bit equality.
    same_R = (codebook_KC[cand_R] == codebook_KC[target_R]).all(1)
    canon_K = torch.arange(K, device=codebook_KC.device)
    canon_K[cand_R[same_R]] = target_R[same_R]
    return canon_K


def canonicalize_(idx_N: torch.Tensor, canon_K) -> torch.Tensor:
    """In place: chosen codes -> lowest identical code (index -1 stays -1)."""
    if canon_K is not None:
        valid = idx_N >= 0
        idx_N[valid] = canon_K[idx_N[valid]]
    return idx_N


def gather_codes(codebook_KC: torch.Tensor, idx_N: torch.Tensor) -> torch.Tensor:
    """fp32 embeddings of idx; rows with index -1 become NaN."""
    emb_NC = codebook_KC.index_select(0, idx_N.clamp_min(0)).float()
    return emb_NC.masked_fill_((idx_N < 0).unsqueeze(1), NAN)


def exact_sqdist(x_NC: torch.Tensor, codebook_KC: torch.Tensor, idx_N: torch.Tensor) -> torch.Tensor:
    """||x - e_idx||^2 in fp32; NaN where idx is -1. In place on one N x C gather; the row dot
    goes through einsum (a batched GEMV) so no second N x C temporary is made."""
    diff_NC = codebook_KC.index_select(0, idx_N.clamp_min(0)).float().sub_(x_NC)
    return torch.einsum("nc,nc->n", diff_NC, diff_NC).masked_fill_(idx_N < 0, NAN)


def nearest_code(x_NC, codebook_KC, codebook_sqnorm_K=None):
    own_sqnorm_K = codebook_sqnorm(codebook_KC) if codebook_sqnorm_K is None else None
    sqnorm_K = own_sqnorm_K if codebook_sqnorm_K is None else codebook_sqnorm_K
    d_NK = torch.empty(x_NC.shape[0], codebook_KC.shape[0], dtype=torch.float32, device=x_NC.device)
    surrogate_into(d_NK, x_NC, codebook_KC.float(), sqnorm_K)
    _, idx_N = masked_min(d_NK)
    canonicalize_(idx_N, lowest_duplicate(codebook_KC, sqnorm_K=own_sqnorm_K))
    return idx_N, exact_sqdist(x_NC, codebook_KC, idx_N)


def residual_quantize(x_NC, codebook, depth, search=nearest_code):
    """D greedy searches; `search` lets the chunked CPU path reuse this loop with its own search."""
    N, C = x_NC.shape
    x_f32 = x_NC.float()
    codes_ND = torch.empty(N, depth, dtype=torch.int64, device=x_NC.device)
    partial_NDC = torch.empty(N, depth, C, dtype=torch.float32, device=x_NC.device)
    shared = codebook.dim() == 2
    sqnorm_shared = codebook_sqnorm(codebook) if shared else None
    for d in range(depth):
        cb_KC = codebook if shared else codebook[d]
        sqnorm_K = sqnorm_shared if shared else codebook_sqnorm(cb_KC)
        residual_NC = x_f32 if d == 0 else x_f32 - partial_NDC[:, d - 1]
        idx_N, _ = search(residual_NC, cb_KC, sqnorm_K)
        codes_ND[:, d] = idx_N
        emb_NC = gather_codes(cb_KC, idx_N)
        partial_NDC[:, d] = emb_NC if d == 0 else partial_NDC[:, d - 1] + emb_NC
    return codes_ND, partial_NDC


def softmax_rows_(d_NK: torch.Tensor, tau: float) -> torch.Tensor:
    """In place: surrogate distances -> softmax(-d / tau); non-finite entries get probability 0,
    rows without any finite entry become NaN. Works on a chunk; returns the same storage."""
    dmin_N, _ = masked_min(d_NK)
    finite_NK = torch.isfinite(d_NK)
    # Subtracting the row minimum before dividing keeps the best logit at exactly 0, so a tiny tau
    # overflows the others to -inf (probability 0) instead of turning the whole row into NaN.
    d_NK.sub_(dmin_N.unsqueeze(1)).div_(-tau)
    d_NK.masked_fill_(~finite_NK, float("-inf"))
    d_NK.exp_()
    d_NK.div_(d_NK.sum(dim=1, keepdim=True))
    d_NK[dmin_N == float("inf")] = NAN
    return d_NK


def sample_rows(probs_NK: torch.Tensor, u_N: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sample per row with uniforms u in [0, 1); -1 for NaN rows."""
    cum_NK = probs_NK.cumsum(dim=1)
    total_N1 = cum_NK[:, -1:]
    # First index whose cumulative mass exceeds u * total: zero-probability codes are never hit.
    idx_N = torch.searchsorted(cum_NK, u_N.unsqueeze(1) * total_N1, right=True).squeeze(1)
    # u * total can round up to total; fall back to the last code with positive probability.
    K = probs_NK.shape[1]
    last_pos_N = K - 1 - (probs_NK > 0).flip(1).to(torch.uint8).argmax(dim=1)
    idx_N = torch.minimum(idx_N, last_pos_N)
    idx_N[torch.isnan(total_N1.squeeze(1))] = -1
    return idx_N


def draw_uniforms(n: int, device, generator) -> torch.Tensor:
    return torch.rand(n, device=device, generator=generator, dtype=torch.float32)


def soft_codes(residual_NC, codebook_KC, tau, sample=False, generator=None):
    d_NK = torch.empty(residual_NC.shape[0], codebook_KC.shape[0], dtype=torch.float32, device=residual_NC.device)
    surrogate_into(d_NK, residual_NC, codebook_KC.float(), codebook_sqnorm(codebook_KC))
    probs_NK = softmax_rows_(d_NK, tau)
    if not sample:
        return probs_NK, None
    u_N = draw_uniforms(probs_NK.shape[0], probs_NK.device, generator)
    return probs_NK, sample_rows(probs_NK, u_N)
