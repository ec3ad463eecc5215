"""Cache plumbing: build transformers caches from plain (K, V) tensors, window and length checks.

A prefix is a pair of lists `keys[l], values[l]`, each `[1, kv_heads, L, head_dim]`, one per layer.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

Prefix = tuple[list[torch.Tensor], list[torch.Tensor]]


def build_cache(model, keys: list[torch.Tensor] = (), values: list[torch.Tensor] = (), batch: int = 1) -> DynamicCache:
    """A fresh DynamicCache holding the given prefix (expanded to `batch` rows; empty when no prefix).

    Sliding-window layers record their whole past instead of keeping only the last window - 1
    entries, so every position's keys/values stay available to slice; the model's mask still hides
    what the window hides.
    """
    cache = DynamicCache(config=model.config)
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False):
            layer.activate_past_recording()
    if not keys or keys[0].shape[-2] == 0:
        return cache
    for layer, k, v in zip(cache.layers, keys, values):
        if batch != k.shape[0]:
            k, v = k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)
        layer.update(k, v)
    return cache


def cache_tensors(cache: DynamicCache) -> Prefix:
    return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]


def sliding_window(config) -> int | None:
    """Smallest attention window of any layer, or None when every layer sees the whole past."""
    windows = []
    if getattr(config, "sliding_window", None):
        types = getattr(config, "layer_types", None)
        if types is None or any("sliding" in t for t in types):
            windows.append(int(config.sliding_window))
    if config.model_type == "gpt_neo" and "local" in getattr(config, "attention_layers", []):
        windows.append(int(config.window_size))
    return min(windows) if windows else None


def max_positions(config) -> int | None:
    """Longest sequence the model's position scheme supports (None: no fixed limit, e.g. ALiBi)."""
    for attr in ("max_position_embeddings", "n_positions"):
        if getattr(config, attr, None):
            return int(getattr(config, attr))
    return None


def supports_position_ids(model) -> bool:
    """Whether the model lets the caller set positions (false for ALiBi models such as BLOOM)."""
    import inspect

    return "position_ids" in inspect.signature(model.forward).parameters and model.config.model_type != "bloom"
