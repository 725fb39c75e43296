"""The prior config section (RQ-Transformer / DQ-Transformer) and its named presets, next to the
prior models as `TokenizerConfig` is next to the tokenizers.

A preset is a set of field values; `prior.preset: NAME` applies them first and keys written
beside it override. The paper presets reproduce the authors' parameter counts (tested):
RQ 480M / 821M / 1.4B / 3.8B at K=16384 and 1000 classes, DQ base ~308M / large ~608M at K=1024.
`pipeline.models.registry.build_prior(cfg, spec)` builds the model for a tokenizer's `CodeSpec`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config.schema import ConfigError, did_you_mean, option


@dataclass
class PriorConfig:
    preset: str = option("", "named preset applied before the keys written beside it (see PRIOR_PRESETS)",
                         affects=("train_prior",))
    kind: str = option("rq", "rq = RQ-Transformer (spatial + depth); dq = DQ-Transformer (position + content)",
                       choices=("rq", "dq"), affects=("train_prior",))
    embed_dim: int = option(256, "model width E", ge=8, affects=("train_prior",))
    n_head: int = option(8, "attention heads (embed_dim must divide by it)", ge=1, affects=("train_prior",))
    spatial_layers: int = option(4, "rq: spatial transformer layers (over the H*W positions)", ge=1,
                                 affects=("train_prior",))
    depth_layers: int = option(2, "rq: depth transformer layers (over the D codes of a position); 0 with "
                                    "depth-1 codes = a plain raster transformer (the paper's speed baseline)", ge=0,
                               affects=("train_prior",))
    position_layers: int = option(2, "dq: position transformer layers (predict the next position)", ge=1,
                                  affects=("train_prior",))
    content_layers: int = option(4, "dq: content transformer layers (predict the code at that position)", ge=1,
                                 affects=("train_prior",))
    mlp_ratio: float = option(4.0, "MLP hidden width / embed_dim", gt=0.0, affects=("train_prior",))
    bias: bool = option(True, "biases in the attention and MLP Linears (the authors': true)", affects=("train_prior",))
    norm: str = option("layernorm", "block normalisation (layernorm: the authors')", choices=("layernorm", "rmsnorm"),
                       affects=("train_prior",))
    mlp: str = option("gelu", "block MLP (gelu 4x: the authors')", choices=("gelu", "swiglu"), affects=("train_prior",))
    dropout: float = option(0.1, "residual dropout (after attention projection and MLP)", ge=0.0, le=1.0,
                            affects=("train_prior",))
    attn_dropout: float = option(0.0, "dropout on attention probabilities", ge=0.0, le=1.0, affects=("train_prior",))
    embed_dropout: float = option(0.0, "dropout on the summed input embeddings", ge=0.0, le=1.0,
                                  affects=("train_prior",))
    input_embedding: str = option("codebook", "rq: codebook = the frozen tokenizer code vectors through learned "
                                              "Linears (the authors' released models); learned = a learned token "
                                              "table shared by the depths", choices=("codebook", "learned"),
                                  affects=("train_prior",))
    num_classes: int = option(1000, "class-conditional on this many classes (+1 null class for guidance); "
                                    "0 = unconditional (a learned start token)", ge=0, affects=("train_prior",))
    class_dropout: float = option(0.1, "label dropout for classifier-free guidance (replace the class by the "
                                       "null class with this probability in training)", ge=0.0, le=1.0,
                                  affects=("train_prior",))
    grad_checkpointing: bool = option(False, "recompute each block's activations in backward (saves memory)",
                                      affects=("train_prior",))
    use_flash_attn: bool = option(True, "use the flash-attn package when installed and the inputs are CUDA "
                                        "fp16/bf16 (otherwise PyTorch SDPA)", affects=("train_prior",))

    @classmethod
    def preset_values(cls, name: str, path: str) -> dict:
        key = name.lower()
        if key not in PRIOR_PRESETS:
            raise ConfigError(f"{path}: unknown prior preset {name!r}.{did_you_mean(key, PRIOR_PRESETS)} "
                              f"Available: {', '.join(sorted(PRIOR_PRESETS))}.")
        return PRIOR_PRESETS[key]

    def validate(self, path: str) -> None:
        if self.embed_dim % self.n_head:
            raise ConfigError(f"{path}.n_head: embed_dim {self.embed_dim} is not divisible by n_head {self.n_head}.")
        if self.kind == "dq" and self.input_embedding != "codebook":
            raise ConfigError(f"{path}.input_embedding: applies to rq only (dq always learns its content table); "
                              f"leave it at 'codebook'.")


@dataclass(frozen=True)
class CodeSpec:
    """What a prior needs to know about its tokenizer's codes."""
    kind: str            # rq | dq
    codebook_size: int   # K
    code_dim: int        # codebook vector dimension C
    height: int          # rq: code grid H; dq: coarse grid side
    width: int           # rq: code grid W; dq: coarse grid side
    depth: int = 1       # rq: codes per position D; dq: 1

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "CodeSpec":
        q = tokenizer.quantizer
        if hasattr(tokenizer, "coarse_side"):
            return cls("dq", q.codebook_size, q.dim, tokenizer.coarse_side, tokenizer.coarse_side, 1)
        H, W, D = tokenizer.code_shape
        return cls("rq", q.codebook_size, q.dim, H, W, D)


_RQ = dict(kind="rq", n_head=24, embed_dim=1536, dropout=0.1, attn_dropout=0.0, embed_dropout=0.0,
           input_embedding="codebook", num_classes=1000, grad_checkpointing=True)
# The authors' DQ-Transformer (configs/stage2/class_imagenet_p6c18.yml): 6 position + 18 content
# layers, width 1024, 8 heads, dropout 0.1 on embeddings, attention and residuals.
_DQ = dict(kind="dq", embed_dim=1024, n_head=8, position_layers=6, content_layers=18, dropout=0.1,
           attn_dropout=0.1, embed_dropout=0.1, num_classes=1000, grad_checkpointing=True)
_DEMO = dict(embed_dim=128, n_head=4, dropout=0.0, attn_dropout=0.0, embed_dropout=0.0, grad_checkpointing=False)

PRIOR_PRESETS: dict[str, dict] = {
    # kakaobrain/rq-vae-transformer configs/imagenet256/stage2/in256-rqtransformer-8x8x4-*.yaml
    "rq-480m": dict(_RQ, spatial_layers=12, depth_layers=4),
    "rq-821m": dict(_RQ, spatial_layers=24, depth_layers=4),
    "rq-1.4b": dict(_RQ, spatial_layers=42, depth_layers=6),
    "rq-3.8b": dict(_RQ, embed_dim=2560, n_head=40, spatial_layers=42, depth_layers=6),
    # configs/ffhq/stage2/ffhq256-rqtransformer-8x8x4-350M.yaml (unconditional)
    "rq-ffhq-355m": dict(_RQ, embed_dim=1024, n_head=16, spatial_layers=24, depth_layers=4, num_classes=0),
    "dq-base": dict(_DQ),
    "dq-large": dict(_DQ, embed_dim=1280, n_head=16, position_layers=6, content_layers=24),
    "dq-1.4b": dict(_DQ, embed_dim=1536, n_head=24, position_layers=12, content_layers=36),
    # CPU demos: seconds per hundred steps on 2 cores.
    "rq-demo": dict(_DEMO, kind="rq", spatial_layers=4, depth_layers=2, input_embedding="codebook"),
    "dq-demo": dict(_DEMO, kind="dq", position_layers=2, content_layers=4),
}
