"""Residual quantization (RQ-VAE) with an EMA codebook; VQ is exactly RQ with depth 1.

Every nearest-code search goes through `kernels` (one implementation to optimise and test).
The codebook is not a parameter: it is learned by EMA of assignment statistics, so it lives in
registered buffers (`embed`, `cluster_size`, `embed_sum`) together with the counters that make
dead-code restarts reproducible (`update_step`) -- a state_dict therefore resumes exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from einops import rearrange
from torch import nn

import kernels


def _dist_on() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def _all_reduce_sum(*tensors: torch.Tensor) -> None:
    if _dist_on():
        for t in tensors:
            torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)


def _broadcast_from_rank0(t: torch.Tensor) -> torch.Tensor:
    if _dist_on():
        torch_dist.broadcast(t, src=0)
    return t


def _is_rank0() -> bool:
    return not _dist_on() or torch_dist.get_rank() == 0


@dataclass
class QuantizerOutput:
    zq_BCHW: torch.Tensor        # quantized latent with straight-through gradient to z
    codes_BHWD: torch.Tensor     # int64 codes, depth last
    loss: torch.Tensor           # beta * commitment loss (scalar)
    usage_D: torch.Tensor        # % of the codebook used at each depth in this (local) batch
    perplexity_D: torch.Tensor   # exp(entropy) of the code histogram at each depth


class ResidualQuantizer(nn.Module):
    """D-depth residual quantizer over C-dim vectors with one shared codebook or one per depth."""

    def __init__(self, dim: int, codebook_size: int, depth: int = 4, *, shared_codebook: bool = True,
                 decay: float = 0.99, eps: float = 1e-5, beta: float = 0.25, dead_code_threshold: float = 1.0,
                 kmeans_init: bool = False, kmeans_iters: int = 10, seed: int = 0):
        super().__init__()
        self.dim, self.codebook_size, self.depth = dim, codebook_size, depth
        self.shared_codebook = shared_codebook
        self.decay, self.eps, self.beta = decay, eps, beta
        self.dead_code_threshold, self.kmeans_init, self.kmeans_iters = dead_code_threshold, kmeans_init, kmeans_iters
        self.seed = seed
        n_books = 1 if shared_codebook else depth
        embed = torch.randn(n_books, codebook_size, dim)
        self.register_buffer("embed", embed)
        # cluster_size starts at 1 with embed_sum == embed so the EMA is self-consistent from step 1 and
        # no code counts as dead before it has had a chance to be used.
        self.register_buffer("cluster_size", torch.ones(n_books, codebook_size))
        self.register_buffer("embed_sum", embed.clone())
        self.register_buffer("update_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialized", torch.tensor(not kmeans_init))

    # ---- codebook access -------------------------------------------------------------------
    def codebook(self, d: int) -> torch.Tensor:
        """(K, C) codebook used at depth d (0-based)."""
        return self.embed[0 if self.shared_codebook else d]

    def _kernel_codebook(self) -> torch.Tensor:
        return self.embed[0] if self.shared_codebook else self.embed

    def code_vectors(self, codes_ND: torch.Tensor) -> torch.Tensor:
        """codes (..., D) -> per-depth code vectors (..., D, C)."""
        return torch.stack([self.codebook(d)[codes_ND[..., d]] for d in range(codes_ND.shape[-1])], dim=-2)

    def lookup(self, codes_BHWD: torch.Tensor) -> torch.Tensor:
        """codes (B, H, W, D) -> zhat_D (B, C, H, W): the sum of the code vectors over depth."""
        return rearrange(self.code_vectors(codes_BHWD).sum(-2), "b h w c -> b c h w")

    # ---- forward -------------------------------------------------------------------------
    def forward(self, z_BCHW: torch.Tensor, weight_BHW: torch.Tensor | None = None) -> QuantizerOutput:
        """Quantize; in training also update the EMA codebook and restart dead codes.

        weight_BHW (optional) weights each vector in the commitment loss and the EMA statistics
        (DQ uses 1/4 on copied coarse cells so a coarse code counts once).
        """
        B, C, H, W = z_BCHW.shape
        z_NC = rearrange(z_BCHW, "b c h w -> (b h w) c")
        w_N = None if weight_BHW is None else rearrange(weight_BHW, "b h w -> (b h w)").to(z_NC.dtype)
        if self.training and not bool(self.initialized):
            self._kmeans_init(z_NC.detach().float())
        codes_ND, partial_NDC = kernels.residual_quantize(z_NC.detach(), self._kernel_codebook(), self.depth)
        # Codes and partial sums come from the pre-update codebook, so the loss and the output agree
        # with the codes returned; the EMA step below then moves the codebook for the next batch.
        if self.training:
            self._ema_update(z_NC.detach().float(), codes_ND, partial_NDC.float(), w_N)
        partial_NDC = partial_NDC.to(z_NC.dtype)
        err_ND = (z_NC.unsqueeze(1) - partial_NDC.detach()).pow(2).mean(-1)
        if w_N is None:
            commit = err_ND.mean()
        else:
            commit = (err_ND * w_N[:, None]).sum() / (w_N.sum() * self.depth).clamp_min(1e-12)
        zq_NC = z_NC + (partial_NDC[:, -1] - z_NC).detach()  # straight-through estimator
        usage_D, perplexity_D = self._code_stats(codes_ND, w_N)
        return QuantizerOutput(
            zq_BCHW=rearrange(zq_NC, "(b h w) c -> b c h w", b=B, h=H, w=W),
            codes_BHWD=rearrange(codes_ND, "(b h w) d -> b h w d", b=B, h=H, w=W),
            loss=self.beta * commit, usage_D=usage_D, perplexity_D=perplexity_D)

    @torch.no_grad()
    def encode(self, z_BCHW: torch.Tensor) -> torch.Tensor:
        """Deterministic codes (B, H, W, D); never updates the codebook."""
        B, _, H, W = z_BCHW.shape
        codes_ND, _ = kernels.residual_quantize(rearrange(z_BCHW, "b c h w -> (b h w) c"),
                                                self._kernel_codebook(), self.depth)
        return rearrange(codes_ND, "(b h w) d -> b h w d", b=B, h=H, w=W)

    @torch.no_grad()
    def soft_codes(self, z_BCHW: torch.Tensor, tau: float, *, sample: bool = False,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-depth Q_tau(k | r_{d-1}) = softmax(-||r_{d-1} - e_k||^2 / tau) and the codes.

        sample=False: codes are the argmin codes (as `encode`) and the residual follows them;
        sample=True: codes are drawn from Q_tau and the next residual follows the sampled code
        (RQ's stochastic codes against exposure bias). Returns (probs_BHWDK, codes_BHWD).
        """
        B, _, H, W = z_BCHW.shape
        r_NC = rearrange(z_BCHW, "b c h w -> (b h w) c")
        probs, codes = [], []
        for d in range(self.depth):
            book = self.codebook(d)
            probs_NK, sampled_N = kernels.soft_codes(r_NC, book, tau, sample=sample, generator=generator)
            code_N = sampled_N if sample else kernels.nearest_code(r_NC, book)[0]
            probs.append(probs_NK)
            codes.append(code_N)
            r_NC = r_NC - book[code_N]
        probs_BHWDK = rearrange(torch.stack(probs, 1), "(b h w) d k -> b h w d k", b=B, h=H, w=W)
        return probs_BHWDK, rearrange(torch.stack(codes, 1), "(b h w) d -> b h w d", b=B, h=H, w=W)

    # ---- statistics ----------------------------------------------------------------------
    def _code_stats(self, codes_ND: torch.Tensor, w_N: torch.Tensor | None):
        with torch.no_grad():
            usage, perplexity = [], []
            for d in range(codes_ND.shape[1]):
                counts = torch.bincount(codes_ND[:, d], weights=w_N, minlength=self.codebook_size).float()
                p = counts / counts.sum().clamp_min(1e-12)
                usage.append((counts > 0).float().mean() * 100.0)
                perplexity.append(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))
            return torch.stack(usage), torch.stack(perplexity)

    # ---- EMA codebook --------------------------------------------------------------------
    @torch.no_grad()
    def _ema_update(self, z_NC: torch.Tensor, codes_ND: torch.Tensor, partial_NDC: torch.Tensor,
                    w_N: torch.Tensor | None) -> None:
        """One EMA step per depth on that depth's residuals r_{d-1} = z - zhat_{d-1}, then restarts."""
        K = self.codebook_size
        residuals = [z_NC] + [z_NC - partial_NDC[:, d] for d in range(self.depth - 1)]
        for d in range(self.depth):
            b = 0 if self.shared_codebook else d
            counts_K = torch.bincount(codes_ND[:, d], weights=w_N, minlength=K).to(z_NC.dtype)
            r = residuals[d] if w_N is None else residuals[d] * w_N[:, None]
            sums_KC = torch.zeros(K, self.dim, dtype=z_NC.dtype, device=z_NC.device).index_add_(0, codes_ND[:, d], r)
            _all_reduce_sum(counts_K, sums_KC)
            self.cluster_size[b].mul_(self.decay).add_(counts_K, alpha=1 - self.decay)
            self.embed_sum[b].mul_(self.decay).add_(sums_KC, alpha=1 - self.decay)
            self.embed[b].copy_(self.embed_sum[b] / self._smoothed_sizes(b)[:, None])
        if self.dead_code_threshold > 0:
            for b in range(self.embed.shape[0]):
                pool = torch.cat(residuals) if self.shared_codebook else residuals[b]
                self._restart_dead_codes(b, pool)
        self.update_step += 1

    def _smoothed_sizes(self, b: int) -> torch.Tensor:
        # Laplace smoothing keeps empty clusters from dividing by zero while preserving the total n.
        n = self.cluster_size[b].sum()
        return (self.cluster_size[b] + self.eps) / (n + self.codebook_size * self.eps) * n

    def _generator(self, salt: int) -> torch.Generator:
        # Seeded from the checkpointed step counter: restarts are bitwise reproducible and resume-exact.
        g = torch.Generator(device="cpu")
        g.manual_seed((self.seed * 1_000_003 + int(self.update_step) * 7919 + salt) % (2 ** 63))
        return g

    @torch.no_grad()
    def _restart_dead_codes(self, b: int, pool_NC: torch.Tensor) -> None:
        """Replace codes whose EMA cluster size < threshold by distinct random vectors of rank 0's batch.

        The vectors are drawn WITHOUT replacement (a seeded permutation of the pool), so no two
        restarted codes start equal: a duplicate would lose every tie to its twin and stay dead.
        When rank 0's pool holds fewer vectors than there are dead codes, only the lowest-index
        dead codes get one vector each (every pool vector used once); the others stay dead and are
        retried at the next update, with the next batch.
        """
        dead_K = self.cluster_size[b] < self.dead_code_threshold
        if _is_rank0():
            pool_size = pool_NC.shape[0]
            if int(dead_K.sum()) > pool_size:
                dead_K &= torch.cumsum(dead_K.to(torch.int64), 0) <= pool_size
        # Rank 0 decides which codes restart; all ranks then agree on the mask and the count.
        dead_K = _broadcast_from_rank0(dead_K.to(torch.uint8)).bool()
        n_dead = int(dead_K.sum())
        if n_dead == 0:
            return
        vecs = torch.empty(n_dead, self.dim, dtype=self.embed.dtype, device=self.embed.device)
        if _is_rank0():
            idx = torch.randperm(pool_NC.shape[0], generator=self._generator(salt=b))[:n_dead]
            vecs.copy_(pool_NC[idx.to(pool_NC.device)])
        vecs = _broadcast_from_rank0(vecs)
        size = max(self.dead_code_threshold, 1.0)
        self.embed[b][dead_K] = vecs
        self.embed_sum[b][dead_K] = vecs * size
        self.cluster_size[b][dead_K] = size

    @torch.no_grad()
    def _kmeans_init(self, z_NC: torch.Tensor) -> None:
        """Lloyd k-means on rank 0's first batch (per depth for per-depth books), then broadcast."""
        r_NC = z_NC
        for b in range(self.embed.shape[0]):
            book = self.embed[b].clone()
            if _is_rank0():
                # Distinct starting points (a repeated one is a wasted centre); only a batch with fewer
                # vectors than codes repeats them, each before any is used twice.
                perm = torch.randperm(r_NC.shape[0], generator=self._generator(salt=10_000 + b))
                idx = perm[torch.arange(self.codebook_size) % r_NC.shape[0]]
                book = r_NC[idx.to(r_NC.device)].clone()
                for _ in range(self.kmeans_iters):
                    assign, _ = kernels.nearest_code(r_NC, book)
                    counts = torch.bincount(assign, minlength=self.codebook_size).to(r_NC.dtype)
                    sums = torch.zeros_like(book).index_add_(0, assign, r_NC)
                    used = counts > 0  # empty clusters keep their previous centre
                    book[used] = sums[used] / counts[used, None]
            book = _broadcast_from_rank0(book.contiguous())
            self.embed[b].copy_(book)
            self.embed_sum[b].copy_(book)
            self.cluster_size[b].fill_(1.0)
            if not self.shared_codebook:
                r_NC = r_NC - book[kernels.nearest_code(r_NC, book)[0]]
        self.initialized.fill_(True)


class VectorQuantizer(ResidualQuantizer):
    """Plain VQ: by construction the depth-1 residual quantizer (identical math and buffers)."""

    def __init__(self, dim: int, codebook_size: int, **kwargs):
        if kwargs.pop("depth", 1) != 1:
            raise ValueError("VectorQuantizer is ResidualQuantizer with depth 1; use ResidualQuantizer for depth > 1")
        kwargs.pop("shared_codebook", None)  # irrelevant with a single depth
        super().__init__(dim, codebook_size, 1, shared_codebook=True, **kwargs)
