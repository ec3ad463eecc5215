"""Update rules: how one forward-tuning step moves the cache, given the keys/values re-encoded after it.

A rule is a pure function over every layer's tensors of one kind (keys, or values):

    rule(state, new, rule_state, config) -> (state', rule_state')

state: K~ per layer `[1, kv_heads, L, head_dim]`; new: K_t of the L re-encoded positions, same shapes;
rule_state: whatever the rule carries between steps (None before its first update); config: the
TuningConfig (step_size eta, momentum beta, ...). Rules never modify their inputs in place.
Register one with `@register_rule("name", help=...)`; `TuningConfig(rule="name")` selects it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class Rule:
    name: str
    fn: Callable
    help: str


RULES: dict[str, Rule] = {}


def register_rule(name: str, help: str):
    """Decorator: make `fn(state, new, rule_state, config)` selectable as TuningConfig(rule=name)."""
    def deco(fn):
        if name in RULES and RULES[name].fn is not fn:
            raise ValueError(f"update rule {name!r} is already registered ({RULES[name].fn.__module__})")
        RULES[name] = Rule(name, fn, help)
        return fn
    return deco


def get_rule(name: str) -> Rule:
    if name not in RULES:
        raise ValueError(f"unknown update rule {name!r}; valid: {', '.join(sorted(RULES))}")
    return RULES[name]


@register_rule("momentum", help="the paper's rule: g = K_t - K~, m = g + beta m, K~ += eta m "
                                "(momentum 0 is the ACL gate K~ = eta K_t + (1 - eta) K~)")
def momentum(state: list[torch.Tensor], new: list[torch.Tensor], buf: list[torch.Tensor] | None, config):
    grads = [n - s for s, n in zip(state, new)]                                          # g = K_t - K~
    buf = grads if buf is None else [g + config.momentum * m for g, m in zip(grads, buf)]  # m = g + beta m
    return [s + config.step_size * m for s, m in zip(state, buf)], buf                 # K~ + eta m
