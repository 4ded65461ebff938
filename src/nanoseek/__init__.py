"""nanoseek: DeepSeek-V3 / R1 at any scale. The public API: load, save, generate, the config and the model."""

from .config import ConfigError, ModelConfig, preset
from .hf import CheckpointError, load, save
from .model import Transformer

__version__ = "0.1.0"


def generate(model, prompts, max_new_tokens, temperature=0.0, top_p=1.0, stop_token_ids=None, seed=None):
    """Generate continuations for token-id prompts; returns the new token ids of each (greedy at temperature 0)."""
    from .infer.generate import generate as _generate  # the engine is imported only when used

    return _generate(model, prompts, max_new_tokens, temperature=temperature, top_p=top_p,
                     stop_token_ids=stop_token_ids, seed=seed)


__all__ = ["ModelConfig", "ConfigError", "CheckpointError", "Transformer", "preset", "load", "save", "generate"]
