"""deepthink: iterative forward tuning (Deep-Thinking) for in-context learning of causal LMs.

The public names are imported on first use (PEP 562), so that `import deepthink.cli` (the `deepthink` command)
does not load torch and transformers before it can answer --help or handle Ctrl-C."""
from __future__ import annotations

import importlib

from .version import __version__

_EXPORTS = {
    "TunedContext": ".context", "zero_shot": ".context",
    "ContextError": ".context_schema", "UnverifiedContextWarning": ".context_schema",
    "LM": ".models", "REGISTRY": ".models", "load_model": ".models", "wrap_model": ".models",
    "Scores": ".scoring",
    "RULES": ".tuning", "TuningConfig": ".tuning", "register_rule": ".tuning",
    "ForwardTuner": ".tuning.tuner", "tune": ".api",
    "Task": ".tasks", "get_task": ".tasks", "task_from_template": ".tasks",
}
__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    else:                                    # a submodule (deepthink.data, deepthink.kv, ...), as an eager import had it
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
