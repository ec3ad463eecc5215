"""Cache plumbing: build transformers caches from plain (K, V) tensors, window and length checks.

A prefix is a pair of lists `keys[l], values[l]`, each `[1, kv_heads, L, head_dim]`, one per layer.
"""
from __future__ import annotations

import functools
import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import transformers
from packaging.version import Version
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

Prefix = tuple[list[torch.Tensor], list[torch.Tensor]]


class DemonstrationsTooLong(ValueError):
    """The demonstrations exceed a length limit of the model (its positions, or the sliding window a method needs
    them within); fewer or shorter demonstrations would fit."""


# transformers 5.24 renamed the forward keyword (and the output field) of the past cache from `past_key_values` to
# `cache`. A model of an earlier 5.x swallows an unknown `cache=` into its **kwargs and runs without the past, so
# every call passes the past under the name the model's own forward declares.
_RENAMED = Version(transformers.__version__) >= Version("5.24.0.dev0")


@functools.lru_cache(maxsize=None)
def _cache_keyword(cls: type) -> str:
    params = inspect.signature(cls.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return "cache" if _RENAMED else "past_key_values"       # a forward of **kwargs only: the library's own name


def cache_kwarg(model, cache: Cache | None) -> dict:
    """`model(ids, **cache_kwarg(model, cache))`: the past cache under the keyword this model's forward takes."""
    return {_cache_keyword(type(model)): cache}


def output_cache(out) -> Cache:
    """The cache a forward with use_cache=True returned (`out.cache`, or `out.past_key_values` before 5.24)."""
    for name in ("cache", "past_key_values"):
        if out.get(name) is not None:
            return out[name]
    raise RuntimeError(f"{type(out).__name__} holds no cache although use_cache=True was asked for: the model's "
                       "forward does not return one, and deepthink cannot read the demonstrations' keys and values")


def encode(model, ids: torch.Tensor, cache: Cache | None = None, **kwargs) -> Prefix:
    """Keys/values of every position the model holds after running `ids` (after `cache`'s past, else alone)."""
    out = model(ids, **cache_kwarg(model, build_cache(model) if cache is None else cache), use_cache=True, **kwargs)
    return cache_tensors(output_cache(out))


def require_sliding_support() -> None:
    """Sliding-window layers (Gemma-3, Mistral, ...) keep their whole past only from transformers 5.24 on: before,
    the model masks as if the cache held the last window - 1 positions and scoring past the window breaks."""
    if not _RENAMED:
        raise RuntimeError(f"this model has sliding-window attention layers, which deepthink supports from "
                           f"transformers 5.24 on (installed: {transformers.__version__}); "
                           "upgrade with: pip install -U 'transformers>=5.24,<6'")


def build_cache(model, keys: list[torch.Tensor] = (), values: list[torch.Tensor] = (), batch: int = 1) -> DynamicCache:
    """A fresh DynamicCache holding the given prefix (expanded to `batch` rows; empty when no prefix).

    Sliding-window layers record their whole past instead of keeping only the last window - 1
    entries, so every position's keys/values stay available to slice; the model's mask still hides
    what the window hides.
    """
    cache = DynamicCache(config=model.config)
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False):
            require_sliding_support()
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


# --- A prefix shared by every row of a batch, held once --------------------------------------------------------
#
# Expanding the prefix over a batch (`build_cache(..., batch=B)`) makes the cache concatenate it with each row's
# new keys: B copies of L positions in every layer, all alive until the forward ends. Instead the prefix stays at
# batch 1 and the cache holds only each row's own keys/values. Attention runs twice per layer - the queries of
# every row against the prefix in one call (the batch folded into the query rows), then each row's queries
# against its own keys - and the two softmax parts are merged by their log-sum-exp:
#
#     lse = logaddexp(lse_p, lse_r),   out = exp(lse_p - lse) out_p + exp(lse_r - lse) out_r
#
# Masks come from true positions, not cache indices: a row's own keys may start with a right-padded past (its
# context, when its choices are scored), so the row's new tokens sit at different positions in different rows.
# Key j is visible to query i when pos(j) <= pos(i), j is not padding and, on sliding-window layers,
# pos(i) - pos(j) < window. This serves the models that route attention through transformers'
# AttentionInterface (llama, qwen2, mistral, gemma3, gpt2, opt, ...); gpt_neo and bloom keep the expanded path.

