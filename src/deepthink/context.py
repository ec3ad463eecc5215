"""TunedContext: the tuned keys/values of the demonstrations, used as every query's prefix."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from . import kv, scoring
from .tuning import TuningConfig

METHODS = ("fast", "naive")


class TunedContext:
    """A prefix cache (per layer K~, V~ `[1, kv_heads, L, head_dim]`) plus where it came from."""

    def __init__(self, lm, keys: list[torch.Tensor], values: list[torch.Tensor], prefix_ids: list[int],
                 config: TuningConfig | None = None, demonstrations: str = "", steps_done: int = 1,
                 history: list[dict] | None = None, stopped: str | None = None):
        self.lm, self.keys, self.values = lm, keys, values
        self.prefix_ids = list(prefix_ids)
        self.config = config
        self.demonstrations = demonstrations
        self.steps_done = steps_done
        self.history = history or []
        self.stopped = stopped

    @property
    def length(self) -> int:
        """L, the number of prefix positions."""
        return self.keys[0].shape[-2] if self.keys else 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @property
    def prefix(self) -> kv.Prefix:
        return self.keys, self.values

    def __repr__(self) -> str:
        return (f"TunedContext(model={self.lm.name!r}, tokens={self.length}, steps={self.steps_done}, "
                f"layers={len(self.keys)}, bytes={self.nbytes})")

    def score(self, queries: Sequence[str], choices, method: str = "fast", batch_size: int = 16,
              progress: bool = False) -> scoring.Scores:
        """Score each query's choices after this prefix.

        choices: one list of continuation strings per query, or one list shared by all queries. A choice is
        the exact text appended to the query (e.g. " positive"): F = query + choice.
        Returns Scores with the summed log-probability per query and choice (`.logprob`), the per-token
        value (`.normalized`) and `.predictions()`.
        """
        if method not in METHODS:
            raise ValueError(f"unknown scoring method {method!r}; valid: {', '.join(METHODS)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        units, n = scoring.prepare(self.lm.tokenizer, queries, choices, self.length,
                                   kv.max_positions(self.lm.config))
        fn = scoring.score_fast if method == "fast" else scoring.score_naive
        return fn(self.lm.model, self.prefix, units, n, len(queries), batch_size=batch_size, progress=progress)

    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop_at_eos: bool = True) -> str:
        """Continue `prompt` after the tuned prefix (greedy at temperature 0, else nucleus sampling)."""
        return _generate(self, prompt, max_new_tokens, temperature, top_p, seed, stop_at_eos)

    def save(self, path) -> Path:
        """Write safetensors + JSON to the folder `path` (atomically: temporary folder, then rename)."""
        return _save(self, path)

    @staticmethod
    def load(path, lm, device=None) -> "TunedContext":
        """Read a saved context for `lm`; refuses another model, tokenizer or dtype and altered files."""
        return _load(path, lm, device)


@torch.inference_mode()
def zero_shot(lm) -> TunedContext:
    """The no-demonstrations baseline: a prefix of only the tokenizer's own special tokens (e.g. BOS)."""
    ids = lm.tokenizer("").input_ids
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    if ids:
        out = lm.model(torch.tensor([ids], device=lm.device), cache=kv.build_cache(lm.model), use_cache=True)
        keys, values = kv.cache_tensors(out.cache)
    return TunedContext(lm, list(keys), list(values), ids, config=None, demonstrations="", steps_done=0)


FORMAT_VERSION = 1
TENSORS = "context.safetensors"
CONFIG = "context.json"


