"""A finished DeepSpeed engine lets go of its model and optimizer states (close()), so the next stage
of `tessera run` does not start with the last one's memory."""
import gc
import weakref

import torch

from pipeline.config.root import load_config
from pipeline.runtime.dist import DistEnv
from pipeline.train.engine import make_engine
from pipeline.train.prior_deepspeed import make_prior_optimizer, prior_deepspeed_config
from pipeline.train.schedule import warmup_cosine


def test_closed_deepspeed_engine_frees_the_model():
    tc = load_config(None, ["prior_train.engine=deepspeed", "prior_train.zero_stage=2",
                            "prior_train.batch_size=2"]).prior_train
    env, device = DistEnv(rank=0, world_size=1, local_rank=0), torch.device("cpu")
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    config = prior_deepspeed_config(tc, 1, device)
    optimizer = make_prior_optimizer(model, tc, config)
    engine = make_engine("prior", model, optimizer, warmup_cosine(optimizer, 2, 0, 0.0), tc, env, device,
                         ds_config=config)
    engine.zero_grad()
    engine.backward(engine(torch.randn(2, 8)).square().mean())
    engine.step()
    alive = weakref.ref(model)
    engine.close()
    del model, optimizer, engine
    gc.collect()
    assert alive() is None