SHARED_ATTENTION = "deepthink_shared_prefix"
_NEG_INF = float("-inf")


@dataclass
class Shared:
    """What every layer's attention needs besides q, k, v; passed through the model's forward kwargs."""

    prefix: Prefix                      # batch 1, per layer [1, kv_heads, L, head_dim], positions 0..L-1
    q_pos: torch.Tensor                 # (R, T) positions of the rows' new tokens
    k_pos: torch.Tensor                 # (R, S) positions of the rows' own keys: their past, then the new tokens
    k_valid: torch.Tensor | None        # (R, S) False at padding inside the past; None when nothing is padding
    dtype: torch.dtype                  # of the queries (and so of the additive masks)
    memo: dict = field(default_factory=dict)   # masks per window size, built by the first layer that needs them

    @property
    def length(self) -> int:
        return self.prefix[0][0].shape[-2] if self.prefix[0] else 0

    def masks(self, window: int | None, g: int, device):
        """(prefix mask for the folded query rows (1, 1, R*g*T, L) or None, its fully masked rows or None,
        own mask (R, 1, T, S) or None for plain causal). Additive float masks, on the layer's device."""
        key = (window, g, str(device))
        if key not in self.memo:
            self.memo[key] = self._masks(window, g, device)
        return self.memo[key]

    def _masks(self, window, g, device):
        R, T = self.q_pos.shape
        L, q = self.length, self.q_pos[:, :, None].to(device)                    # (R, T, 1)
        prefix_mask = dead = own = None
        if window is not None and L and int(self.q_pos.max()) >= window:        # the window reaches into the prefix
            allowed = q - torch.arange(L, device=q.device) < window               # (R, T, L)
            dead = ~allowed.any(-1, keepdim=True)                                 # (R, T, 1)

            def fold(x):                     # (R, T, n) -> (1, 1, R*g*T, n), rows ordered as the folded queries
                return x[:, None].expand(R, g, T, x.shape[-1]).reshape(1, 1, R * g * T, x.shape[-1])
            prefix_mask = fold(_additive(allowed, self.dtype))
            dead = fold(dead)[..., 0] if bool(dead.any()) else None
        k = self.k_pos[:, None, :].to(device)                                     # (R, 1, S)
        windowed = window is not None and int(self.q_pos.max() - self.k_pos.min()) >= window
        if self.k_valid is not None or windowed:
            allowed = k <= q
            if self.k_valid is not None:
                allowed = allowed & self.k_valid[:, None, :].to(device)
            if windowed:
                allowed = allowed & (q - k < window)
            own = _additive(allowed, self.dtype)[:, None]
        return prefix_mask, dead, own


def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, _NEG_INF)


class SuffixLayer(DynamicLayer):
    """A row's own keys/values: an optional past (its context) and the new tokens (kept only if `keep`)."""

    is_sliding = False   # windows are applied by the shared-prefix attention from true positions

    def __init__(self, offset: int, keep: bool = True, past: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.offset, self.keep = offset, keep
        if past is not None:
            self.lazy_initialization(*past)
            self.keys, self.values = past

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.keep and not self.is_initialized:   # nothing reads them after this forward
            return key_states, value_states
        return super().update(key_states, value_states)

    def get_seq_length(self) -> int:
        return self.offset + super().get_seq_length()


def supports_shared_prefix(model) -> bool:
    """Whether the shared-prefix attention can serve this model (AttentionInterface-based, no logit soft-cap)."""
    cfg = model.config
    return (bool(getattr(model, "_supports_attention_backend", False))
            and not getattr(cfg, "attn_logit_softcapping", None)
            and getattr(cfg, "is_causal", True))


@contextmanager
def shared_attention(model):
    """Route the model's attention through the shared-prefix function for the duration of the block."""
    _register()
    cfg = model.config
    old = cfg._attn_implementation
    cfg._attn_implementation = SHARED_ATTENTION
    try:
        yield
    finally:
        cfg._attn_implementation = old


def shared_forward(model, ids: torch.Tensor, prefix: Prefix, past: Prefix | None = None,
                   past_lengths: torch.Tensor | None = None, use_cache: bool = False):
    """The base model on `ids` (R, T), every row after the same `prefix` (batch 1, never expanded).

    past: each row's own earlier keys/values (per layer (R, kv_heads, P, head_dim), right-padded), of
    `past_lengths` (R,) real positions; the new tokens continue right after them. With use_cache, `output_cache(out)`
    holds each row's own keys/values (past, then new), not the prefix.
    """
    R, T = ids.shape
    L = prefix[0][0].shape[-2] if prefix[0] else 0
    new = torch.arange(T, device=ids.device)
    if past is None:
        q_pos = (L + new).expand(R, T)
        k_pos, valid = q_pos, None
    else:
        P = past[0][0].shape[-2]
        q_pos = L + past_lengths[:, None] + new                                   # (R, T)
        old = torch.arange(P, device=ids.device)
        k_pos = torch.cat([(L + old).expand(R, P), q_pos], 1)                    # (R, P + T)
        valid = torch.cat([old < past_lengths[:, None], torch.ones_like(q_pos, dtype=torch.bool)], 1)
    shared = Shared(prefix, q_pos, k_pos, valid, model.get_input_embeddings().weight.dtype)
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    pasts = zip(*past) if past is not None else [None] * n_layers
    cache = Cache(layers=[SuffixLayer(L, use_cache, p) for p in pasts])
    with shared_attention(model):
        return model.base_model(ids, position_ids=q_pos, **cache_kwarg(model.base_model, cache), use_cache=use_cache,
                                deepthink_shared=shared)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
            causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns each query row's log-sum-exp: (out, lse). Fully masked rows give
    out 0 (their lse is set by the caller)."""
    if q.device.type == "cpu" and _CPU_FLASH is not None:
        return _CPU_FLASH(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale                 # (b, h, n, m)
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), _NEG_INF)
    if mask is not None:
        s = s + mask
    lse = s.logsumexp(-1)
    p = torch.exp(s - lse[..., None].clamp_min(torch.finfo(s.dtype).min)).to(v.dtype)
    return torch.matmul(p, v), lse


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def shared_prefix_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                            sliding_window: int | None = None, deepthink_shared: Shared | None = None, **kwargs):
    """Attention of (R, hq, T, d) queries over the shared prefix and over the rows' own (R, hkv, S, d) keys.

    Registered with transformers' AttentionInterface; the prefix and positions arrive through the forward's
    kwargs (kv.shared_forward), the layer's window as `sliding_window` (None on full-attention layers).
    """
    if deepthink_shared is None:
        raise RuntimeError("shared-prefix attention needs deepthink_shared=...: call it through kv.shared_forward")
    sh = deepthink_shared
    R, hq, T, d = query.shape
    hk, S = key.shape[1], key.shape[-2]
    g = hq // hk
    scale = scaling if scaling is not None else d ** -0.5
    prefix_mask, dead, own_mask = sh.masks(sliding_window, g, query.device)
    # each row against its own keys (the GQA repeat copies only its S positions)
    if g > 1:
        key = key[:, :, None].expand(R, hk, g, S, d).reshape(R, hq, S, d)
        value = value[:, :, None].expand(R, hk, g, S, d).reshape(R, hq, S, d)
    out, lse = _attend(query, key, value, own_mask, scale, causal=own_mask is None)   # never empty: sees itself
    if not sh.length:
        return out.transpose(1, 2).contiguous(), None
    # every row's queries against the prefix in one call: (1, hkv, R*g*T, d), GQA groups folded in too
    qf = query.view(R, hk, g, T, d).transpose(0, 1).reshape(1, hk, R * g * T, d)
    pk, pv = sh.prefix[0][module.layer_idx], sh.prefix[1][module.layer_idx]       # (1, hkv, L, d)
    out_p, lse_p = _attend(qf, pk, pv, prefix_mask, scale, causal=False)          # (1, hkv, RgT, d), (1, hkv, RgT)
    if dead is not None:                           # rows whose window leaves nothing of the prefix
        lse_p = lse_p.masked_fill(dead, _NEG_INF)
    out_p = out_p.reshape(hk, R, g, T, d).transpose(0, 1).reshape(R, hq, T, d)
    lse_p = lse_p.reshape(hk, R, g, T).transpose(0, 1).reshape(R, hq, T)
    total = torch.logaddexp(lse, lse_p)
    out = out * torch.exp(lse - total)[..., None] + out_p * torch.exp(lse_p - total)[..., None]
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


_REGISTERED = False


def _register() -> None:
    """Add the attention function to transformers' registry (no mask function: masks are built here)."""
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface

        AttentionInterface.register(SHARED_ATTENTION, shared_prefix_attention)
        _REGISTERED = True
