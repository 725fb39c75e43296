"""Exact chunked-GEMM path: the reference's arithmetic, chunked so memory stays bounded for any N and K.

The default on CPU; on CUDA with `TESSERA_KERNELS=gemm` (plain torch ops on the tensors' device, so
the search runs on cuBLAS GEMMs instead of the extension's tiles).

Per chunk of rows (and of codes when K is large) the surrogate ||e||^2 - 2 x.e is produced by one
fp32 addmm into a reused workspace, and a running (min, argmin) is kept per row. Code chunks are
visited in increasing index order and a later chunk replaces the running best only when strictly
smaller, so ties keep the lowest index exactly as a single pass would.

Peak extra memory of nearest_code is the workspace (`CHUNK_BYTES`, default 16 MiB), O(chunk x C)
for upcast rows and a 32 MiB block for the final sqdist pass; never N x K. Blocks are kept square-ish
(up to 2048 rows x 2048 codes): MKL packs both operands on every call, so a block needs both
dimensions large to run near GEMM speed (on 2 cores: ~22 GFLOP/s at 128 rows, ~57 at 1024, for 8192 codes and C=256).
"""
from __future__ import annotations

import torch

from . import reference as ref

# Size of one block of fp32 surrogate distances. Module-level so tests can shrink it.
CHUNK_BYTES = 16 << 20
# Codes per K-chunk; with CHUNK_BYTES this gives >= 2048 rows per block.
MAX_K_CHUNK = 2048
# Gathered fp32 rows per block of the final ||x - e_idx||^2 pass.
SQDIST_CHUNK_BYTES = 32 << 20


def chunk_shape(n_rows: int, n_codes: int) -> tuple[int, int]:
    """(rows, codes) per block, with rows * codes * 4 <= max(CHUNK_BYTES, 4 * codes)."""
    k_chunk = max(1, min(n_codes, MAX_K_CHUNK))
    n_chunk = max(1, min(max(n_rows, 1), CHUNK_BYTES // (4 * k_chunk)))
    return n_chunk, k_chunk


def _search_block(x_rows_C, codebook_f32_KC, sqnorm_K, workspace, k_chunk):
    """Running masked (min, argmin) of one block of rows over all codes, in K-chunks."""
    rows, K = x_rows_C.shape[0], codebook_f32_KC.shape[0]
    x_f32 = x_rows_C.float()
    if K <= k_chunk:
        d_RK = workspace[: rows * K].view(rows, K)
        ref.surrogate_into(d_RK, x_f32, codebook_f32_KC, sqnorm_K)
        return ref.masked_min(d_RK)
    best_v = torch.full((rows,), float("inf"), dtype=torch.float32, device=x_rows_C.device)
    best_i = torch.full((rows,), -1, dtype=torch.int64, device=x_rows_C.device)
    for k0 in range(0, K, k_chunk):
        k1 = min(K, k0 + k_chunk)
        d_RK = workspace[: rows * (k1 - k0)].view(rows, k1 - k0)
        ref.surrogate_into(d_RK, x_f32, codebook_f32_KC[k0:k1], sqnorm_K[k0:k1])
        v, i = ref.masked_min(d_RK)
        # Strictly smaller only: an equal value from a later chunk has a higher index.
        better = v < best_v
        best_v = torch.where(better, v, best_v)
        best_i = torch.where(better, i + k0, best_i)
    return best_v, best_i


def _search(x_NC, codebook_KC, sqnorm_K, want_sqdist):
    N, K = x_NC.shape[0], codebook_KC.shape[0]
    codebook_f32 = codebook_KC.float()
    # Our own ||e||^2 doubles as the duplicate prefilter; a caller-supplied one is only trusted
    # for the search itself.
    own_sqnorm_K = ref.codebook_sqnorm(codebook_f32) if sqnorm_K is None else None
    sqnorm_K = own_sqnorm_K if sqnorm_K is None else sqnorm_K
    n_chunk, k_chunk = chunk_shape(N, K)
    workspace = torch.empty(n_chunk * min(K, k_chunk), dtype=torch.float32, device=x_NC.device)
    idx_N = torch.empty(N, dtype=torch.int64, device=x_NC.device)
    for n0 in range(0, N, n_chunk):
        n1 = min(N, n0 + n_chunk)
        idx_N[n0:n1] = _search_block(x_NC[n0:n1], codebook_f32, sqnorm_K, workspace, k_chunk)[1]
    # Per-row work that is O(C), not O(K), runs after the search in a few large blocks: with two
    # threads every parallel torch op has a fixed synchronisation cost (several ms when the cores
    # are shared), so fewer, larger ops are much faster than one set per search block.
    ref.canonicalize_(idx_N, ref.lowest_duplicate(codebook_KC, CHUNK_BYTES, sqnorm_K=own_sqnorm_K))
    if not want_sqdist:
        return idx_N, None
    sqdist_N = torch.empty(N, dtype=torch.float32, device=x_NC.device)
    rows = max(1, SQDIST_CHUNK_BYTES // (4 * x_NC.shape[1]))
    for n0 in range(0, N, rows):
        sqdist_N[n0 : n0 + rows] = ref.exact_sqdist(x_NC[n0 : n0 + rows], codebook_f32, idx_N[n0 : n0 + rows])
    return idx_N, sqdist_N


def nearest_code(x_NC, codebook_KC, codebook_sqnorm_K=None):
    return _search(x_NC, codebook_KC, codebook_sqnorm_K, want_sqdist=True)


def _search_codes_only(residual_NC, codebook_KC, sqnorm_K):
    return _search(residual_NC, codebook_KC, sqnorm_K, want_sqdist=False)


def residual_quantize(x_NC, codebook, depth):
    # Same depth loop (and so the same residual rounding) as the reference; only the search differs.
    return ref.residual_quantize(x_NC, codebook, depth, search=_search_codes_only)


def soft_codes(residual_NC, codebook_KC, tau, sample=False, generator=None):
    """Writes each block's surrogate distances straight into the output rows and turns them into
    probabilities in place, so the only N x K allocation is the returned probs."""
    N, K = residual_NC.shape[0], codebook_KC.shape[0]
    codebook_f32 = codebook_KC.float()
    sqnorm_K = ref.codebook_sqnorm(codebook_f32)
    probs_NK = torch.empty(N, K, dtype=torch.float32, device=residual_NC.device)
    # Uniforms for all rows up front, in row order: same draws as the reference for one generator.
    u_N = ref.draw_uniforms(N, residual_NC.device, generator) if sample else None
    sampled_N = torch.empty(N, dtype=torch.int64, device=residual_NC.device) if sample else None
    n_chunk = max(1, CHUNK_BYTES // (4 * K))
    for n0 in range(0, N, n_chunk):
        n1 = min(N, n0 + n_chunk)
        block_RK = probs_NK[n0:n1]
        ref.surrogate_into(block_RK, residual_NC[n0:n1].float(), codebook_f32, sqnorm_K)
        ref.softmax_rows_(block_RK, tau)
        if sample:
            sampled_N[n0:n1] = ref.sample_rows(block_RK, u_N[n0:n1])
    return probs_NK, sampled_N
