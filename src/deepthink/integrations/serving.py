"""What `deepthink serve` needs before FastAPI: the server's limits (ServeConfig), --context specs, loading.

Kept apart from server.py so that the CLI can build its flags without the optional FastAPI dependency.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..context import (MAX_TEMPERATURE, MIN_TEMPERATURE, MIN_TOP_P, TunedContext,  # noqa: F401  (the sampling rule,
                       sampling_problem)                                              # re-exported for the server)
from ..io import text_problem  # noqa: F401  (re-exported: the server's and the CLI's check)
from ..models import REGISTRY, load_model

API_KEY_ENV = "DEEPTHINK_API_KEY"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def samplable(cls, v, info):
    """Pydantic field validator for a request's `temperature` or `top_p` (the one sampling rule, context.py's),
    shared by the server's own bodies and the OpenAI API's: `field_validator("temperature", "top_p")(samplable)`."""
    problem = sampling_problem(v, 1.0) if info.field_name == "temperature" else sampling_problem(0, v)
    if problem:
        raise ValueError(problem[1])
    return v


def cut_at_stop(text: str, stops) -> tuple[str, bool]:
    """`text` cut before the first occurrence of any of the stop strings, and whether one occurred."""
    cuts = [i for i in (text.find(x) for x in stops) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


_FLOATS = {"batch_wait_ms": 0.0, "graceful_timeout": 0.0, "read_timeout": None}     # name -> least value (None: > 0)




@dataclass
class ServeConfig:
    """Limits and batching of the server; every field is a `deepthink serve` flag (--max-body-bytes, ...)."""

    max_body_bytes: int = field(default=1_000_000, metadata={"help": "largest request body accepted (413 above)"})
    max_queries: int = field(default=256, metadata={"help": "most queries (or rows, or OpenAI prompts) in one request (413 above)"})
    max_choices: int = field(default=64, metadata={"help": "most choices for one query (413 above)"})
    max_request_choices: int = field(default=1024, metadata={
        "help": "most query-choice pairs in one request, summed over its queries (413 above)"})
    max_query_chars: int = field(default=20_000, metadata={
        "help": "most characters in one query with its longest choice, or in one prompt, checked before any "
                "tokenising (413 above)"})
    max_query_tokens: int = field(default=512, metadata={
        "help": "most tokens in one query with its longest choice (413 above)"})
    max_new_tokens: int = field(default=512, metadata={
        "help": "largest max_new_tokens (OpenAI API: max_tokens) a client may ask (422 above; 400 on the OpenAI API)"})
    read_timeout: float = field(default=10.0, metadata={
        "help": "seconds a client has to send a request's headers, and again its body (closed, or 408, after)"})
    max_connections: int = field(default=256, metadata={
        "help": "most open connections; one more is answered 503 and closed at once"})
    graceful_timeout: float = field(default=5.0, metadata={
        "help": "seconds SIGTERM waits for the requests in flight before it cancels them and exits"})
    batch_wait_ms: float = field(default=5.0, metadata={
        "help": "how long the batcher waits for more score/predict requests before a model call"})
    max_batch: int = field(default=64, metadata={
        "help": "most queries gathered into one model call (a larger request runs alone)"})
    batch_size: int = field(default=16, metadata={"help": "queries per forward pass inside a model call"})

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in _FLOATS:
                least = _FLOATS[f.name]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (
                        v <= 0 if least is None else v < least):
                    raise ValueError(f"ServeConfig.{f.name} must be a number {'> 0' if least is None else '>= 0'}, "
                                     f"got {v!r}")
            elif isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ServeConfig.{f.name} must be a positive integer, got {v!r}")


def read_api_key(flag: str | None, file: str | None, env: dict) -> str | None:
    """The API key from --api-key, --api-key-file or $DEEPTHINK_API_KEY (in that order); None for no key.

    An empty key is refused rather than read as "no authentication"."""
    if flag is not None and file is not None:
        raise ValueError("give --api-key or --api-key-file, not both")
    if file is not None:
        try:
            key, where = Path(file).read_text(encoding="utf-8").strip("\r\n"), f"--api-key-file {file}"
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--api-key-file {file}: cannot read it: {e}") from None
    elif flag is not None:
        key, where = flag, "--api-key"
    elif API_KEY_ENV in env:
        key, where = env[API_KEY_ENV], f"${API_KEY_ENV}"
    else:
        return None
    if not key.strip():
        raise ValueError(f"{where} is empty: an empty key would turn authentication off; give a key, or unset "
                         f"it to serve without one")
    if key != key.strip() or any(not 32 <= ord(ch) < 127 for ch in key):
        raise ValueError(f"{where}: the key must be printable ASCII, without leading or trailing spaces (it "
                         "travels in an HTTP header)")
    return key


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
    """Load every context for the model it records (or `model`), each distinct model once, and verify it. A context
    that needs its peft adapter in the model (lora, lora_icl, ia3) gets a model of its own, which holds the adapter."""
    import torch

    from ..adapter import in_model, require_peft

    metas = {}
    for name, path in specs.items():            # read every config first: a bad folder fails before any model loads
        try:
            metas[name] = TunedContext.read_config(path)
            require_peft(metas[name])        # lora, lora_icl, ia3: their adapter goes into the model
        except (ValueError, FileNotFoundError, ImportError) as e:
            raise type(e)(f"context {name!r}: {e}") from None
    lms: dict[tuple[str, str, str | None], object] = {}
    out = {}
    for name, path in specs.items():
        meta = metas[name]
        m = meta["model"]
        source = model or (m["name"] if m["name"] in REGISTRY else m["source"])
        if source == "in-memory":
            raise ValueError(f"context {name!r} ({path}) was tuned with an in-memory model ({m['name']!r}); pass --model")
        dt = dtype or meta["dtype"]
        key = (source, dt, name if in_model(meta) else None)
        if key not in lms:
            lms[key] = load_model(source, device=device, dtype=getattr(torch, dt))
        try:
            out[name] = TunedContext.load(path, lms[key])
        except (ValueError, FileNotFoundError, ImportError) as e:       # ImportError: peft, for an adapter
            raise type(e)(f"context {name!r}: {e}") from None
    return out