def _save(ctx: TunedContext, path) -> Path:
    """Write `path/` atomically: tensors to a temporary folder beside it, then one rename."""
    from safetensors.torch import save_file

    from . import __version__
    from .models import sha256_file

    path = Path(path)
    if path.exists() and not (path / CONFIG).exists():
        raise FileExistsError(f"{path} exists and is not a deepthink context: choose a new output directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    except OSError as e:
        raise OSError(f"cannot write the context to {path}: {e.strerror or e}; choose a writable --out") from e
    try:
        tensors = {f"{kind}.{i}": t[0].contiguous().cpu()
                   for kind, ts in (("k", ctx.keys), ("v", ctx.values)) for i, t in enumerate(ts)}
        save_file(tensors, tmp / TENSORS)
        meta = {
            "format_version": FORMAT_VERSION,
            "deepthink_version": __version__,
            "model": {"name": ctx.lm.name, "source": ctx.lm.source, "fingerprint": ctx.lm.fingerprint,
                      "tokenizer_fingerprint": ctx.lm.tokenizer_fingerprint, "model_type": ctx.lm.config.model_type},
            "dtype": str(ctx.lm.dtype).removeprefix("torch."),
            "tuning": ctx.config.to_dict() if ctx.config else None,
            "steps_done": ctx.steps_done,
            "stopped": ctx.stopped,
            "demonstrations": ctx.demonstrations,
            "prefix_ids": ctx.prefix_ids,
            "tokens": ctx.length,
            "layers": len(ctx.keys),
            "history": ctx.history,
            "checksums": {TENSORS: sha256_file(tmp / TENSORS)},
        }
        (tmp / CONFIG).write_text(json.dumps(meta, indent=1, ensure_ascii=False))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _load(path, lm, device=None) -> TunedContext:
    """Read a saved context, refusing anything made for another model, tokenizer or dtype, or altered."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .models import sha256_file

    path = Path(path)
    if not (path / CONFIG).is_file():
        raise FileNotFoundError(f"{path / CONFIG} not found: {path} is not a saved deepthink context")
    try:
        meta = json.loads((path / CONFIG).read_text())
    except ValueError as e:
        raise ValueError(f"{path / CONFIG} is not valid JSON ({e}): the artifact is damaged; re-run `deepthink tune`") from e
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{path}: format version {version!r} is newer than this deepthink reads ({FORMAT_VERSION}); "
                         "upgrade deepthink")

    def expect(what, wanted, found):
        if wanted != found:
            raise ValueError(f"{path} was made for {what} {wanted!r}, but the loaded model has {found!r}: "
                             f"load the model the context was tuned with")

    m = meta["model"]
    expect("model fingerprint", m["fingerprint"], lm.fingerprint)
    expect("tokenizer fingerprint", m["tokenizer_fingerprint"], lm.tokenizer_fingerprint)
    expect("dtype", meta["dtype"], str(lm.dtype).removeprefix("torch."))
    tensor_file = path / TENSORS
    if not tensor_file.is_file():
        raise FileNotFoundError(f"{tensor_file} is missing: the artifact is incomplete; re-run `deepthink tune`")
    digest = sha256_file(tensor_file)
    if digest != meta["checksums"][TENSORS]:
        raise ValueError(f"{tensor_file} is altered or truncated (sha256 {digest[:12]}… != recorded "
                         f"{meta['checksums'][TENSORS][:12]}…): re-run `deepthink tune`")
    try:
        tensors = load_file(tensor_file, device=str(device or lm.device))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{tensor_file} cannot be read ({e}): re-run `deepthink tune`") from e
    n = meta["layers"]
    keys = [tensors[f"k.{i}"][None] for i in range(n)]
    values = [tensors[f"v.{i}"][None] for i in range(n)]
    config = TuningConfig.from_dict(meta["tuning"]) if meta["tuning"] else None
    return TunedContext(lm, keys, values, meta["prefix_ids"], config=config, demonstrations=meta["demonstrations"],
                        steps_done=meta["steps_done"], history=meta["history"], stopped=meta["stopped"])


@torch.inference_mode()
def _generate(ctx: TunedContext, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
              top_p: float = 1.0, seed: int | None = None, stop_at_eos: bool = True) -> str:
    """Continue `prompt` after the tuned prefix: greedy when temperature == 0, else nucleus sampling."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    lm = ctx.lm
    ids = lm.tokenizer(prompt, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError("the prompt tokenises to nothing: give a non-empty prompt")
    limit = kv.max_positions(lm.config)
    if limit is not None and ctx.length + len(ids) + max_new_tokens > limit:
        raise ValueError(f"{ctx.length} prefix + {len(ids)} prompt + {max_new_tokens} new tokens exceed the "
                         f"model's {limit} positions: lower --max-new-tokens or shorten the prompt")
    gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
    cache = kv.build_cache(lm.model, *ctx.prefix)
    x = torch.tensor([ids], device=lm.device)
    out_ids: list[int] = []
    eos = lm.tokenizer.eos_token_id
    for _ in range(max_new_tokens):
        out = lm.model(x, cache=cache, use_cache=True, logits_to_keep=1) if _takes_logits_to_keep(lm.model) \
            else lm.model(x, cache=cache, use_cache=True)
        cache = out.cache
        logits = out.logits[0, -1].float()
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            probs = (logits / temperature).softmax(-1).cpu()
            sorted_p, idx = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < top_p
            sorted_p = sorted_p * keep
            nxt = int(idx[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)])
        if stop_at_eos and nxt == eos:
            break
        out_ids.append(nxt)
        x = torch.tensor([[nxt]], device=lm.device)
    return lm.tokenizer.decode(out_ids)


def _takes_logits_to_keep(model) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters

