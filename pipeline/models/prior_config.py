"""The prior config section (RQ-Transformer / DQ-Transformer), next to the prior models as
`TokenizerConfig` is next to the tokenizers. The prior models and their presets extend it."""
from __future__ import annotations

from dataclasses import dataclass

from ..configschema import option


@dataclass
class PriorConfig:
    preset: str = option("", "prior preset name (e.g. RQ-1.4B, DQ-base); empty: the demo size")
    dropout: float = option(0.1, "residual dropout", ge=0.0, le=1.0)
    class_dropout: float = option(0.1, "label dropout for classifier-free guidance", ge=0.0, le=1.0)
