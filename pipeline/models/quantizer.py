"""Residual quantization (RQ-VAE) with an EMA codebook; VQ is exactly RQ with depth 1.

Every nearest-code search goes through `kernels` (one implementation to optimise and test).
The codebook is not a parameter: it is learned by EMA of assignment statistics, so it lives in
registered buffers (`embed`, `cluster_size`, `embed_sum`) together with the counters that make
dead-code restarts reproducible (`update_step`) -- a state_dict therefore resumes exactly.

Training follows the authors' code by default (docs/fidelity.md): with a shared codebook the EMA
step, and the restarts, run after each depth, so depth d+1 searches the codebook that depth d's
assignments just moved (`per_depth_update`); restarts (`authors_restart`) start from EMA sizes 0,
give every dead code a row of a seeded permutation of that depth's inputs (tiled with small uniform
noise when there are fewer inputs than codes) and store it in the EMA statistics, so the code is
that vector / its smoothed size; with weights (DQ), `authors_weighting` makes the loss
(1+beta)*mean(w*(z-q)^2) in value, beta*... in gradient, and the EMA unweighted.
"""
from __future__ import annotations

import math
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
    """D-depth residual quantizer over C-dim vectors with one shared codebook or one per depth.

    per_depth_update (shared codebook, training): search depth d, EMA-update (and restart) the
      codebook with depth d's assignments, then search depth d+1 with the updated codebook (the
      authors' RQBottleneck). False: every depth searches the pre-update codebook, one EMA step after.
    authors_restart: the authors' dead-code restart (see `_restart_dead_codes`); False: ours (sizes
      start at 1, at most one code per pool vector, code = the vector).
    authors_weighting: how `weight_BHW` enters (DQ): True = the authors' VQ loss and an unweighted
      EMA; False = loss normalised by sum(w) and the EMA weighted by w.
    """

    def __init__(self, dim: int, codebook_size: int, depth: int = 4, *, shared_codebook: bool = True,
                 decay: float = 0.99, eps: float = 1e-5, beta: float = 0.25, dead_code_threshold: float = 1.0,
                 kmeans_init: bool = False, kmeans_iters: int = 10, seed: int = 0, per_depth_update: bool = True,
                 authors_restart: bool = True, authors_weighting: bool = True):
        super().__init__()
        self.dim, self.codebook_size, self.depth = dim, codebook_size, depth
        self.shared_codebook = shared_codebook
        self.decay, self.eps, self.beta = decay, eps, beta
        self.dead_code_threshold, self.kmeans_init, self.kmeans_iters = dead_code_threshold, kmeans_init, kmeans_iters
        self.seed = seed
        self.per_depth_update, self.authors_restart = per_depth_update, authors_restart
        self.authors_weighting = authors_weighting
        n_books = 1 if shared_codebook else depth
        embed = torch.randn(n_books, codebook_size, dim)
        self.register_buffer("embed", embed)
        # Ours: cluster_size starts at 1 with embed_sum == embed, so the EMA is self-consistent from
        # step 1 and no code counts as dead before it has had a chance to be used. The authors start
        # at 0: the first EMA step leaves every code with fewer than threshold / (1 - decay) hits
        # dead, so the first batch restarts (i.e. initialises from data) almost the whole codebook.
        # Without restarts a 0 start would divide the unused codes' embed_sum by ~eps: keep 1 then.
        zero_start = authors_restart and dead_code_threshold > 0 and not kmeans_init
        self.register_buffer("cluster_size", torch.full((n_books, codebook_size), 0.0 if zero_start else 1.0))
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

        weight_BHW (optional) weights each vector in the commitment loss (DQ: 1/4 on copied coarse
        cells) and, unless `authors_weighting`, in the EMA statistics.
        """
        B, C, H, W = z_BCHW.shape
        z_NC = rearrange(z_BCHW, "b c h w -> (b h w) c")
        w_N = None if weight_BHW is None else rearrange(weight_BHW, "b h w -> (b h w)").to(z_NC.dtype)
        w_ema_N = None if self.authors_weighting else w_N
        if self.training and not bool(self.initialized):
            self._kmeans_init(z_NC.detach().float())
        if self.training and self.shared_codebook and self.per_depth_update and self.depth > 1:
            # The authors' order: each depth's codes and code vectors come from the codebook as the
            # previous depths of this batch left it; the loss and output follow those codes.
            codes_ND, partial_NDC = self._search_and_update_per_depth(z_NC.detach(), w_ema_N)
        else:
            codes_ND, partial_NDC = kernels.residual_quantize(z_NC.detach(), self._kernel_codebook(), self.depth)
            # Codes and partial sums come from the pre-update codebook, so the loss and the output agree
            # with the codes returned; the EMA step below then moves the codebook for the next batch.
            if self.training:
                self._ema_update(z_NC.detach().float(), codes_ND, partial_NDC.float(), w_ema_N)
        partial_NDC = partial_NDC.to(z_NC.dtype)
        err_ND = (z_NC.unsqueeze(1) - partial_NDC.detach()).pow(2).mean(-1)
        if w_N is None:
            loss = self.beta * err_ND.mean()
        elif self.authors_weighting:
            # beta * mean(w (sg[q] - z)^2) + mean(w (q - sg[z])^2) over all cells and channels: the
            # second (codebook) term has no gradient with an EMA codebook, so it adds value only.
            commit = (err_ND * w_N[:, None]).mean()
            loss = self.beta * commit + commit.detach()
        else:
            loss = self.beta * (err_ND * w_N[:, None]).sum() / (w_N.sum() * self.depth).clamp_min(1e-12)
        zq_NC = z_NC + (partial_NDC[:, -1] - z_NC).detach()  # straight-through estimator
        usage_D, perplexity_D = self._code_stats(codes_ND, w_N)
        return QuantizerOutput(
            zq_BCHW=rearrange(zq_NC, "(b h w) c -> b c h w", b=B, h=H, w=W),
            codes_BHWD=rearrange(codes_ND, "(b h w) d -> b h w d", b=B, h=H, w=W),
            loss=loss, usage_D=usage_D, perplexity_D=perplexity_D)

    @torch.no_grad()
    def _search_and_update_per_depth(self, z_NC: torch.Tensor, w_N: torch.Tensor | None):
        """Shared codebook: search depth d, EMA step + restarts on depth d's residuals, then depth d+1.

        Depth 0 searches z as given (like `kernels.residual_quantize`), deeper ones the fp32 residual
        z - partial_sums[:, d-1]. Returns codes_ND and fp32 partial sums, as the kernel does.
        """
        z32 = z_NC.float()
        codes, partials = [], []
        partial = torch.zeros_like(z32)
        for d in range(self.depth):
            residual = z32 - partial
            code_N, _ = kernels.nearest_code(z_NC if d == 0 else residual, self.embed[0])
            vec_NC = self.embed[0][code_N].float()  # a copy: the codebook changes below
            self._ema_step(0, residual, code_N, w_N)
            if self.dead_code_threshold > 0:
                self._restart_dead_codes(0, residual, salt=d)
            partial = partial + vec_NC
            codes.append(code_N)
            partials.append(partial)
        self.update_step += 1
        return torch.stack(codes, 1), torch.stack(partials, 1)

    @torch.no_grad()
    def encode(self, z_BCHW: torch.Tensor) -> torch.Tensor:
        """Deterministic codes (B, H, W, D); never updates the codebook."""
        B, _, H, W = z_BCHW.shape
        codes_ND, _ = kernels.residual_quantize(rearrange(z_BCHW, "b c h w -> (b h w) c"),
                                                self._kernel_codebook(), self.depth)
        return rearrange(codes_ND, "(b h w) d -> b h w d", b=B, h=H, w=W)

    @torch.no_grad()
    def soft_codes(self, z_BCHW: torch.Tensor, tau: float, *, sample: bool = False,
                   generator: torch.Generator | None = None,
                   uniforms_BHWD: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-depth Q_tau(k | r_{d-1}) = softmax(-||r_{d-1} - e_k||^2 / tau) and the codes.

        sample=False: codes are the argmin codes (as `encode`) and the residual follows them;
        sample=True: codes are drawn from Q_tau and the next residual follows the sampled code
        (RQ's stochastic codes against exposure bias). Returns (probs_BHWDK, codes_BHWD).
        The draws come from `generator`, or (inverse CDF) from `uniforms_BHWD` when given: the
        prior trainer passes per-sample uniforms so the draws do not depend on how a batch is split
        among ranks.
        """
        B, _, H, W = z_BCHW.shape
        r_NC = rearrange(z_BCHW, "b c h w -> (b h w) c")
        u_ND = None if uniforms_BHWD is None else rearrange(uniforms_BHWD, "b h w d -> (b h w) d").to(r_NC.device)
        probs, codes = [], []
        for d in range(self.depth):
            book = self.codebook(d)
            draw = sample and u_ND is None
            probs_NK, sampled_N = kernels.soft_codes(r_NC, book, tau, sample=draw, generator=generator)
            if sample and u_ND is not None:
                sampled_N = kernels.sample_rows(probs_NK, u_ND[:, d].to(probs_NK.dtype))
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
    def _ema_step(self, b: int, r_NC: torch.Tensor, code_N: torch.Tensor, w_N: torch.Tensor | None) -> None:
        """One EMA step of book b with the assignments code_N of the (fp32) vectors r_NC, then
        embed = embed_sum / smoothed sizes. Statistics are summed over ranks first."""
        K = self.codebook_size
        counts_K = torch.bincount(code_N, weights=w_N, minlength=K).to(r_NC.dtype)
        r = r_NC if w_N is None else r_NC * w_N[:, None]
        sums_KC = torch.zeros(K, self.dim, dtype=r_NC.dtype, device=r_NC.device).index_add_(0, code_N, r)
        _all_reduce_sum(counts_K, sums_KC)
        self.cluster_size[b].mul_(self.decay).add_(counts_K, alpha=1 - self.decay)
        self.embed_sum[b].mul_(self.decay).add_(sums_KC, alpha=1 - self.decay)
        self.embed[b].copy_(self.embed_sum[b] / self._smoothed_sizes(b)[:, None])

    @torch.no_grad()
    def _ema_update(self, z_NC: torch.Tensor, codes_ND: torch.Tensor, partial_NDC: torch.Tensor,
                    w_N: torch.Tensor | None) -> None:
        """One EMA step per depth on that depth's residuals r_{d-1} = z - zhat_{d-1}, then restarts.

        Codes were all searched before this update. Restarts: per-depth books from their own depth's
        residuals; a shared book (per_depth_update off) once, from all depths' residuals pooled.
        """
        residuals = [z_NC] + [z_NC - partial_NDC[:, d] for d in range(self.depth - 1)]
        for d in range(self.depth):
            self._ema_step(0 if self.shared_codebook else d, residuals[d], codes_ND[:, d], w_N)
        if self.dead_code_threshold > 0:
            for b in range(self.embed.shape[0]):
                pool = torch.cat(residuals) if self.shared_codebook else residuals[b]
                self._restart_dead_codes(b, pool, salt=b)
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

    @staticmethod
    def _permutation(n: int, generator: torch.Generator) -> torch.Tensor:
        """The random order restart vectors are drawn in (a method so tests can fix it)."""
        return torch.randperm(n, generator=generator)

    @torch.no_grad()
    def _restart_dead_codes(self, b: int, pool_NC: torch.Tensor, salt: int | None = None) -> None:
        """Replace the codes of book b whose EMA cluster size is < threshold by vectors of rank 0's pool.

        authors_restart (the authors' VQEmbedding): the pool is tiled with uniform noise in
        [0, 0.01/sqrt(C)) per channel up to K rows when it has fewer than K vectors, then permuted;
        dead code k gets row k of the permutation, as EMA statistics (embed_sum = vector, cluster
        size = max(threshold, 1)), and the whole book is renormalised, so the code is the vector
        divided by its smoothed size (a 1e-5 relative change) and every dead code is restarted.

        Ours: the vectors are drawn WITHOUT replacement and never tiled, so no two restarted codes
        start equal (a duplicate would lose every tie to its twin and stay dead); when rank 0's pool
        holds fewer vectors than there are dead codes, only the lowest-index dead codes get one
        vector each, the others stay dead and are retried at the next update; code = the vector.
        """
        salt = b if salt is None else salt
        dead_K = self.cluster_size[b] < self.dead_code_threshold
        if _is_rank0() and not self.authors_restart:
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
            g = self._generator(salt=salt)
            if self.authors_restart:
                vecs.copy_(self._restart_rows(pool_NC, g, dead_K))
            else:
                idx = self._permutation(pool_NC.shape[0], g)[:n_dead]
                vecs.copy_(pool_NC[idx.to(pool_NC.device)])
        vecs = _broadcast_from_rank0(vecs)
        size = max(self.dead_code_threshold, 1.0)
        self.embed_sum[b][dead_K] = vecs if self.authors_restart else vecs * size
        self.cluster_size[b][dead_K] = size
        if self.authors_restart:
            self.embed[b].copy_(self.embed_sum[b] / self._smoothed_sizes(b)[:, None])
        else:
            self.embed[b][dead_K] = vecs

    def _restart_rows(self, pool_NC: torch.Tensor, g: torch.Generator, dead_K: torch.Tensor) -> torch.Tensor:
        """The authors' restart vectors for the dead codes: row k of a random order of the pool, which
        is first tiled ceil(K/N) times with uniform noise in [0, 0.01/sqrt(C)) per entry when it has
        N < K rows. Only the dead codes' rows are built (and get noise): same distribution, no K x C
        temporaries per depth."""
        K, N = self.codebook_size, pool_NC.shape[0]
        tiled = N < K
        idx = self._permutation(-(-K // N) * N if tiled else N, g)[:K][dead_K.cpu()]
        rows = pool_NC[(idx % N).to(pool_NC.device)].float()
        if tiled:
            rows = rows + torch.rand(rows.shape, generator=g).to(rows.device) * (0.01 / math.sqrt(self.dim))
        return rows

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
