"""TunedContext: the tuned keys/values of the demonstrations, used as every query's prefix.

A context saves to a folder (`save` / `load`, `deepthink tune --out DIR`):

    context.safetensors   per layer l: "k.l", "v.l", each [kv_heads, L, head_dim] (the batch axis dropped)
    context.json          format version, deepthink version, model (name, source, weights and tokenizer
                          fingerprints), dtype, tuning config, origin (task/seed/shots or demos file),
                          for a cache not made by forward tuning the method that made it ("method":
                          {"name": "grad_kv", "options": {...}}, with "tuning" null; absent otherwise),
                          demonstration text, prefix token ids and count, per-step ||dK||/||dV|| norms,
                          why tuning stopped early (if it did), every tensor's name/shape/dtype, the
                          tensor file's sha256, the task definition (so a copied context needs no task
                          file), and json_sha256: the sha256 of the canonical JSON of all of that
    adapter/              a peft baseline's adapter in peft's own format (adapter_config.json,
                          adapter_model.safetensors; context.json's "adapter" holds their sha256, format 3):
                          lora, lora_icl and ia3 need it in the model, which loading does (deepthink/adapter.py)

Loading never unpickles (safetensors + JSON only). Before any tensor is read or a model is loaded,
context.json is parsed with bounds (size, nesting), checked field by field (context_schema.check_meta:
types, ranges, agreement between fields), its digest verified, and the tensor file's header checked against
it; then the model's identity (weights, tokenizer, dtype, layer count) and the tensors' sha256. Every
refusal is a ContextError (a ValueError) naming the file and the field. A format-1 context (no digest)
still loads, with an UnverifiedContextWarning. Saving writes a temporary folder beside the target and
renames it into place, so an interrupted save never leaves a folder that `load` accepts; a folder that
already holds a context is replaced only with `overwrite=True`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import torch

from . import kv, scoring
from .adapter import ADAPTER_DIR, holds_adapter
from .context_schema import (ADAPTER_FORMAT, DTYPES, FORMAT_VERSION, ContextError, UnverifiedContextWarning,
                             check_meta, check_tensor_header, json_sha256, read_json, task_definition,
                             task_from_definition)
from .io import sha256_bytes, write_synced
from .tuning.config import TuningConfig
from .version import __version__

METHODS = ("fast", "naive")


class TunedContext:
    """A prefix cache (per layer K~, V~ `[1, kv_heads, L, head_dim]`) plus where it came from."""

    def __init__(self, lm, keys: list[torch.Tensor], values: list[torch.Tensor], prefix_ids: list[int],
                 config: TuningConfig | None = None, demonstrations: str = "", steps_done: int = 1,
                 history: list[dict] | None = None, stopped: str | None = None, origin: dict | None = None,
                 method: dict | None = None, task=None, adapter=None):
        self.lm, self.keys, self.values = lm, keys, values
        self.prefix_ids = list(prefix_ids)
        self.config = config
        self.demonstrations = demonstrations
        self.steps_done = steps_done
        self.history = history or []
        self.stopped = stopped
        self.origin = origin     # where the demonstrations came from, e.g. {"task": "sst2", "seed": 0, "shots": 1}
        # how the cache was made when not by forward tuning (config is then None), e.g.
        # {"name": "grad_kv", "options": {...GradientConfig...}}; None for forward tuning and plain ICL
        self.method = method
        # the tasks.Task the demonstrations follow (saved as its definition, so that a copied context formats
        # queries with no task file); None for demonstrations from a text file
        self.task = task
        # a peft baseline's adapter (adapter.Adapter), saved beside the cache; with in_model, lm.model holds it
        self.adapter = adapter

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
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        units, n = scoring.prepare(self.lm.tokenizer, queries, choices, self.length,
                                   kv.max_positions(self.lm.config))
        fn = scoring.score_fast if method == "fast" else scoring.score_naive
        return fn(self.lm.model, self.prefix, units, n, len(queries), batch_size=batch_size, progress=progress)

    def score_tokens(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                     batch_size: int = 16) -> list[tuple[float, bool]]:
        """Score already-tokenised (context ids, continuation ids) pairs after this prefix.

        For callers with their own tokenisation rule (e.g. lm-evaluation-harness): the context ids follow the
        prefix directly, so they must not repeat its special tokens. Returns per pair the summed log-probability
        of the continuation and whether each of its tokens is the argmax (greedy) at its position.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        limit = kv.max_positions(self.lm.config)
        clean = []
        for i, (c, t) in enumerate(pairs):
            c, t = [int(x) for x in c], [int(x) for x in t]
            if not c or not t:
                raise ValueError(f"pair {i}: the context and the continuation each need at least one token")
            if limit is not None and self.length + len(c) + len(t) - 1 > limit:
                raise ValueError(f"pair {i} needs {self.length} prefix + {len(c) + len(t) - 1} tokens, beyond the "
                                 f"model's {limit} positions: shorten the context or the demonstrations")
            clean.append((c, t))
        return scoring.score_tokens(self.lm.model, self.prefix, clean, batch_size) if clean else []

    def predict(self, queries: Sequence[str], choices, normalize: bool = False, method: str = "fast",
                batch_size: int = 16, progress: bool = False) -> list[dict]:
        """Score and pick one choice per query; one dict per query, in order:

        {"query", "choices", "logprob" (summed per choice), "normalized" (per token), "prediction" (argmax of
        logprob), "prediction_normalized" (argmax of normalized), "answer" (the chosen choice's text: by
        normalized when `normalize`, else by logprob)}. Ties go to the first choice.
        Unlike `score`, queries may have different numbers of choices: they are scored in groups of equal size.
        """
        if isinstance(queries, str) or not isinstance(queries, Sequence):
            raise ValueError("queries must be a list of strings")
        queries = list(queries)
        if choices and all(isinstance(c, str) for c in choices):
            choices = [list(choices)] * len(queries)
        if not isinstance(choices, Sequence) or len(choices) != len(queries):
            raise ValueError(f"got {len(queries)} queries but {len(choices)} choice lists: pass one list per "
                             "query or a single list of strings shared by all")
        rows: list[dict | None] = [None] * len(queries)
        for idx in scoring.group_by_choices(choices):
            try:
                s = self.score([queries[i] for i in idx], [list(choices[i]) for i in idx], method=method,
                               batch_size=batch_size, progress=progress)
            except ValueError as e:   # name the caller's query index, not the index inside the group
                raise ValueError(re.sub(r"^query (\d+)", lambda m: f"query {idx[int(m[1])]}", str(e))) from None
            by_sum, by_norm = s.predictions(), s.predictions(normalize=True)
            for g, i in enumerate(idx):
                cs = list(choices[i])
                rows[i] = {"query": queries[i], "choices": cs, "logprob": s.logprob[g],
                           "normalized": s.normalized[g], "prediction": by_sum[g],
                           "prediction_normalized": by_norm[g], "answer": cs[by_norm[g] if normalize else by_sum[g]]}
        return rows

    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop_at_eos: bool = True) -> str:
        """Continue `prompt` after the tuned prefix (greedy at temperature 0, else nucleus sampling).

        The prompt is tokenised without special tokens and sits right after the prefix, as a scored query
        does; the returned text is the continuation only (the end-of-sequence token is not included).
        """
        return self.lm.tokenizer.decode(self.generate_tokens(prompt, max_new_tokens, temperature, top_p, seed,
                                                             stop_at_eos))

    def generate_tokens(self, prompt: str | Sequence[int], max_new_tokens: int = 64, temperature: float = 0.0,
                        top_p: float = 1.0, seed: int | None = None, stop_at_eos: bool = True,
                        stop=None, observe=None) -> list[int]:
        """`generate`, returning the new token ids instead of text.

        prompt may also be token ids (used as given, after the prefix). stop: optional function of the new ids
        so far; generation ends (keeping the last token) as soon as it returns True, e.g. on a stop string.
        observe: optional function called with (token id, logits (V,)) for every token chosen, the
        end-of-sequence token included, before it is kept (e.g. for its log-probability, or to stream it).
        """
        return _generate(self, prompt, max_new_tokens, temperature, top_p, seed, stop_at_eos, stop, observe)

    def token_logprobs(self, seqs: Sequence[Sequence[int]], top_k: int = 0, batch_size: int = 16) -> list[dict]:
        """Each token's log-probability after this prefix and the tokens before it (scoring.token_logprobs):
        what an OpenAI completion with `echo` reports for its prompt."""
        limit = kv.max_positions(self.lm.config)
        clean = []
        for i, s in enumerate(seqs):
            s = [int(x) for x in s]
            if not s:
                raise ValueError(f"sequence {i} is empty: give at least one token")
            if limit is not None and self.length + len(s) > limit:
                raise ValueError(f"sequence {i} needs {self.length} prefix + {len(s)} tokens, beyond the model's "
                                 f"{limit} positions: shorten it")
            clean.append(s)
        return scoring.token_logprobs(self.lm.model, self.prefix, clean, top_k, batch_size) if clean else []

    def save(self, path, overwrite: bool = False) -> Path:
        """Write safetensors + JSON to the folder `path` (atomically: temporary folder, then rename).

        `path` must not exist, or be an empty folder; a folder holding an earlier context is replaced only
        with overwrite=True, and any other existing folder is refused.
        """
        return _save(self, path, overwrite)

    @staticmethod
    def load(path, lm, device=None) -> "TunedContext":
        """Read a saved context for `lm`; refuses another model, tokenizer or dtype and altered or hostile files
        (a ContextError naming the file and the field). A context that needs its peft adapter in the model (lora,
        lora_icl, ia3) puts it into lm.model, in place: that model then answers for this context alone (a model
        that already holds an adapter is refused)."""
        return _load(path, lm, device)

    @staticmethod
    def read_config(path) -> dict:
        """The checked context.json of a saved context (its tensors unread, their header checked): e.g. to learn
        its model before loading it."""
        return read_config(path)


