"""Convert the authors' released RQ-VAE (kakaobrain/rq-vae-transformer) into our tokenizer
(rq_official_stages.py records it as a finished train_tokenizer stage).

    tessera import rq-official --stage1 DIR --run-dir RUN_DIR [--config BASE.yaml] [key=value ...]

DIR is one of their stage-1 folders: `model.pt` (a dict holding `state_dict`, maybe
`state_dict_ema`) and the `config.yaml` their code reads (OmegaConf-style YAML; read here with
PyYAML, applying the defaults their loader adds). The result is what `train_tokenizer` would
have written: RUN_DIR/train_tokenizer/{tokenizer.safetensors, tokenizer.json, import.json,
done.json} and RUN_DIR/config.yaml, written by the stage runner (lock, attempt.json, atomic
done.json with the train_tokenizer config hash), so `tessera status` shows the stage done and
precompute_codes (after `shard`) reads it like a trained tokenizer.

What is mapped (their name -> ours; see `module_names`):
  encoder.conv_in / down.{i}.block.{j} / down.{i}.attn.{j} / down.{i}.downsample.conv / mid.* /
  norm_out / conv_out   -> encoder.trunk.* and encoder.head.* (blocks of a level interleaved
                           res, attn, res, attn as they run; nin_shortcut -> skip; their q, k, v
                           1x1 convs stacked into our qkv; proj_out -> proj)
  decoder.*             -> decoder.* (their up[i] is our levels[L-1-i] and ups[L-1-i])
  quant_conv, post_quant_conv -> same names
  quantizer.codebooks.{d}.weight (K+1, C): the EMA codebook plus the zero padding row that
      nn.Embedding(padding_idx=K) adds; their distances only ever use the first K rows, so the
      padding row is dropped -> quantizer.embed[d] (shared codebook: one book, and the other
      depths' copies of the same module must be equal to it)
  quantizer.codebooks.{d}.cluster_size_ema (K,) -> quantizer.cluster_size[d]
  quantizer.codebooks.{d}.embed_ema (K, C)      -> quantizer.embed_sum[d]
  (our update_step = 0, initialized = True: nothing left to initialise)

The architecture is theirs layer for layer (pipeline/models/autoencoder.py) once
tokenizer.norm_groups = 32 (their GroupNorm never adapts the group count) and patch_size = 1.
Every tensor is shape-checked; the first missing, mismatching or unexpected one is named
(their key, our key, both shapes) in a CheckpointMismatch.

Stage 2 (the RQ-Transformer, `--stage2 DIR`; pipeline/importers/rq_official_prior.py) becomes a
finished train_prior stage over the imported tokenizer's codebook.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..config.root import Config, load_config
from ..config.schema import ConfigError
from ..models.autoencoder import AttnBlock
from ..models.registry import build_tokenizer
from ..runtime.errors import StageError
from ..runtime.validate import load_tensor_checkpoint, read_yaml_mapping

SOURCE = "rq-official"
MODEL_FILE, CONFIG_FILE = "model.pt", "config.yaml"
IMPORT_RECORD = "import.json"
# Their GroupNorm: always 32 groups (rqvae/models/rqvae/layers.py: Normalize).
THEIR_NORM_GROUPS = 32
# What their loader (rqvae/utils/config.py: augment_arch_defaults) and constructors
# (RQVAE.__init__, Encoder/Decoder) fill in when a key is absent; None = required.
_HPARAM_DEFAULTS = {"bottleneck_type": "rq", "embed_dim": 64, "n_embed": 512, "decay": 0.99, "loss_type": "l1",
                    "latent_loss_weight": 0.25, "restart_unused_codes": False, "shared_codebook": None,
                    "latent_shape": None, "code_shape": None}
_DDCONFIG_DEFAULTS = {"ch": None, "out_ch": None, "ch_mult": [1, 2, 4, 8], "num_res_blocks": None,
                      "attn_resolutions": None, "dropout": 0.0, "resamp_with_conv": True, "in_channels": None,
                      "resolution": None, "z_channels": None, "double_z": True, "give_pre_end": False}
# Keys of our tokenizer section that are read from their config and shape the model or its codes:
# a command-line override of one of them is refused (the weights would not fit or mean the same).
ARCH_KEYS = ("kind", "ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "patch_size", "norm_groups",
             "codebook_size", "depth", "shared_codebook")
_RECON_LOSS = {"mse": "l2", "l1": "l1"}


class CheckpointMismatch(StageError):
    """The checkpoint does not hold the model its config.yaml describes (message names the tensor)."""


# ---- their config.yaml -> our config -------------------------------------------------------
@dataclass
class Stage1Spec:
    """What their stage-1 config.yaml says, in our terms."""
    tokenizer: dict                 # our tokenizer section (TokenizerConfig field -> value)
    resolution: int                 # data.resolution
    arch: dict = field(default_factory=dict)   # their `arch` section with their defaults applied (provenance)


def _get(section: dict, key: str, defaults: dict, where: str):
    if key in section and section[key] is not None:
        return section[key]
    if defaults.get(key) is None:
        raise ConfigError(f"{where}.{key}: required by the authors' RQ-VAE and missing")
    return defaults[key]


def _uniform(value, where: str):
    """n_embed / decay may be per-depth lists in their code; ours is one value for all depths."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConfigError(f"{where}: per-depth values {list(value)} are not supported (one value for all depths)")
        return value[0]
    return value


