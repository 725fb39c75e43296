"""Run under torchrun by test_estimator_setups.py: every memory setup `tessera estimate` can print or
recommend (ZeRO stage x offload x activation checkpointing), built the way train_prior builds it
(prior_deepspeed_config + make_prior_optimizer + make_engine), two optimizer steps each on a tiny
RQ prior, then the export train_prior writes. Rank 0 writes one JSON line per setup to argv[1].

One launch for all setups: starting DeepSpeed ranks costs far more than two steps of a tiny prior.
"""
import json
import sys

import torch

from pipeline.cli.estimate import memory_setups
from pipeline.config.root import load_config
from pipeline.losses.prior_loss import rq_prior_loss
from pipeline.models.prior_config import CodeSpec
from pipeline.models.registry import build_prior
from pipeline.runtime.dist import device_for, init_distributed
from pipeline.train.engine import make_engine
from pipeline.train.prior_deepspeed import make_prior_optimizer, prior_deepspeed_config
from pipeline.train.schedule import warmup_cosine

SPEC = CodeSpec("rq", codebook_size=32, code_dim=8, height=4, width=4, depth=2)
OVERRIDES = ["prior.preset=rq-demo", "prior.num_classes=10", "prior.embed_dim=32", "prior.n_head=4",
             "prior.spatial_layers=2", "prior.depth_layers=1", "prior_train.batch_size=4", "prior_train.lr=1e-2",
             "prior_train.warmup_steps=0", "prior_train.engine=deepspeed"]


def full_state(engine, model, zero_stage: int) -> dict:
    """The consolidated weights, as train_prior exports them (gathered under ZeRO-3)."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            return {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_setup(env, device, zero_stage: int, offload: str, checkpointing: bool) -> dict:
    cfg = load_config("configs/demo-rq.yaml", OVERRIDES + [
        f"prior_train.zero_stage={zero_stage}", f"prior.grad_checkpointing={str(checkpointing).lower()}",
        f"prior_train.offload_optimizer={str(offload != 'none').lower()}",
        f"prior_train.offload_params={str(offload == 'optimizer+params').lower()}"])
    tc = cfg.prior_train
    torch.manual_seed(0)
    model = build_prior(cfg.prior, SPEC).to(device)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ds_config = prior_deepspeed_config(tc, env.world_size, device)
    optimizer = make_prior_optimizer(model, tc, ds_config)
    scheduler = warmup_cosine(optimizer, 2, 0, 0.0)
    engine = make_engine("prior", model, optimizer, scheduler, tc, env, device, ds_config=ds_config)
    generator = torch.Generator().manual_seed(100 + env.rank)
    losses = []
    for _ in range(2):
        codes = torch.randint(0, SPEC.codebook_size, (2, SPEC.height, SPEC.width, SPEC.depth), generator=generator)
        labels = torch.randint(0, 10, (2,), generator=generator)
        engine.zero_grad()
        loss, _ = rq_prior_loss(engine(codes.to(device), labels.to(device)), codes.to(device), None)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    after = full_state(engine, model, zero_stage)
    changed = sorted(k for k in before if not torch.equal(before[k].cpu(), after[k].cpu()))
    stepping = getattr(engine.wrapped.optimizer, "optimizer", engine.wrapped.optimizer)  # inside ZeRO's wrapper
    return {"zero_stage": zero_stage, "offload": offload, "checkpointing": checkpointing, "losses": losses,
            "optimizer": type(stepping).__name__, "group_decays": [g["weight_decay"] for g in stepping.param_groups],
            "exported_keys": sorted(after), "state_keys": sorted(before),
            "shapes_match": all(after[k].shape == before[k].shape for k in before),
            "changed": changed, "parameters": sorted(n for n, _ in model.named_parameters())}


def main(out_path: str) -> None:
    env = init_distributed()
    device = device_for(env)
    rows = [run_setup(env, device, stage, offload, ckpt)
            for stage, offload in memory_setups() for ckpt in (False, True)]
    if env.is_main:
        with open(out_path, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
