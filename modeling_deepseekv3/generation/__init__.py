"""Generation beyond transformers' own: MTP speculative decoding (``generate(use_mtp=True)``)."""

from .mtp import MTPGenerateOutput, MTPStats

__all__ = ["MTPGenerateOutput", "MTPStats"]