def read_stage1_config(path: str | Path) -> Stage1Spec:
    """Their stage-1 config.yaml (full saved config with `arch:`, or the arch section alone) -> Stage1Spec."""
    path = Path(path)
    tree = read_yaml_mapping(path, "--stage1")
    arch = tree.get("arch", tree if "ddconfig" in tree else None)
    where = f"{path}: arch" if "arch" in tree else f"{path}:"
    if not isinstance(arch, dict):
        raise ConfigError(f"{path}: no `arch` section (is this a stage-1 config.yaml of rq-vae-transformer?)")
    if arch.get("type") != "rq-vae":
        raise ConfigError(f"{where}.type: {arch.get('type')!r} is not 'rq-vae' (a stage-2 config? --stage1 wants "
                          f"the RQ-VAE folder)")
    hp, dd = dict(arch.get("hparams") or {}), dict(arch.get("ddconfig") or {})
    hp = {k: _get(hp, k, _HPARAM_DEFAULTS, f"{where}.hparams") for k in _HPARAM_DEFAULTS}
    dd = {k: _get(dd, k, _DDCONFIG_DEFAULTS, f"{where}.ddconfig") for k in _DDCONFIG_DEFAULTS}
    checkpointing = bool(arch.get("checkpointing", False))

    def unsupported(key: str, why: str):
        raise ConfigError(f"{where}.{key}: {why}; Tessera's RQ tokenizer cannot express this RQ-VAE variant")

    if hp["bottleneck_type"] != "rq":
        unsupported("hparams.bottleneck_type", f"{hp['bottleneck_type']!r} (only 'rq' exists in their code)")
    if dd["double_z"]:
        unsupported("ddconfig.double_z", "true (the encoder would emit 2*z_channels; their RQ-VAE needs false)")
    if not dd["resamp_with_conv"]:
        unsupported("ddconfig.resamp_with_conv", "false (avg-pool / conv-less resampling)")
    if dd["give_pre_end"]:
        unsupported("ddconfig.give_pre_end", "true (decoder without its output layers)")
    if dd["in_channels"] != 3 or dd["out_ch"] != 3:
        unsupported("ddconfig.in_channels/out_ch", f"{dd['in_channels']}/{dd['out_ch']} (RGB only)")
    ch, ch_mult, z, res = int(dd["ch"]), [int(m) for m in dd["ch_mult"]], int(dd["z_channels"]), int(dd["resolution"])
    if hp["embed_dim"] != z:
        unsupported("hparams.embed_dim", f"{hp['embed_dim']} != ddconfig.z_channels {z} (our quant_conv keeps "
                    f"z_channels; every released checkpoint has them equal)")
    side = res // 2 ** (len(ch_mult) - 1)
    latent, code = list(hp["latent_shape"]), list(hp["code_shape"])
    if res % 2 ** (len(ch_mult) - 1) or latent != [side, side, z]:
        raise ConfigError(f"{where}.hparams.latent_shape: {latent} does not match the encoder "
                          f"(resolution {res}, {len(ch_mult) - 1} downsamplings, embed_dim {z}: {[side, side, z]})")
    if len(code) != 3 or code[:2] != latent[:2]:
        unsupported("hparams.code_shape", f"{code}: codes on a coarser grid than the latent (code_shape[:2] != "
                    f"latent_shape[:2])")
    tok = dict(kind="rq", preset="", ch=ch, ch_mult=ch_mult, num_res_blocks=int(dd["num_res_blocks"]),
               attn_resolutions=[int(r) for r in dd["attn_resolutions"]], z_channels=z, patch_size=1,
               norm_groups=THEIR_NORM_GROUPS, dropout=float(dd["dropout"]), grad_checkpointing=checkpointing,
               codebook_size=int(_uniform(hp["n_embed"], f"{where}.hparams.n_embed")), depth=int(code[2]),
               shared_codebook=bool(hp["shared_codebook"]),
               ema_decay=float(_uniform(hp["decay"], f"{where}.hparams.decay")), ema_eps=1e-5,
               beta=float(hp["latent_loss_weight"]), dead_code_threshold=1.0 if hp["restart_unused_codes"] else 0.0,
               kmeans_init=False)
    if hp["loss_type"] not in _RECON_LOSS:
        unsupported("hparams.loss_type", repr(hp["loss_type"]))
    tok["recon_loss"] = _RECON_LOSS[hp["loss_type"]]
    gan = tree.get("gan") if "arch" in tree else None
    if isinstance(gan, dict):  # their GAN/LPIPS settings, for fine-tuning the imported tokenizer
        loss, disc = gan.get("loss") or {}, (gan.get("disc") or {}).get("arch") or {}
        for theirs, ours, cast in (("disc_weight", "gan_weight", float), ("perceptual_weight", "lpips_weight", float),
                                   ("disc_start", "disc_start_step", int)):
            if loss.get(theirs) is not None:
                tok[ours] = cast(loss[theirs])
        for theirs, ours in (("num_layers", "disc_layers"), ("ndf", "disc_ndf")):
            if disc.get(theirs) is not None:
                tok[ours] = int(disc[theirs])
    return Stage1Spec(tokenizer=tok, resolution=res, arch={**arch, "hparams": hp, "ddconfig": dd})


def _override_text(key: str, value) -> str:
    # JSON is YAML for lists, ints, bools and strings; floats by repr (parse_override reads 1e-05 as a float).
    return f"{key}={value!r}" if isinstance(value, float) else f"{key}={json.dumps(value)}"


def build_run_config(spec: Stage1Spec, config: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Our Config for the imported run: BASE.yaml (default: built-in defaults), then the tokenizer
    section and data.resolution from their config.yaml, then the user's overrides (data.*, launcher.*,
    tokenizer loss keys for fine-tuning; not the architecture)."""
    overrides = list(overrides)
    imported = [_override_text(f"tokenizer.{k}", v) for k, v in spec.tokenizer.items()]
    cfg = load_config(config, [*imported, f"data.resolution={spec.resolution}", *overrides])
    changed = [k for k in ARCH_KEYS if getattr(cfg.tokenizer, k) != spec.tokenizer[k]]
    if cfg.data.resolution != spec.resolution:
        changed.insert(0, "data.resolution")
    if changed:
        key = changed[0] if changed[0].startswith("data.") else f"tokenizer.{changed[0]}"
        raise ConfigError(f"{key}: set by the checkpoint's config.yaml; remove the override (the imported weights "
                          f"fix it)")
    return cfg


# ---- their state_dict -> ours ---------------------------------------------------------------
def load_stage1_state_dict(model_pt: str | Path, ema: bool = False) -> dict[str, torch.Tensor]:
    """`state_dict` (or `state_dict_ema`) of their model.pt, tensors only, without a DDP/EMA `module.` prefix."""
    model_pt = Path(model_pt)
    ckpt = load_tensor_checkpoint(model_pt, "--stage1")
    key = "state_dict_ema" if ema else "state_dict"
    if not isinstance(ckpt, dict) or key not in ckpt:
        held = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointMismatch(f"{model_pt}: no {key!r} entry (it holds {held})"
                                 + ("; drop --ema" if ema else ""))
    state = ckpt[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointMismatch(f"{model_pt}: {key!r} is not a mapping of tensor names to tensors")
    if state and all(k.startswith("module.") for k in state):  # DDP or their ExponentialMovingAverage wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _level_names(level, ours: str, theirs: str) -> dict[str, str]:
    """One level's blocks, ours interleaved as they run (res, attn, res, attn) vs their block[j] / attn[j]."""
    out, n_res, n_attn = {}, 0, 0
    for j, block in enumerate(level.blocks):
        if isinstance(block, AttnBlock):
            out[f"{ours}.{j}"], n_attn = f"{theirs}.attn.{n_attn}", n_attn + 1
        else:
            out[f"{ours}.{j}"], n_res = f"{theirs}.block.{n_res}", n_res + 1
    return out


