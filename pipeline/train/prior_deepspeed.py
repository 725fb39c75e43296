"""What the prior's engine is built from: the authors' AdamW parameter groups and the optimizer that
steps them, the DeepSpeed config (generated from the typed config, then the user's JSON on top),
and DeepSpeed universal checkpoints for resuming on another number of ranks."""
from __future__ import annotations

from pathlib import Path

import torch

from ..config.root import merge_trees
from ..runtime.errors import StageError
from ..runtime.io import read_json
from ..runtime.validate import read_json_mapping
from .checkpoint import RECORD, CheckpointManager
from .engine import deepspeed_config

UNIVERSAL_DONE = "converted.txt"  # a universal checkpoint folder is complete when this exists


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as the authors make them: decay on Linear weights; none on biases, norms,
    embeddings and free position tables."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            (decay if isinstance(module, torch.nn.Linear) and name == "weight" else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def offloads_optimizer(ds_config: dict | None) -> bool:
    """Whether DeepSpeed keeps the optimizer states off the accelerator (typed config or user JSON)."""
    offload = (ds_config or {}).get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


def make_prior_optimizer(model: torch.nn.Module, tc, ds_config: dict | None) -> torch.optim.Optimizer:
    """AdamW over the authors' decay groups: torch's, or DeepSpeedCPUAdam in AdamW mode under
    ZeRO-Offload, which steps the CPU copy of the partitions and where DeepSpeed refuses a torch
    optimizer (zero_force_ds_cpu_optimizer). The C++ op is built on first use (~30 s on an idle
    machine) and cached in ~/.cache/torch_extensions."""
    groups = decay_groups(model, tc.weight_decay)
    if offloads_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=tc.lr, betas=tuple(tc.betas), adamw_mode=True)
    return torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas))


def prior_deepspeed_config(tc, world_size: int, device: torch.device) -> dict:
    """Generated from the typed config (ZeRO stage, offload, bf16 on GPU), then the user's JSON on top."""
    config = deepspeed_config(tc, world_size, device)
    zero = config["zero_optimization"]
    if tc.offload_optimizer:
        if tc.zero_stage == 0:
            raise StageError("prior_train.offload_optimizer needs zero_stage 1, 2 or 3")
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    if tc.offload_params:
        if tc.zero_stage != 3:
            raise StageError("prior_train.offload_params needs zero_stage 3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    if tc.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if tc.deepspeed_config:
        user = read_json_mapping(tc.deepspeed_config, "prior_train.deepspeed_config")
        if "optimizer" in user:
            raise StageError(f"prior_train.deepspeed_config: {tc.deepspeed_config} declares an 'optimizer'; tessera "
                             f"builds AdamW itself (DeepSpeedCPUAdam under offload) from prior_train.lr, betas and "
                             f"weight_decay: remove the key and set those instead")
        config = merge_trees(config, user)
        for key in ("train_batch_size", "gradient_accumulation_steps"):
            mine = deepspeed_config(tc, world_size, device)[key]
            if config.get(key) != mine:
                raise StageError(f"prior_train.deepspeed_config: {key}={config.get(key)} disagrees with the typed "
                                 f"config ({mine}); set prior_train.batch_size / grad_accum instead")
    return config


def newest_world_size(checkpoints: CheckpointManager) -> int | None:
    """World size recorded by the newest complete checkpoint (None: there is none)."""
    for step in checkpoints.steps():
        if checkpoints.check_files(step) is None:
            return int(read_json(checkpoints.path_for(step) / RECORD).get("world_size", 0)) or None
    return None


def to_universal(tag_folder: Path, out_folder: Path) -> None:
    """DeepSpeed's ds_to_universal on one checkpoint tag folder (ZeRO 1-3 shards -> per-parameter
    fp32 weights and optimizer moments, loadable on any number of ranks)."""
    import argparse
    import contextlib
    import io
    import shutil

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    shutil.rmtree(out_folder, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(tag_folder), output_folder=str(out_folder), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints every parameter
        ds_to_universal(args)
