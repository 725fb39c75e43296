"""Build models from their config sections: `build_tokenizer(cfg, resolution)` and
`build_prior(cfg, spec)` (a prior for the codes a tokenizer makes; `CodeSpec.from_tokenizer`)."""
from __future__ import annotations

from typing import Callable

from ..config.schema import ConfigError
from .dq import DQTokenizer
from .prior_config import CodeSpec, PriorConfig
from .tokenizer_config import TokenizerConfig
from .tokenizers import RQTokenizer, Tokenizer

# vq is rq with depth 1 (validated by TokenizerConfig), so both names share one constructor.
TOKENIZER_BUILDERS: dict[str, Callable[[TokenizerConfig, int], Tokenizer]] = {
    "vq": RQTokenizer,
    "rq": RQTokenizer,
    "dq": DQTokenizer,
}


def build_tokenizer(cfg: TokenizerConfig, resolution: int) -> Tokenizer:
    if cfg.kind not in TOKENIZER_BUILDERS:
        raise ConfigError(f"tokenizer.kind: unknown kind {cfg.kind!r}; choose one of {sorted(TOKENIZER_BUILDERS)}")
    f = cfg.downsample_factor
    if resolution % f or (cfg.kind == "dq" and (resolution // f) < 1):
        raise ConfigError(f"tokenizer.ch_mult: resolution {resolution} is not divisible by the downsampling "
                          f"factor {f} (patch_size x 2 ** (len(ch_mult) - 1))")
    return TOKENIZER_BUILDERS[cfg.kind](cfg, resolution)


def _rq_prior(cfg: PriorConfig, spec: CodeSpec, codebook=None):
    from .rq_transformer import RQTransformer

    return RQTransformer(cfg, spec, codebook)


def _dq_prior(cfg: PriorConfig, spec: CodeSpec, codebook=None):
    from .dq_transformer import DQTransformer

    return DQTransformer(cfg, spec)


PRIOR_BUILDERS: dict[str, Callable] = {"rq": _rq_prior, "dq": _dq_prior}


def build_prior(cfg: PriorConfig, spec: CodeSpec, codebook=None):
    """The prior for `spec`'s codes. RQ with input_embedding=codebook takes the tokenizer's code
    vectors ((K, C) or (books, K, C)); without them they start at zero (set_codebook later)."""
    if cfg.kind != spec.kind:
        raise ConfigError(f"prior.kind: a {cfg.kind!r} prior cannot model {spec.kind!r} codes; set prior.kind: "
                          f"{spec.kind} (and a {spec.kind}-* preset)")
    return PRIOR_BUILDERS[cfg.kind](cfg, spec, codebook)
