"""Inference: the batched engine (latent cache, continuous batching, MTP speculation), sampling, and
`generate`; the `nanoseek generate` and `nanoseek chat` commands live beside them."""

from nanoseek.infer.engine import Completion, Engine, EngineError, QueueFull, Request
from nanoseek.infer.generate import generate
from nanoseek.infer.sampling import SamplingError, SamplingParams

__all__ = ["Completion", "Engine", "EngineError", "QueueFull", "Request", "SamplingError", "SamplingParams",
           "generate"]