@torch.inference_mode()
def zero_shot(lm) -> TunedContext:
    """The no-demonstrations baseline: a prefix of only the tokenizer's own special tokens (e.g. BOS)."""
    ids = lm.tokenizer("").input_ids
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    if ids:
        keys, values = kv.encode(lm.model, torch.tensor([ids], device=lm.device))
    return TunedContext(lm, list(keys), list(values), ids, config=None, demonstrations="", steps_done=0)


TENSORS = "context.safetensors"
CONFIG = "context.json"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_output_dir(path, overwrite: bool = False) -> Path:
    """Raise a clear error unless a context may be written to `path`; returns it as a Path.

    Allowed: a path that does not exist, an empty folder, or (only with overwrite) a folder holding a
    saved context. The parent folder is created if needed and must be writable.
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir():
            raise FileExistsError(f"{path} exists and is not a folder: choose a new output directory")
        if any(path.iterdir()):
            if not (path / CONFIG).is_file():
                raise FileExistsError(f"{path} exists, is not empty and does not hold a deepthink context: "
                                      "choose a new output directory (it is never overwritten)")
            if not overwrite:
                raise FileExistsError(f"{path} already holds a tuned context: pass --overwrite "
                                      "(overwrite=True) to replace it, or choose a new output directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.probe-"))
    except OSError as e:
        raise OSError(f"cannot write the context to {path}: {path.parent} is not writable "
                      f"({e.strerror or e}); choose another output directory") from e
    return path



def model_record(lm) -> dict:
    """What context.json records of the model (checked against the model on load)."""
    return {"name": lm.name, "source": lm.source, "fingerprint": lm.fingerprint,
            "tokenizer_fingerprint": lm.tokenizer_fingerprint, "model_type": lm.config.model_type,
            "max_positions": kv.max_positions(lm.config), "sliding_window": kv.sliding_window(lm.config)}

def _save(ctx: TunedContext, path, overwrite: bool = False) -> Path:
    """Write `path/` atomically: both files to a temporary folder beside it, then one rename.

    The tensors are written first and context.json (holding their checksum) last, so a folder left by a
    killed process has no context.json, or a complete one; it also keeps its temporary name.
    """
    from safetensors.torch import save

    dtype = _dtype_name(ctx.lm.dtype)
    if dtype not in DTYPES:
        raise ValueError(f"a context is saved in {', '.join(DTYPES)}; the model is in {dtype}: load it in one of those")
    path = check_output_dir(path, overwrite)
    try:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    except OSError as e:
        raise OSError(f"cannot write the context to {path} ({e.strerror or e}): choose a writable directory") from e
    old = None
    try:
        tensors = {f"{kind}.{i}": t[0].detach().contiguous().cpu()
                   for kind, ts in (("k", ctx.keys), ("v", ctx.values)) for i, t in enumerate(ts)}
        blob = save(tensors)
        write_synced(tmp / TENSORS, lambda f: f.write(blob))
        adapter = None
        if ctx.adapter is not None:
            adapter = _save_adapter(ctx.adapter, tmp / ADAPTER_DIR)
        lm = ctx.lm
        meta = {
            "format_version": FORMAT_VERSION if adapter is None else ADAPTER_FORMAT,
            "deepthink_version": __version__,
            "model": model_record(lm),
            "dtype": dtype,
            "tuning": ctx.config.to_dict() if ctx.config else None,
            "origin": ctx.origin,
            **({"method": ctx.method} if ctx.method is not None else {}),
            "steps_done": ctx.steps_done,
            "stopped": ctx.stopped,
            "demonstrations": ctx.demonstrations,
            "prefix_ids": ctx.prefix_ids,
            "tokens": ctx.length,
            "layers": len(ctx.keys),
            "history": ctx.history,
            "tensors": {name: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)} for name, t in tensors.items()},
            "checksums": {TENSORS: sha256_bytes(blob)},
            "task": task_definition(ctx.task) if ctx.task is not None else None,
            **({"adapter": adapter} if adapter is not None else {}),
        }
        meta = json.loads(json.dumps(meta))       # exactly what a reader parses (tuples as lists, ...)
        meta["json_sha256"] = json_sha256(meta)
        try:
            check_meta(meta, path / CONFIG)       # never write what load would refuse
        except ContextError as e:
            raise ContextError(e.path, e.field, f"{e.problem} (not saved: loading would refuse it)") from None
        text = _dumps(meta)
        write_synced(tmp / CONFIG, lambda f: f.write(text.encode("utf-8")))
        if path.exists():            # an empty folder, or an earlier context (overwrite=True, checked above)
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, old):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    return path


def _save_adapter(adapter, folder: Path) -> dict:
    """Write the adapter's files (peft's format) into `folder`; -> context.json's "adapter" record."""
    from .adapter import FILES

    folder.mkdir()
    adapter.write(folder)
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise OSError(f"peft wrote no {', '.join(missing)} for the adapter: nothing was saved")
    return {"peft_version": adapter.peft_version, "in_model": adapter.in_model,
            "sha256": {name: sha256_bytes((folder / name).read_bytes()) for name in FILES}}


