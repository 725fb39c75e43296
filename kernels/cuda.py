"""CUDA path: thin wrappers that prepare ||e||^2 and seeds and call the compiled extension.

All heavy work is in kernels/csrc/codebook_search_kernels.cu. The extension is fetched lazily, so merely
importing `kernels` never compiles anything.
"""
from __future__ import annotations

import torch

from . import reference as ref
from .loader import get_cuda_extension


def _sqnorm(codebook) -> torch.Tensor:
    return ref.codebook_sqnorm(codebook).contiguous()


def _canon(codebook_KC):
    # The kernels compute identical codes identically, but ||e||^2 comes from a torch reduction
    # whose rounding need not be identical for rows at different alignments; mapping choices to
    # the lowest identical code makes "ties -> lowest index" hold for duplicates regardless.
    return ref.lowest_duplicate(codebook_KC, hash_all=True)


def nearest_code(x_NC, codebook_KC, codebook_sqnorm_K=None):
    ext = get_cuda_extension()
    sqnorm_K = _sqnorm(codebook_KC) if codebook_sqnorm_K is None else codebook_sqnorm_K
    with torch.cuda.device(x_NC.device):
        idx_N, sqdist_N = ext.nearest_code(x_NC, codebook_KC, sqnorm_K)
        return ref.canonicalize_(idx_N, _canon(codebook_KC)), sqdist_N


def residual_quantize(x_NC, codebook, depth):
    """One launch for all depths when a block's fp32 residual tile fits in shared memory;
    otherwise (very large C on a small-shared-memory GPU) one fp32 search launch per depth."""
    ext = get_cuda_extension()
    with torch.cuda.device(x_NC.device):
        if ext.residual_fits(x_NC.shape[1], x_NC.device.index):
            codes_ND, partial_NDC = ext.residual_quantize(x_NC, codebook, _sqnorm(codebook), depth)
            shared_canon = _canon(codebook) if codebook.dim() == 2 else None
            for d in range(depth):  # duplicates share a vector, so only the codes need remapping
                canon = shared_canon if codebook.dim() == 2 else _canon(codebook[d])
                if canon is not None:
                    codes_ND[:, d] = ref.canonicalize_(codes_ND[:, d].clone(), canon)
            return codes_ND, partial_NDC

        def search(residual_NC, cb_KC, sqnorm_K):
            # The residual is fp32, so search it against the fp32 codebook (exact fp32 products).
            idx_N, _ = ext.nearest_code(residual_NC.contiguous(), cb_KC.float().contiguous(), sqnorm_K)
            return ref.canonicalize_(idx_N, _canon(cb_KC)), None

        return ref.residual_quantize(x_NC, codebook, depth, search=search)


def soft_codes(residual_NC, codebook_KC, tau, sample=False, generator=None):
    ext = get_cuda_extension()
    seed = 0
    if sample:
        # One 63-bit seed per call from the caller's generator (or the global one): the kernel's
        # counter-based noise is then reproducible for a seeded generator.
        device = generator.device if generator is not None else residual_NC.device
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=device).item())
    with torch.cuda.device(residual_NC.device):
        probs_NK, sampled_N = ext.soft_codes(residual_NC, codebook_KC, _sqnorm(codebook_KC), float(tau), bool(sample),
                                             seed)
    return probs_NK, (sampled_N if sample else None)
