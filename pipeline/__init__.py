"""Tessera: autoregressive image generation over discrete tokens (RQ and DQ families)."""

__version__ = "0.1.0"
