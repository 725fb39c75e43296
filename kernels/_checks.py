"""Input validation shared by every backend, so all of them reject the same inputs the same way."""
from __future__ import annotations

import math

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_tensor(name: str, t, ndims: tuple[int, ...]) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; supported: float32, bfloat16, float16")


def _common_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    # Mixed precisions are promoted (bf16 + fp16 -> fp32): never round an input down.
    return a.dtype if a.dtype == b.dtype else torch.promote_types(a.dtype, b.dtype)


def _prepare(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Detach, unify dtype, make contiguous (a copy only where the input is strided)."""
    dtype = _common_dtype(x, codebook)
    x = x.detach().to(dtype).contiguous()
    codebook = codebook.detach().to(dtype).contiguous()
    return x, codebook


def _check_pair(x_name: str, x: torch.Tensor, cb_name: str, codebook: torch.Tensor) -> None:
    if x.device != codebook.device:
        raise ValueError(f"{x_name} is on {x.device} but {cb_name} is on {codebook.device}")
    if x.shape[-1] != codebook.shape[-1]:
        raise ValueError(
            f"feature size mismatch: {x_name} has C={x.shape[-1]}, {cb_name} has C={codebook.shape[-1]}"
        )
    if codebook.shape[-2] < 1:
        raise ValueError(f"{cb_name} must hold at least one code, got shape {tuple(codebook.shape)}")
    if codebook.shape[-1] < 1:
        raise ValueError(f"feature size C must be >= 1, got shape {tuple(codebook.shape)}")


def check_nearest(x_NC, codebook_KC, codebook_sqnorm_K):
    _check_tensor("x_NC", x_NC, (2,))
    _check_tensor("codebook_KC", codebook_KC, (2,))
    _check_pair("x_NC", x_NC, "codebook_KC", codebook_KC)
    x_NC, codebook_KC = _prepare(x_NC, codebook_KC)
    if codebook_sqnorm_K is not None:
        if not isinstance(codebook_sqnorm_K, torch.Tensor) or codebook_sqnorm_K.shape != (codebook_KC.shape[0],):
            raise ValueError(
                f"codebook_sqnorm_K must be a tensor of shape ({codebook_KC.shape[0]},), "
                f"got {getattr(codebook_sqnorm_K, 'shape', type(codebook_sqnorm_K).__name__)}"
            )
        if codebook_sqnorm_K.device != codebook_KC.device:
            raise ValueError(
                f"codebook_sqnorm_K is on {codebook_sqnorm_K.device} but codebook_KC is on {codebook_KC.device}"
            )
        codebook_sqnorm_K = codebook_sqnorm_K.detach().to(torch.float32).contiguous()
    return x_NC, codebook_KC, codebook_sqnorm_K


def check_residual(x_NC, codebook, depth):
    _check_tensor("x_NC", x_NC, (2,))
    _check_tensor("codebook", codebook, (2, 3))
    _check_pair("x_NC", x_NC, "codebook", codebook)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    if codebook.dim() == 3 and codebook.shape[0] != depth:
        raise ValueError(
            f"per-depth codebook has {codebook.shape[0]} depths but depth={depth}; "
            "pass a K x C codebook to share one across depths"
        )
    return _prepare(x_NC, codebook)


def check_soft(residual_NC, codebook_KC, tau, sample, generator):
    _check_tensor("residual_NC", residual_NC, (2,))
    _check_tensor("codebook_KC", codebook_KC, (2,))
    _check_pair("residual_NC", residual_NC, "codebook_KC", codebook_KC)
    if isinstance(tau, torch.Tensor):
        if tau.numel() != 1:
            raise ValueError(f"tau must be a scalar, got a tensor of shape {tuple(tau.shape)}")
        tau = float(tau.item())
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (tau > 0) or math.isinf(tau):
        raise ValueError(f"tau must be a positive finite number, got {tau!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != residual_NC.device.type:
            raise ValueError(f"generator is on {generator.device} but residual_NC is on {residual_NC.device}")
    residual_NC, codebook_KC = _prepare(residual_NC, codebook_KC)
    # fp32 cannot divide by a tau below its smallest normal; clamping keeps tau -> 0 an argmin.
    tau = max(float(tau), torch.finfo(torch.float32).tiny)
    return residual_NC, codebook_KC, tau
