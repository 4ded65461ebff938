"""The engine's latent cache: one preallocated slot per running request.

Per token and layer it holds what MLA caches (nanoseek.model.attention.CacheView: the normalised latent
and the rotated rope key, kv_lora_rank + qk_rope_head_dim values; DeepSeek-V2 section 2.1), for
`num_slots` sequences of up to `max_len` tokens; each stream the model's cache_layout names (a V3.2 model
adds "index_key", its indexer key per token and layer) is one such store. A request owns one slot from
admission to its end; rolling back after a rejected speculative draft is just a smaller start position.

The model reaches it through the CacheView interface only (positions, write, read, the mask), so a
different storage layout changes this file and the engine, not the model. On top of the reference
LatentCache it adds what the engine's hot path needs: rows whose slots form one contiguous range are read
as a view instead of a gather, and `kernel_cache` describes the layout to the C++ decode block of
nanoseek.infer.fast.
"""

from __future__ import annotations

import torch

from nanoseek.model.attention import LatentCache, LatentCacheView


class SlotCache(LatentCache):
    """[layers, num_slots, max_len, W] per stream; `view(slots, start_pos, n_new)` opens one forward on it."""

    @classmethod
    def for_model(cls, model: torch.nn.Module, num_slots: int, max_len: int, dtype: torch.dtype,
                  device: torch.device | str) -> "SlotCache":
        n_layers, widths = model.cache_layout()
        return cls(n_layers, num_slots, max_len, widths, dtype, device)

    @property
    def num_slots(self) -> int:
        return self.rows

    def view(self, slots: torch.Tensor, start_pos: torch.Tensor, n_new: int) -> "SlotView":
        return SlotView(self, slots, start_pos, n_new)


class SlotView(LatentCacheView):
    def __init__(self, cache: SlotCache, slots: torch.Tensor, start_pos: torch.Tensor, n_new: int):
        super().__init__(cache, slots, start_pos, n_new)
        s0 = self._slot_list[0]
        # Slots s, s+1, ... are read through a view instead of a gather.
        self.first_slot = s0 if self._slot_list == list(range(s0, s0 + len(self._slot_list))) else None
        self._kernel_index = None

    def read(self, layer: int, name: str) -> torch.Tensor:
        store = self.cache.data[name][layer]
        if self.first_slot is not None:
            return store[self.first_slot: self.first_slot + len(self._slot_list), : self.kv_len]
        return store[:, : self.kv_len].index_select(0, self.slots)

    def kernel_cache(self, layer: int, n_heads: int):
        """(this layer's latent store, the batch's CacheIndex) for the C++ decode block, or None when the
        kernels cannot read this cache (they read and write fp32 on the CPU only)."""
        store = self.cache.data["latent"]
        if store.dtype != torch.float32 or not store.is_cpu:
            return None
        if self._kernel_index is None:
            from nanoseek.infer.fast import kernels

            self._kernel_index = kernels.cache_index(self.slots, self.positions, self.first_slot, self.kv_len,
                                                     self.score_bias(n_heads))
        return store[layer], self._kernel_index
