"""A named registry of functions (update rules, selection rules): register with a decorator, look up by
name with an error that lists the valid ones. A dict, so `name in R`, `R[name]` and iteration work."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Entry:
    name: str
    fn: Callable
    help: str


class Registry(dict):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind            # e.g. "update rule", used in error messages

    def register(self, name: str, help: str):
        """Decorator: add `fn` under `name` (registering another function under a taken name is an error)."""
        def deco(fn):
            if name in self and self[name].fn is not fn:
                raise ValueError(f"{self.kind} {name!r} is already registered ({self[name].fn.__module__})")
            self[name] = Entry(name, fn, help)
            return fn
        return deco

    def get_entry(self, name: str) -> Entry:
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {', '.join(sorted(self))}")
        return self[name]
