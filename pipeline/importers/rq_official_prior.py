"""Import the authors' released RQ-Transformer (kakaobrain/rq-vae-transformer stage 2).

A released stage-2 folder holds `config.yaml` (their `arch:` section) and `model.pt` (a dict with
`state_dict` and `state_dict_ema`). Every released config sets input_emb_vqvae, head_emb_vqvae,
cumsum_depth_ctx, shared_tok_emb and shared_cls_emb: exactly our RQTransformer with
input_embedding=codebook, so the conversion is a renaming plus one row: our class table has an
extra null class (guidance), which the authors' models never trained; it is initialised to the
mean class embedding, so guidance with an imported model needs fine-tuning to mean anything.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..config.schema import ConfigError, build_section
from ..models.prior_config import CodeSpec, PriorConfig
from ..runtime.validate import load_tensor_checkpoint, read_yaml_mapping
from .rq_official import CheckpointMismatch

# Their top-level names -> ours (block internals keep their names: ln1, ln2, attn.key/query/value/proj, mlp.0/2).
_RENAMES = (
    ("cond_emb.weight", "class_emb.weight"),
    ("pos_emb_cond", "cond_pos"),
    ("pos_emb_hw", "pos_hw"),
    ("pos_emb_d", "pos_d"),
    ("classifier.layer_norm.", "head_norm."),
    ("classifier.linear.", "head."),
    ("body_transformer.", "spatial."),
    ("head_transformer.", "depth."),
)
_REQUIRED_FLAGS = ("input_emb_vqvae", "head_emb_vqvae", "cumsum_depth_ctx", "shared_tok_emb", "shared_cls_emb")


def prior_config_from_yaml(config_yaml: dict) -> tuple[PriorConfig, CodeSpec]:
    """Their stage-2 config.yaml (as a dict) -> our PriorConfig and the CodeSpec it models."""
    arch = config_yaml.get("arch", config_yaml)
    if arch.get("type", "rq-transformer") != "rq-transformer":
        raise ConfigError(f"arch.type {arch.get('type')!r}: only 'rq-transformer' checkpoints can be imported")
    missing = [f for f in _REQUIRED_FLAGS if not arch.get(f, False)]
    if missing:
        raise ConfigError(f"arch: {', '.join(missing)} must be true (every released config sets them); this "
                          f"checkpoint uses a variant Tessera does not reproduce")
    if int(arch.get("block_size_cond", 1)) > 1:
        raise ConfigError("arch.block_size_cond > 1 (text conditioning) is not supported; class or unconditional only")
    body, head = arch["body"], arch["head"]
    blocks = [body.get("block", {}), head.get("block", {})]
    for b in blocks:
        if b.get("gelu", "v1") != "v1":
            raise ConfigError("arch.*.block.gelu: only 'v1' (exact GELU) is supported")
    if body["block"]["n_head"] != head["block"]["n_head"]:
        raise ConfigError("arch: body and head with different n_head are not supported")
    vocab = arch.get("vocab_size", config_yaml.get("dataset", {}).get("vocab_size"))
    vocab = vocab[0] if isinstance(vocab, (list, tuple)) else vocab
    H, W, D = (int(v) for v in arch["block_size"])
    cond = int(arch.get("vocab_size_cond", 0))
    blk = body.get("block", {})
    values = dict(
        kind="rq", embed_dim=int(arch["embed_dim"]), n_head=int(blk["n_head"]),
        spatial_layers=int(body["n_layer"]), depth_layers=int(head["n_layer"]),
        bias=bool(blk.get("attn_bias", True)) and bool(blk.get("mlp_bias", True)),
        dropout=float(blk.get("resid_pdrop", 0.1)), attn_dropout=float(blk.get("attn_pdrop", 0.0)),
        embed_dropout=float(arch.get("embd_pdrop", 0.0)), input_embedding="codebook",
        num_classes=cond if cond > 1 else 0, norm="layernorm", mlp="gelu")
    cfg = build_section(PriorConfig, values, "prior")
    spec = CodeSpec("rq", int(vocab), int(arch.get("input_embed_dim") or arch["embed_dim"]), H, W, D)
    return cfg, spec


def convert_state_dict(theirs: dict[str, torch.Tensor], ours_template: dict[str, torch.Tensor]) -> dict:
    """Rename their keys to ours and check every shape; the null-class row is added here.

    Raises CheckpointMismatch naming the first missing, unexpected or mismatching tensor.
    """
    theirs = {k.removeprefix("module."): v for k, v in theirs.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in theirs.items():
        new = key
        for old, repl in _RENAMES:
            if new.startswith(old):
                new = repl + new[len(old):]
                break
        if new not in ours_template:
            raise CheckpointMismatch(f"unexpected tensor in the checkpoint: {key!r} (would be {new!r}, which the "
                               f"RQTransformer does not have)")
        want = tuple(ours_template[new].shape)
        if new == "class_emb.weight" and value.shape[0] + 1 == want[0]:
            value = torch.cat([value, value.mean(0, keepdim=True)])  # the null class (guidance)
        if tuple(value.shape) != want:
            raise CheckpointMismatch(f"shape mismatch: their {key!r} is {tuple(value.shape)}, our {new!r} needs {want}")
        out[new] = value
    for key in ours_template:
        if key not in out and key != "codebook":
            raise CheckpointMismatch(f"missing tensor: the checkpoint has nothing for our {key!r}")
    return out


def load_stage2_state_dict(model_pt: str | Path, ema: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """(their state dict, which one) from a stage-2 model.pt: `state_dict_ema` when asked and present
    (their sampling script loads the EMA weights), else `state_dict`. Tensors only (weights_only)."""
    ckpt = load_tensor_checkpoint(model_pt, "--stage2")
    key = "state_dict_ema" if ema and "state_dict_ema" in ckpt else "state_dict"
    if key not in ckpt:
        raise CheckpointMismatch(f"{model_pt}: no 'state_dict' in the checkpoint (keys: {sorted(ckpt)[:8]})")
    return ckpt[key], key


def stage2_files(stage2_dir: str | Path) -> tuple[Path, Path]:
    """(model.pt, config.yaml) of a released stage-2 folder."""
    folder = Path(stage2_dir)
    cfg_path, ckpt_path = folder / "config.yaml", folder / "model.pt"
    for p in (ckpt_path, cfg_path):
        if not p.is_file():
            raise CheckpointMismatch(f"{p}: not found (a released stage-2 folder holds config.yaml and model.pt)")
    return ckpt_path, cfg_path


def load_rq_official_prior(stage2_dir: str | Path, codebook_BKC: torch.Tensor | None = None, *,
                           ema: bool = True):
    """(model, PriorConfig, CodeSpec) from a released stage-2 folder; `codebook_BKC` = the stage-1 codes' vectors."""
    ckpt_path, cfg_path = stage2_files(stage2_dir)
    cfg, spec = prior_config_from_yaml(read_yaml_mapping(cfg_path, "--stage2"))
    theirs, _ = load_stage2_state_dict(ckpt_path, ema)
    return build_from_their_state(theirs, cfg, spec, codebook_BKC), cfg, spec


def build_from_their_state(theirs: dict, cfg: PriorConfig, spec: CodeSpec, codebook_BKC: torch.Tensor | None):
    """Our RQTransformer (eval mode) holding their weights over the given code vectors."""
    from ..models.rq_transformer import RQTransformer

    model = RQTransformer(cfg, spec, codebook_BKC)
    state = convert_state_dict(theirs, model.state_dict())
    state["codebook"] = model.codebook
    model.load_state_dict(state)
    return model.eval()
