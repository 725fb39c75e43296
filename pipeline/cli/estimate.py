"""`tessera estimate`: memory per GPU of training the prior, before submitting a job.

Computed from the model built on the meta device (DeepSpeed's live estimators miscount those)
with mixed-precision AdamW bookkeeping, per parameter:
    bf16 weights 2 B + bf16 gradients 2 B + fp32 master weights 4 B + Adam moments 8 B = 16 B
(fp32 training: weights 4 + gradients 4 + moments 8 = 16 B, no master copy). ZeRO partitions over
N ranks: stage 1 the optimizer states (master + moments), 2 also the gradients, 3 also the
weights. Offload moves the optimizer states (and with ZeRO-3 the weights) to CPU memory.

Activations per token and transformer layer, bf16, after Korthikanti et al. (2022) with a fused
(flash) attention that stores no score matrix: 34 E bytes; with activation checkpointing only the
block input (2 E bytes) stays, plus one layer recomputed at a time. The logits add K x (2 + 4 + 4)
bytes per predicted token (bf16 logits, their fp32 copy for the loss, its gradient).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

GIB = 2 ** 30


@dataclass
class MemoryRow:
    zero_stage: int
    offload: str                 # none | optimizer | optimizer+params
    gpu_model_states_gib: float
    cpu_model_states_gib: float  # per rank


OFFLOADS = ("none", "optimizer", "optimizer+params")


def memory_setups() -> list[tuple[int, str]]:
    """Every (ZeRO stage, offload) the estimate prints a row for and can recommend: offloading
    needs ZeRO 1-3, offloading the parameters ZeRO-3."""
    return [(stage, offload) for stage in range(4) for offload in OFFLOADS
            if not (offload != "none" and stage == 0) and not (offload == "optimizer+params" and stage != 3)]


def model_state_bytes(n_params: int, world_size: int, zero_stage: int, *, bf16: bool = True,
                      offload_optimizer: bool = False, offload_params: bool = False) -> tuple[float, float]:
    """(GPU bytes, CPU bytes) of weights + gradients + optimizer states on one rank."""
    P, N = float(n_params), float(world_size)
    weights, grads = (2 * P, 2 * P) if bf16 else (4 * P, 4 * P)
    optim = (12 * P) if bf16 else (8 * P)   # master copy (bf16 only) + Adam m, v
    if zero_stage >= 1:
        optim /= N
    if zero_stage >= 2:
        grads /= N
    if zero_stage >= 3:
        weights /= N
    gpu, cpu = weights + grads + optim, 0.0
    if offload_optimizer:
        gpu, cpu = gpu - optim, cpu + optim
    if offload_params:
        gpu, cpu = gpu - weights, cpu + weights
    return gpu, cpu


def _stack_activation_bytes(n_layers: int, embed_dim: int, tokens: int, checkpointing: bool) -> float:
    per_layer_full = 34.0 * embed_dim * tokens
    if checkpointing:
        return n_layers * 2.0 * embed_dim * tokens + per_layer_full
    return n_layers * per_layer_full


def activation_bytes(prior_cfg, spec, micro_batch: int, checkpointing: bool) -> float:
    """Training activations of one micro-batch on one rank (bytes)."""
    E, b = prior_cfg.embed_dim, micro_batch
    if spec.kind == "rq":
        T, D = spec.height * spec.width, spec.depth
        acts = _stack_activation_bytes(prior_cfg.spatial_layers, E, b * T, checkpointing)
        acts += _stack_activation_bytes(prior_cfg.depth_layers, E, b * T * D, checkpointing)
        predicted, vocab = b * T * D, spec.codebook_size
    else:
        L = 4 * spec.height * spec.width + 4  # the longest packed sequence (every region fine)
        acts = _stack_activation_bytes(prior_cfg.position_layers, E, b * L, checkpointing)
        acts += _stack_activation_bytes(prior_cfg.content_layers, E, b * L, checkpointing)
        predicted, vocab = 2 * b * L, spec.codebook_size + 4 * spec.height * spec.width
    return acts + predicted * vocab * 10.0


def estimate(cfg, world_size: int, gpu_memory_gib: float = 80.0, gpu_tflops: float = 989.0,
             mfu: float = 0.35) -> dict:
    """Parameters, model states per GPU for ZeRO 0-3 (with and without offload), activations at the
    configured micro-batch with and without checkpointing, and a recommendation."""
    from ..models.prior_config import CodeSpec
    from ..models.registry import build_prior, build_tokenizer

    with torch.device("meta"):
        spec = CodeSpec.from_tokenizer(build_tokenizer(cfg.tokenizer, cfg.data.resolution))
        model = build_prior(cfg.prior, spec)
    n_params = sum(p.numel() for p in model.parameters())
    tc = cfg.prior_train
    micro = max(1, tc.batch_size // (world_size * tc.grad_accum))
    rows = []
    for stage, offload in memory_setups():
        gpu, cpu = model_state_bytes(n_params, world_size, stage, offload_optimizer=offload != "none",
                                     offload_params=offload == "optimizer+params")
        rows.append(MemoryRow(stage, offload, gpu / GIB, cpu / GIB))
    acts = {ckpt: activation_bytes(cfg.prior, spec, micro, ckpt) / GIB for ckpt in (False, True)}
    budget = 0.9 * gpu_memory_gib
    recommendation = None
    for ckpt in (False, True):  # the least communication and recomputation that fits
        for row in rows:
            if row.gpu_model_states_gib + acts[ckpt] <= budget:
                recommendation = dict(zero_stage=row.zero_stage, offload=row.offload, grad_checkpointing=ckpt,
                                      gpu_total_gib=row.gpu_model_states_gib + acts[ckpt])
                break
        if recommendation:
            break
    # Wall time of the whole run: model FLOPs (pipeline/train/throughput.py's accounting) over the
    # FLOP/s the ranks sustain at an assumed MFU (benchmarks/prior_training.py measures the real one).
    from ..train.throughput import prior_flops_per_sample

    total_flops = prior_flops_per_sample(model, spec) * tc.batch_size * tc.steps
    hours = total_flops / (world_size * gpu_tflops * 1e12 * mfu) / 3600
    return dict(parameters=n_params, world_size=world_size, micro_batch=micro, rows=rows, activations_gib=acts,
                gpu_memory_gib=gpu_memory_gib, recommendation=recommendation, spec=spec,
                compute=dict(total_flops=total_flops, steps=tc.steps, batch=tc.batch_size, gpu_tflops=gpu_tflops,
                             mfu=mfu, hours=hours))


def format_estimate(result: dict, preset: str) -> str:
    lines = [f"prior {preset or '(custom)'}: {result['parameters']:,} parameters "
             f"({result['parameters'] / 1e9:.3f} B); world size {result['world_size']}, "
             f"micro-batch {result['micro_batch']} per rank",
             "", "model states per GPU (bf16 weights + grads, fp32 master + AdamW moments):",
             f"  {'ZeRO':>4}  {'offload':<17} {'GPU GiB':>9} {'CPU GiB/rank':>13}"]
    for r in result["rows"]:
        lines.append(f"  {r.zero_stage:>4}  {r.offload:<17} {r.gpu_model_states_gib:>9.2f} "
                     f"{r.cpu_model_states_gib:>13.2f}")
    a = result["activations_gib"]
    lines += ["", f"activations per GPU at the micro-batch: {a[False]:.2f} GiB without activation checkpointing, "
                  f"{a[True]:.2f} GiB with it"]
    rec = result["recommendation"]
    if rec is None:
        lines.append(f"recommendation: nothing fits in {result['gpu_memory_gib']:.0f} GiB per GPU: more ranks, a "
                     f"smaller prior_train.batch_size per rank (grad_accum), or a larger GPU")
    else:
        lines.append(f"recommendation ({result['gpu_memory_gib']:.0f} GiB GPUs, 10% headroom): prior_train.zero_stage="
                     f"{rec['zero_stage']}, offload {rec['offload']}, prior.grad_checkpointing="
                     f"{str(rec['grad_checkpointing']).lower()} (~{rec['gpu_total_gib']:.1f} GiB per GPU)")
    c = result["compute"]
    lines += ["", f"compute: {c['total_flops'] / 1e18:,.1f} EFLOP for {c['steps']:,} steps at batch {c['batch']:,}; "
                  f"at {c['mfu']:.0%} MFU of {c['gpu_tflops']:.0f} TFLOP/s per GPU on {result['world_size']} GPUs: "
                  f"~{c['hours']:.1f} h ({c['hours'] * result['world_size']:,.0f} GPU-hours)"]
    return "\n".join(lines)
