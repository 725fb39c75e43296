"""The authors' models (kakaobrain/rq-vae-transformer), built from a checkout given at run time.

Their code is never part of Tessera: `load(repo)` puts the checkout on sys.path and papers over
what keeps it from importing on this machine, at runtime only (their files are not touched):
  - omegaconf and tqdm are not Tessera dependencies: tiny stand-ins (they are used for config
    merging and progress bars only; the models are built from explicit values here);
  - rqtransformer/configs.py declares dataclass fields with a dataclass instance as default,
    which Python >= 3.11 refuses ("mutable default"): a plain-class stand-in module with the same
    names is registered before their package is imported.
"""
from __future__ import annotations

import copy
import sys
import types
from pathlib import Path

import yaml


class _Config(types.SimpleNamespace):
    """Attribute access like their OmegaConf configs, plus the .copy() their RQTransformer calls."""

    def copy(self):
        return copy.deepcopy(self)


def _stand_in(name: str, **attrs) -> None:
    if name not in sys.modules:
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module


def load(repo: str | Path) -> None:
    """Make their `rqvae` package importable from the checkout at `repo`."""
    repo = Path(repo).resolve()
    if not (repo / "rqvae" / "models" / "rqvae" / "rqvae.py").is_file():
        raise SystemExit(f"--authors-repo {repo}: not a checkout of kakaobrain/rq-vae-transformer "
                         f"(no rqvae/models/rqvae/rqvae.py)")
    _stand_in("omegaconf", MISSING="???", OmegaConf=type("OmegaConf", (), {}))
    _stand_in("tqdm", tqdm=lambda iterable=None, *args, **kwargs: iterable)
    _stand_in("rqvae.models.rqtransformer.configs", AttentionBlockConfig=_Config, AttentionStackConfig=_Config,
              RQTransformerConfig=_Config)
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))


def stage1_config(*, resolution: int, ch_mult: list[int], n_embed: int, depth: int, attn_resolutions: list[int],
                  ch: int = 128, z: int = 256, num_res_blocks: int = 2) -> dict:
    """A stage-1 config.yaml in their layout (their ImageNet RQ-VAE unless told otherwise)."""
    side = resolution // 2 ** (len(ch_mult) - 1)
    return {"arch": {
        "type": "rq-vae", "code_hier": 1, "checkpointing": False,
        "hparams": {"bottleneck_type": "rq", "embed_dim": z, "n_embed": n_embed, "latent_shape": [side, side, z],
                    "code_shape": [side, side, depth], "shared_codebook": True, "decay": 0.99,
                    "restart_unused_codes": True, "loss_type": "mse", "latent_loss_weight": 0.25},
        "ddconfig": {"double_z": False, "z_channels": z, "resolution": resolution, "in_channels": 3, "out_ch": 3,
                     "ch": ch, "ch_mult": ch_mult, "num_res_blocks": num_res_blocks,
                     "attn_resolutions": attn_resolutions, "dropout": 0.0}}}


def build_rqvae(config: dict):
    """Their RQVAE (random weights, their initialisation) for a stage1_config()."""
    from rqvae.models.rqvae import RQVAE

    arch = config["arch"]
    return RQVAE(**arch["hparams"], ddconfig=arch["ddconfig"], checkpointing=arch["checkpointing"])


def write_stage1_yaml(config: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def stage2_config(*, code_shape: list[int], vocab: int, embed_dim: int, n_head: int, body_layers: int,
                  head_layers: int, input_embed_dim: int = 256) -> dict:
    """A stage-2 (RQ-Transformer) arch section as every released config sets it; unconditional."""
    block = {"n_head": n_head, "embed_dim": embed_dim, "mlp_bias": True, "attn_bias": True, "attn_pdrop": 0.0,
             "resid_pdrop": 0.1, "gelu": "v1"}
    return {"type": "rq-transformer", "block_size": list(code_shape), "vocab_size": vocab, "embed_dim": embed_dim,
            "input_embed_dim": input_embed_dim, "vocab_size_cond": 1, "block_size_cond": 1, "embd_pdrop": 0.0,
            "input_emb_vqvae": True, "head_emb_vqvae": True, "cumsum_depth_ctx": True, "shared_tok_emb": True,
            "shared_cls_emb": True, "scaled_head_emb_vqvae": False, "use_padding_emb": False,
            "body": {"n_layer": body_layers, "block": dict(block)}, "head": {"n_layer": head_layers,
                                                                             "block": dict(block)}}


def _namespace(tree):
    if isinstance(tree, dict):
        return _Config(**{k: _namespace(v) for k, v in tree.items()})
    return tree


def build_rqtransformer(arch: dict):
    """Their RQTransformer (random weights) for a stage2_config()."""
    from rqvae.models.rqtransformer import RQTransformer

    return RQTransformer(_namespace(arch))


def code_embedder(n_embed: int, code_shape: list[int], embed_dim: int = 256):
    """Their RQ bottleneck (random codebook) in the role of `model_aux`: the code vectors their
    RQ-Transformer embeds its inputs with. Returns (model_aux, bottleneck)."""
    from rqvae.models.rqvae.quantizations import RQBottleneck

    H, W, D = code_shape
    bottleneck = RQBottleneck(latent_shape=[H, W, embed_dim], code_shape=[H, W, D], n_embed=n_embed,
                              shared_codebook=True, restart_unused_codes=True).eval()
    return types.SimpleNamespace(get_code_emb_with_depth=bottleneck.embed_code_with_depth), bottleneck
