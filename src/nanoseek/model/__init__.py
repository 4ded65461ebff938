"""The DeepSeek-V3 / V3.2 model: MLA attention (sparse, with the V3.2 indexer), DeepSeekMoE, MTP. Knows
nothing of training, inference or serving."""

from .attention import MLA, CacheView, LatentCache
from .dsa import Indexer, SparseMLA
from .moe import MoE, Router
from .transformer import MTPModule, TrainOutput, Transformer

__all__ = ["MLA", "SparseMLA", "Indexer", "CacheView", "LatentCache", "MoE", "Router", "MTPModule", "TrainOutput",
           "Transformer"]