def module_names(model) -> dict[str, str]:
    """Our module path -> their module path, for every module that holds weights (quantizer aside)."""
    n_levels = len(model.encoder.trunk.levels)
    names = {"encoder.trunk.conv_in": "encoder.conv_in", "encoder.head.norm_out": "encoder.norm_out",
             "encoder.head.conv_out": "encoder.conv_out", "quant_conv": "quant_conv",
             "post_quant_conv": "post_quant_conv", "decoder.conv_in": "decoder.conv_in",
             "decoder.norm_out": "decoder.norm_out", "decoder.conv_out": "decoder.conv_out"}
    for ours, theirs in (("encoder.head.mid", "encoder.mid"), ("decoder.mid", "decoder.mid")):
        names.update({f"{ours}.blocks.0": f"{theirs}.block_1", f"{ours}.blocks.1": f"{theirs}.attn_1",
                      f"{ours}.blocks.2": f"{theirs}.block_2"})
    for i, level in enumerate(model.encoder.trunk.levels):
        names.update(_level_names(level, f"encoder.trunk.levels.{i}.blocks", f"encoder.down.{i}"))
    for i in range(len(model.encoder.trunk.downs)):
        names[f"encoder.trunk.downs.{i}.conv"] = f"encoder.down.{i}.downsample.conv"
    for k, level in enumerate(model.decoder.levels):  # ours run top-down; their up[] is indexed by level
        names.update(_level_names(level, f"decoder.levels.{k}.blocks", f"decoder.up.{n_levels - 1 - k}"))
    for k in range(len(model.decoder.ups)):
        names[f"decoder.ups.{k}.conv"] = f"decoder.up.{n_levels - 1 - k}.upsample.conv"
    return names


# Children of a ResnetBlock / AttnBlock whose names differ (qkv is three of theirs, stacked).
_CHILD_NAMES = {"skip": ["nin_shortcut"], "proj": ["proj_out"], "qkv": ["q", "k", "v"]}


@dataclass
class _Source:
    """Where one of our tensors comes from: their keys, the shape each must have, how they combine."""
    theirs: list[str]
    shapes: list[tuple]
    combine: Callable[[list[torch.Tensor]], torch.Tensor]


def _first(ts: list[torch.Tensor]) -> torch.Tensor:
    return ts[0]


