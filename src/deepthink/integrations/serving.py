"""What `deepthink serve` needs before FastAPI: the server's limits (ServeConfig), --context specs, loading.

Kept apart from server.py so that the CLI can build its flags without the optional FastAPI dependency.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..context import TunedContext
from ..models import REGISTRY, load_model

API_KEY_ENV = "DEEPTHINK_API_KEY"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass
class ServeConfig:
    """Limits and batching of the server; every field is a `deepthink serve` flag (--max-body-bytes, ...)."""

    max_body_bytes: int = field(default=1_000_000, metadata={"help": "largest request body accepted (413 above)"})
    max_queries: int = field(default=256, metadata={"help": "most queries (or rows) in one request (413 above)"})
    max_query_tokens: int = field(default=512, metadata={
        "help": "most tokens in one query with its longest choice (413 above)"})
    max_new_tokens: int = field(default=512, metadata={"help": "largest max_new_tokens a client may ask (422 above)"})
    batch_wait_ms: float = field(default=5.0, metadata={
        "help": "how long the batcher waits for more score/predict requests before a model call"})
    max_batch: int = field(default=64, metadata={
        "help": "most queries gathered into one model call (a larger request runs alone)"})
    batch_size: int = field(default=16, metadata={"help": "queries per forward pass inside a model call"})

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "batch_wait_ms":
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                    raise ValueError(f"ServeConfig.batch_wait_ms must be a number >= 0, got {v!r}")
            elif isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ServeConfig.{f.name} must be a positive integer, got {v!r}")


# ---------------------------------------------------------------- loading

def parse_context_specs(specs: list[str]) -> dict[str, Path]:
    """['sst2=ctx/sst2', ...] -> {'sst2': Path('ctx/sst2')}; names are unique and URL-safe."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise ValueError(f"--context {spec!r}: expected NAME=DIR, e.g. --context sst2=ctx/sst2")
        if not NAME.fullmatch(name):
            raise ValueError(f"--context {spec!r}: the name {name!r} must be 1-64 letters, digits, '.', '_' or '-', "
                             "starting with a letter or digit")
        if name in out:
            raise ValueError(f"--context {spec!r}: the name {name!r} is given twice; give each context its own name")
        out[name] = Path(path)
    if not out:
        raise ValueError("give at least one --context NAME=DIR")
    return out


def load_contexts(specs: dict[str, Path], model: str | None = None, device: str = "cpu",
                  dtype: str | None = None) -> dict[str, TunedContext]:
    """Load every context for the model it records (or `model`), each distinct model once, and verify it."""
    import torch

    metas = {}
    for name, path in specs.items():            # read every config first: a bad folder fails before any model loads
        try:
            metas[name] = TunedContext.read_config(path)
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"context {name!r}: {e}") from None
    lms: dict[tuple[str, str], object] = {}
    out = {}
    for name, path in specs.items():
        meta = metas[name]
        m = meta["model"]
        source = model or (m["name"] if m["name"] in REGISTRY else m["source"])
        if source == "in-memory":
            raise ValueError(f"context {name!r} ({path}) was tuned with an in-memory model ({m['name']!r}); pass --model")
        dt = dtype or meta["dtype"]
        if (source, dt) not in lms:
            lms[source, dt] = load_model(source, device=device, dtype=getattr(torch, dt))
        try:
            out[name] = TunedContext.load(path, lms[source, dt])
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"context {name!r}: {e}") from None
    return out
