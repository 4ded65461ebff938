"""The DeepSeek-V3 model: MLA attention, DeepSeekMoE, MTP. Knows nothing of training, inference or serving."""

from .attention import MLA, CacheView, LatentCache
from .moe import MoE, Router
from .transformer import MTPModule, TrainOutput, Transformer

__all__ = ["MLA", "CacheView", "LatentCache", "MoE", "Router", "MTPModule", "TrainOutput", "Transformer"]
