"""Build a tokenizer from its config section: `build_tokenizer(cfg, resolution)`."""
from __future__ import annotations

from typing import Callable

from ..configschema import ConfigError
from .dq import DQTokenizer
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
