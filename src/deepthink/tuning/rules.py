"""Update rules: how one forward-tuning step moves the cache, given the keys/values re-encoded after it.

A rule is a pure function over every layer's tensors of one kind (keys, or values):

    rule(state, new, rule_state, config) -> (state', rule_state')

state: K~ per layer `[1, kv_heads, L, head_dim]`; new: K_t of the L re-encoded positions, same shapes;
rule_state: whatever the rule carries between steps (None before its first update); config: the
TuningConfig (step_size eta, momentum beta, ...). Rules never modify their inputs in place.
Register one with `@register_rule("name", help=...)`; `TuningConfig(rule="name")` selects it.
"""
from __future__ import annotations

import torch

from ..registry import Entry, Registry


Rule = Entry
RULES = Registry("update rule")


def register_rule(name: str, help: str):
    """Decorator: make `fn(state, new, rule_state, config)` selectable as TuningConfig(rule=name)."""
    return RULES.register(name, help)


def get_rule(name: str) -> Rule:
    return RULES.get_entry(name)


@register_rule("momentum", help="the paper's rule: g = K_t - K~, m = g + beta m, K~ += eta m "
                                "(momentum 0 is the ACL gate K~ = eta K_t + (1 - eta) K~)")
def momentum(state: list[torch.Tensor], new: list[torch.Tensor], buf: list[torch.Tensor] | None, config):
    grads = [n - s for s, n in zip(state, new)]                                          # g = K_t - K~
    buf = grads if buf is None else [g + config.momentum * m for g, m in zip(grads, buf)]  # m = g + beta m
    return [s + config.step_size * m for s, m in zip(state, buf)], buf                 # K~ + eta m


def _layer_norm(t: torch.Tensor) -> torch.Tensor:
    """||t|| over a whole layer (every head, position and channel), in float32, as a 0-d tensor."""
    return t.float().norm()


@register_rule("normalized", help="momentum direction, relative length: m = g + beta m, and per layer "
                                  "K~_l += eta ||K~_l|| m_l / ||m_l|| (no move where m_l = 0)")
def normalized(state: list[torch.Tensor], new: list[torch.Tensor], buf: list[torch.Tensor] | None, config):
    """Every layer moves by the same relative amount: ||dK~_l|| = eta ||K~_l|| whatever the scale of g.

    m is the momentum rule's buffer (m = g on the first update, then m = g + beta m, with g = K_t - K~);
    only its direction is used: dK~_l = eta * ||K~_l|| * m_l / ||m_l||, norms over the whole layer tensor
    `[1, kv_heads, L, head_dim]`. A layer whose m_l is exactly 0 (e.g. values under target='rotation',
    where V_t = V~) does not move. So one eta means the same relative step in every layer and every model.
    """
    grads = [n - s for s, n in zip(state, new)]                                          # g = K_t - K~
    buf = grads if buf is None else [g + config.momentum * m for g, m in zip(grads, buf)]  # m = g + beta m
    out = []
    for s, m in zip(state, buf):
        m_norm = _layer_norm(m)
        if float(m_norm) == 0.0:
            out.append(s)
            continue
        scale = config.step_size * _layer_norm(s) / m_norm                                 # eta ||K~|| / ||m||
        out.append((s.float() + scale * m.float()).to(s.dtype))
    return out, buf


@register_rule("nesterov", help="Nesterov momentum on the same pseudo-gradient: m = g + beta m, "
                                "K~ += eta (g + beta m) (beta = 0: the momentum rule)")
def nesterov(state: list[torch.Tensor], new: list[torch.Tensor], buf: list[torch.Tensor] | None, config):
    """The look-ahead form of momentum (as torch.optim.SGD(nesterov=True) writes it, on ascent direction g):

        g = K_t - K~,   m = g (first update) or g + beta m,   K~ = K~ + eta (g + beta m)

    On the first update the step is eta (1 + beta) g. With beta = 0 it is the momentum rule exactly.
    """
    grads = [n - s for s, n in zip(state, new)]                                          # g = K_t - K~
    buf = grads if buf is None else [g + config.momentum * m for g, m in zip(grads, buf)]  # m = g + beta m
    return [s + config.step_size * (g + config.momentum * m) for s, g, m in zip(state, grads, buf)], buf