def _dumps(meta: dict) -> str:
    """Indented JSON with every list of plain numbers on one line (a raw newline never occurs in a string)."""
    text = json.dumps(meta, indent=1, ensure_ascii=False)
    return re.sub(r"\[\n([^\[\]{}\"]*?)\n\s*\]", lambda m: "[" + ", ".join(x.strip() for x in m[1].split(",")) + "]",
                  text) + "\n"


def read_config(path) -> dict:
    """context.json of a saved context, checked field by field (context_schema.check_meta), its digest verified,
    and the tensor file's header checked against it; the tensors themselves are not read."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no saved context at {path}: expected a folder written by `deepthink tune --out` "
                                "or TunedContext.save")
    if not (path / CONFIG).is_file():
        raise FileNotFoundError(f"{path / CONFIG} not found: {path} is not a (complete) saved deepthink context; "
                                "re-run `deepthink tune`")
    meta = read_json(path / CONFIG)
    check_meta(meta, path / CONFIG)
    tensor_file = path / TENSORS
    if not tensor_file.is_file():
        raise FileNotFoundError(f"{tensor_file} is missing: the artifact is incomplete; re-run `deepthink tune`")
    check_tensor_header(tensor_file, meta)
    if meta.get("adapter") is not None:
        from .adapter import FILES

        for name in FILES:
            if not (path / ADAPTER_DIR / name).is_file():
                raise FileNotFoundError(f"{path / ADAPTER_DIR / name} is missing: the context's peft adapter is "
                                        "incomplete; re-run `deepthink tune`")
    return meta


def context_task(meta: dict, path=""):
    """The tasks.Task a checked context.json embeds (format 2), else None."""
    return task_from_definition(meta["task"], Path(path) / CONFIG) if meta.get("task") is not None else None


def _load(path, lm, device=None) -> TunedContext:
    """Read a saved context, refusing anything made for another model, tokenizer or dtype, or altered."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    meta = read_config(path)
    if meta["format_version"] < 2:
        warnings.warn(f"{path / CONFIG} has no json_sha256 (context format 1, saved before deepthink checked "
                      "context.json itself): edits to it cannot be detected; re-save it to add one "
                      "(TunedContext.load(...).save(new folder)) or re-run `deepthink tune`",
                      UnverifiedContextWarning, stacklevel=3)
    if holds_adapter(lm.model):
        raise ValueError(f"the model {lm.name!r} already holds a peft adapter (put in by another context's load or "
                         f"by deepthink.tune): {path} needs the model as it was loaded; load the model again for it")
    m = meta["model"]
    dtype = _dtype_name(lm.dtype)
    if meta["dtype"] != dtype:
        raise ValueError(f"{path} was tuned in {meta['dtype']}, but the model is loaded in {dtype}: "
                         f"load it with --dtype {meta['dtype']} (dtype=torch.{meta['dtype']})")
    if m["fingerprint"] != lm.fingerprint:
        raise ValueError(f"{path} was made for model {m['name']!r} (weights fingerprint {m['fingerprint'][:16]}), "
                         f"but the loaded model {lm.name!r} has fingerprint {lm.fingerprint[:16]}: load the model "
                         f"the context was tuned with ({m['source']})")
    if m["tokenizer_fingerprint"] != lm.tokenizer_fingerprint:
        raise ValueError(f"{path} was made with tokenizer fingerprint {m['tokenizer_fingerprint'][:16]}, but the "
                         f"loaded tokenizer has {lm.tokenizer_fingerprint[:16]}: load the tokenizer of "
                         f"{m['name']!r} that the context was tuned with")
    n = meta["layers"]
    model_layers = getattr(lm.config, "num_hidden_layers", None)
    if n and isinstance(model_layers, int) and n != model_layers:
        raise ContextError(path / CONFIG, "layers", f"{n}, but the model {lm.name!r} has {model_layers} layers: "
                                                    "the artifact is damaged; re-run `deepthink tune`")
    vocab = max(len(lm.tokenizer), getattr(lm.config, "vocab_size", 0) or 0)
    beyond = next((i for i, x in enumerate(meta["prefix_ids"]) if x >= vocab), None)
    if beyond is not None:
        raise ContextError(path / CONFIG, f"prefix_ids[{beyond}]", f"{meta['prefix_ids'][beyond]} is beyond the "
                           f"model's {vocab} tokens: the artifact is damaged; re-run `deepthink tune`")
    tensor_file = path / TENSORS
    blob = tensor_file.read_bytes()
    digest, want = sha256_bytes(blob), meta["checksums"][TENSORS]
    if digest != want:
        raise ValueError(f"{tensor_file} is altered or truncated: its sha256 is {digest[:16]}, context.json records "
                         f"{want[:16]} ({len(blob)} bytes now); re-run `deepthink tune`")
    try:
        tensors = load(blob)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{tensor_file} cannot be read as safetensors ({e}): re-run `deepthink tune`") from e
    found = {name: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)} for name, t in tensors.items()}
    recorded = meta["tensors"]
    diff = sorted(k for k in set(found) | set(recorded) if found.get(k) != recorded.get(k))
    if diff:         # the header was checked; this only guards against a safetensors that reads differently
        raise ValueError(f"{tensor_file} does not match {CONFIG}: " + "; ".join(
            f"{k}: expected {recorded.get(k) or 'no such tensor'}, found {found.get(k) or 'nothing'}" for k in diff[:4])
            + "; re-run `deepthink tune`")
    adapter = None
    if meta.get("adapter") is not None:
        from .adapter import copied, put_into, read_files

        record = meta["adapter"]
        files = read_files(path / ADAPTER_DIR, record)            # checked against context.json's sha256
        if record["in_model"]:
            put_into(lm, path / ADAPTER_DIR, files, str(path))
        adapter = copied(files, record)
    target = torch.device(device) if device is not None else lm.device
    keys = [tensors[f"k.{i}"][None].to(target) for i in range(n)]           # (1, kv_heads, L, head_dim)
    values = [tensors[f"v.{i}"][None].to(target) for i in range(n)]
    config = TuningConfig.from_dict(meta["tuning"]) if meta["tuning"] else None
    return TunedContext(lm, keys, values, meta["prefix_ids"], config=config, demonstrations=meta["demonstrations"],
                        steps_done=meta["steps_done"], history=meta["history"], stopped=meta["stopped"],
                        origin=meta.get("origin"), method=meta.get("method"), task=context_task(meta, path),
                        adapter=adapter)


