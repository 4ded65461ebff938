"""Inference: the batched engine (continuous batching, MTP speculation) over its latent cache (cache.py),
sampling, and `generate`; fast/ holds the CPU decode transform the engine applies (`fast.accelerate`)
and its C++ kernels. The `nanoseek generate` and `nanoseek chat` commands live beside them."""

from nanoseek.infer.engine import Completion, Engine, EngineError, QueueFull, Request
from nanoseek.infer.generate import generate
from nanoseek.infer.sampling import SamplingError, SamplingParams

__all__ = ["Completion", "Engine", "EngineError", "QueueFull", "Request", "SamplingError", "SamplingParams",
           "generate"]