def _sources(model, our_shapes: dict[str, tuple]) -> dict[str, _Source | None]:
    """Our state_dict key -> its _Source (None: not in their checkpoint, set by us)."""
    names, q = module_names(model), model.quantizer
    out: dict[str, _Source | None] = {}
    for key, shape in our_shapes.items():
        module, _, leaf = key.rpartition(".")
        if module == "quantizer":
            out[key] = _quantizer_source(leaf, shape, q)
            continue
        if module in names:
            out[key] = _Source([f"{names[module]}.{leaf}"], [shape], _first)
            continue
        parent, _, child = module.rpartition(".")
        if parent not in names:
            raise CheckpointMismatch(f"internal: no mapping of our tensor {key!r} to the authors' layout")
        theirs = [f"{names[parent]}.{c}.{leaf}" for c in _CHILD_NAMES.get(child, [child])]
        if len(theirs) == 1:
            out[key] = _Source(theirs, [shape], _first)
        else:  # qkv: three (C, ...) tensors stacked along the output channels
            part = (shape[0] // len(theirs), *shape[1:])
            out[key] = _Source(theirs, [part] * len(theirs), lambda ts: torch.cat(ts, 0))
    return out


def _quantizer_source(leaf: str, shape: tuple, q) -> _Source | None:
    if leaf in ("update_step", "initialized"):
        return None
    books, K = shape[0], q.codebook_size
    their_leaf, per_book = {"embed": ("weight", (K + 1, *shape[2:])), "cluster_size": ("cluster_size_ema", (K,)),
                            "embed_sum": ("embed_ema", (K, *shape[2:]))}[leaf]
    # Shared: their ModuleList holds the same module at every depth, so each depth's copy is saved;
    # all are read (and must be equal), the first is the book.
    keys = [f"quantizer.codebooks.{d}.{their_leaf}" for d in range(q.depth)]
    drop_pad = (lambda t: t[:-1]) if leaf == "embed" else (lambda t: t)

    def combine(ts: list[torch.Tensor]) -> torch.Tensor:
        if books == 1 and q.depth > 1:
            for d in range(1, len(ts)):
                if not torch.equal(ts[d], ts[0]):
                    raise CheckpointMismatch(f"{keys[d]} differs from {keys[0]}, but config.yaml says "
                                             f"shared_codebook: true (one module at every depth)")
            ts = ts[:1]
        return torch.stack([drop_pad(t) for t in ts])

    return _Source(keys, [per_book] * len(keys), combine)


def convert_stage1_state_dict(state: dict[str, torch.Tensor], model, where: str = "checkpoint") -> dict:
    """Their RQ-VAE state_dict -> `model`'s (an RQTokenizer built from the imported config).

    CheckpointMismatch names the first problem in our module order: a missing tensor, a shape that
    differs (their key, our key, both shapes), then the first of their tensors nothing used."""
    ours = model.state_dict()
    sources = _sources(model, {k: tuple(v.shape) for k, v in ours.items()})
    used: set[str] = set()
    converted = {}
    for key, src in sources.items():
        if src is None:
            continue
        tensors = []
        for their_key, want in zip(src.theirs, src.shapes):
            if their_key not in state:
                raise CheckpointMismatch(f"{where}: missing tensor {their_key!r} (for our {key!r}, expected shape "
                                         f"{list(want)}); the checkpoint is not the RQ-VAE its config.yaml describes")
            got = tuple(state[their_key].shape)
            if got != tuple(want):
                raise CheckpointMismatch(f"{where}: tensor {their_key!r} has shape {list(got)}, but our {key!r} "
                                         f"needs {list(want)} for it (the config.yaml and the weights disagree)")
            tensors.append(state[their_key])
            used.add(their_key)
        converted[key] = src.combine(tensors).to(ours[key].dtype)
    unexpected = [k for k in state if k not in used]
    if unexpected:
        k = unexpected[0]
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointMismatch(f"{where}: unexpected tensor {k!r} (shape {list(state[k].shape)}){more}: the "
                                 f"RQ-VAE described by config.yaml has no such weight")
    converted["quantizer.update_step"] = torch.zeros_like(ours["quantizer.update_step"])
    converted["quantizer.initialized"] = torch.ones_like(ours["quantizer.initialized"])
    return converted


def convert_stage1(state: dict[str, torch.Tensor], spec: Stage1Spec, cfg=None, where: str = "checkpoint"):
    """Build our RQTokenizer for `spec` (or the Config's tokenizer section) and load their weights (eval mode)."""
    tok_cfg = cfg.tokenizer if cfg is not None else _tokenizer_config(spec)
    model = build_tokenizer(tok_cfg, spec.resolution)
    model.load_state_dict(convert_stage1_state_dict(state, model, where), strict=True)
    return model.eval()


def _tokenizer_config(spec: Stage1Spec):
    from ..config.schema import build_section
    from ..models.tokenizer_config import TokenizerConfig

    return build_section(TokenizerConfig, spec.tokenizer, "tokenizer")


def stage1_files(stage1: str | Path) -> tuple[Path, Path]:
    """(model.pt, config.yaml) of a stage-1 folder (a path to model.pt itself is accepted too)."""
    stage1 = Path(stage1)
    folder = stage1.parent if stage1.is_file() else stage1
    model_pt = stage1 if stage1.is_file() else folder / MODEL_FILE
    for path in (model_pt, folder / CONFIG_FILE):
        if not path.is_file():
            raise ConfigError(f"--stage1: {path} not found (the folder of their RQ-VAE holds {MODEL_FILE} and "
                              f"{CONFIG_FILE})")
    return model_pt, folder / CONFIG_FILE