# generation's sampling rule, shared by the library, /v1/generate and `deepthink generate`: temperature is 0
# (greedy) or in [MIN_TEMPERATURE, MAX_TEMPERATURE]; top_p is in [MIN_TOP_P, 1]. Below the minimums sampling is
# greedy in all but name, and far below them the division by the temperature overflows (1e-45) or the nucleus keeps no token (1e-300).
MIN_TEMPERATURE, MAX_TEMPERATURE, MIN_TOP_P = 1e-3, 100.0, 1e-3


def sampling_problem(temperature, top_p) -> tuple[str, str] | None:
    """(parameter, what is wrong with it) when (temperature, top_p) cannot be sampled with; None when fine."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            temperature == 0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
        return "temperature", (f"must be 0 (greedy) or between {MIN_TEMPERATURE:g} and {MAX_TEMPERATURE:g}, "
                               f"got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not MIN_TOP_P <= top_p <= 1:
        return "top_p", f"must be between {MIN_TOP_P:g} and 1 (1 = no nucleus cut), got {top_p!r}"
    return None


@torch.inference_mode()
def _generate(ctx: TunedContext, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
              top_p: float = 1.0, seed: int | None = None, stop_at_eos: bool = True, stop=None,
              observe=None) -> list[int]:
    """New token ids continuing `prompt` after the tuned prefix: greedy at temperature 0, else nucleus sampling."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    bad = sampling_problem(temperature, top_p)
    if bad:
        raise ValueError(f"{bad[0]} {bad[1]}")
    lm = ctx.lm
    if isinstance(prompt, str):
        ids = lm.tokenizer(prompt, add_special_tokens=False).input_ids
    elif isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
    else:
        raise ValueError(f"the prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    if not ids:
        raise ValueError("the prompt tokenises to nothing: give a non-empty prompt")
    limit = kv.max_positions(lm.config)
    if limit is not None and ctx.length + len(ids) + max_new_tokens > limit:
        raise ValueError(f"{ctx.length} prefix + {len(ids)} prompt + {max_new_tokens} new tokens exceed the "
                         f"model's {limit} positions: lower --max-new-tokens or shorten the prompt")
    gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
    kwargs = {"logits_to_keep": 1} if _takes_logits_to_keep(lm.model) else {}
    cache = kv.build_cache(lm.model, *ctx.prefix)
    x = torch.tensor([ids], device=lm.device)                                  # (1, T), then (1, 1)
    out_ids: list[int] = []
    eos = lm.tokenizer.eos_token_id
    for _ in range(max_new_tokens):
        out = lm.model(x, **kv.cache_kwarg(lm.model, cache), use_cache=True, **kwargs)
        cache = kv.output_cache(out)
        logits = out.logits[0, -1].float()                                     # (V,)
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            probs = (logits / temperature).softmax(-1).cpu()
            sorted_p, idx = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < top_p                       # always keeps the top token
            sorted_p = sorted_p * keep
            nxt = int(idx[torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=gen)])
        if observe is not None:
            observe(nxt, logits)
        if stop_at_eos and nxt == eos:
            break
        out_ids.append(nxt)
        if stop is not None and stop(out_ids):
            break
        x = torch.tensor([[nxt]], device=lm.device)
    return out_ids


def _takes_logits_to_keep(model) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters
