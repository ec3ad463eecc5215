"""Targets: the keys/values K_t, V_t that an update rule moves the cache towards (TuningConfig.target).

reencode   (the method) the demonstrations re-encoded with K~, V~ as their past; the L new positions'
           keys/values (at positions L..2L-1, or 0..L-1 with positions='aligned').
rotation   (a mechanism control for rotary models) only the positional part of that step:

               K_t = R_L K~        V_t = V~

           R_L rotates every key by L positions with the model's own rotary embedding (RoPE: each pair of
           channels (i, i + d/2) turns by the angle L * theta_i; per layer type where a model has several
           bases, e.g. Gemma-3's local and global layers). No forward pass runs, and since V_t = V~ the
           values never move. A key cached at position p, rotated by L, is exactly the key the same hidden
           input gets at position p + L - what the re-encoded copy at L..2L-1 would hold if re-encoding
           changed nothing but positions. So the control shows how much of the method's effect is position
           alone, not "meta-gradient".

A target is built once per tuner, `make_target(name, lm, input_ids, config) -> fn(keys, values, encode)`,
where `encode(past)` is the tuner's own re-encoding; building it is where a model that cannot take the
target is refused.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch

from .. import kv

TargetFn = Callable[[list, list, Callable], tuple[list, list]]


def _reencode(lm, input_ids: torch.Tensor, config) -> TargetFn:
    return lambda keys, values, encode: encode((keys, values))


def _rotation(lm, input_ids: torch.Tensor, config) -> TargetFn:
    if config.positions == "aligned":   # TuningConfig refuses it too; a direct caller may not have used it
        raise ValueError("target='rotation' applies the offset of the shifted copy (L positions); with "
                         "positions='aligned' there is none: use positions='shifted'")
    L = input_ids.shape[1]
    rotations = rotary_offsets(lm.model, L)
    check_rotation(lm.model, input_ids, rotations)

    def rotate(keys, values, encode):
        return [rotate_keys(k, *r) for k, r in zip(keys, rotations)], list(values)
    return rotate


TARGETS: dict[str, Callable[..., TargetFn]] = {"reencode": _reencode, "rotation": _rotation}


def make_target(name: str, lm, input_ids: torch.Tensor, config) -> TargetFn:
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; valid: {', '.join(TARGETS)}")
    return TARGETS[name](lm, input_ids, config)


# --- rotary positions ------------------------------------------------------------------------------------------

def _why_not_rotary(config) -> str:
    kind = config.model_type
    if kind == "bloom" or getattr(config, "alibi", False):
        how = "biases attention by distance (ALiBi)"
    elif kind in ("gpt2", "opt", "gpt_neo", "gptj") or getattr(config, "n_positions", None):
        how = "adds learned absolute position embeddings to its inputs"
    else:
        how = "has no rotary embedding module (base_model.rotary_emb)"
    return (f"target='rotation' needs rotary position embeddings (RoPE), but {kind} {how}: its cached keys carry "
            "no rotation that could be advanced by L positions, so this positional control does not exist for "
            "it. Use target='reencode'")


def rotary_offsets(model, offset: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (cos, sin) of the rotation by `offset` positions, each (rot_dim,) in float32, taken from the
    model's own rotary module at position `offset` (per layer type when the module takes one) and divided by
    their common length sqrt(cos^2 + sin^2), so that attention scalings some RoPE variants fold into cos/sin
    (already present in the cached keys) are not applied twice."""
    rotary = getattr(model.base_model, "rotary_emb", None)
    if rotary is None:
        raise ValueError(_why_not_rotary(model.config))
    cfg = model.config.get_text_config(decoder=True)
    device = next(rotary.buffers(), torch.zeros(())).device
    x = torch.zeros(1, dtype=torch.float32, device=device)
    pos = torch.tensor([[offset]], device=device)
    n_layers = cfg.num_hidden_layers
    with torch.no_grad():
        if "layer_type" in inspect.signature(rotary.forward).parameters:      # e.g. Gemma-3: a base per layer type
            types = list(cfg.layer_types)
            per_type = {t: rotary(x, pos, t) for t in dict.fromkeys(types)}
            pairs = [per_type[t] for t in types]
        else:
            pairs = [rotary(x, pos)] * n_layers
    out = []
    for cos, sin in pairs:
        cos, sin = cos.reshape(-1).float(), sin.reshape(-1).float()
        length = (cos * cos + sin * sin).sqrt()
        out.append((cos / length, sin / length))
    return out


def rotate_keys(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """k `[1, kv_heads, L, head_dim]` rotated as RoPE does (pairs (i, i + r/2) of its first r = len(cos)
    channels; the rest, on partial-rotary models, unchanged), computed in float32."""
    r = cos.shape[-1]
    x = k.float()
    rot, rest = x[..., :r], x[..., r:]
    half = torch.cat([-rot[..., r // 2:], rot[..., :r // 2]], -1)           # rotate_half
    out = rot * cos.to(x.device) + half * sin.to(x.device)
    return torch.cat([out, rest], -1).to(k.dtype) if rest.shape[-1] else out.to(k.dtype)


@torch.inference_mode()
def check_rotation(model, input_ids: torch.Tensor, rotations, probe: int = 16) -> None:
    """Refuse a model on which R_L is not its own position shift: the first `probe` demonstration tokens are
    encoded at positions 0.. and at L.., and every layer's keys must agree after rotation (they do under
    RoPE, whose attention depends only on relative positions; they would not on a model that rotates
    another way or leaves some layers without positions)."""
    L = input_ids.shape[1]
    ids = input_ids[:, :min(probe, L)]
    n = ids.shape[1]
    at0 = kv.encode(model, ids)[0]
    atL = kv.encode(model, ids, position_ids=torch.arange(L, L + n, device=ids.device)[None])[0]
    tol = 1e-3 if at0[0].dtype == torch.float32 else 0.1     # bf16 drift measured at 1.4e-2 (Gemma-3-270M)
    for layer, (a, b, r) in enumerate(zip(at0, atL, rotations)):
        err = float((rotate_keys(a, *r).float() - b.float()).norm())
        if err > tol * max(float(b.float().norm()), 1e-12):
            raise ValueError(
                f"target='rotation': rotating layer {layer}'s keys by {L} positions does not give the keys the "
                f"model computes at positions {L}.. (relative error {err / float(b.float().norm()):.2g}): "
                f"{model.config.model_type} does not rotate keys the way RoPE (rotate-half) does, so this "
                "control would not isolate position. Use target='reencode'")
