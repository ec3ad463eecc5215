"""What a saved context's files may hold, checked before anything is allocated or a model is loaded.

`read_json` parses context.json without blowing up (bounded size, nesting, no NaN, no duplicate keys);
`check_meta` checks every field's type, range and agreement with the others; `check_tensor_header` reads
the safetensors header (never the tensors) and checks each tensor's name, dtype, shape and byte range
against the JSON; `json_sha256` is the integrity digest over the JSON's content. Every refusal is a
`ContextError` naming the file and the field. Format versions:

    1  no digest: still loads, with an `UnverifiedContextWarning` (its edits cannot be detected)
    2  "json_sha256" (sha256 of the canonical JSON of every other field; it covers the tensors through
       "checksums") and "task" (the task definition the context was tuned on, or null)
    3  "adapter": a peft adapter saved beside the cache (the folder adapter/, deepthink/adapter.py) and its files'
       sha256; written only for a context that carries one (a peft baseline's), every other context is format 2
"""
from __future__ import annotations

import json
import math
import re
import string
from pathlib import Path

FORMAT_VERSION = 2          # what a context without an adapter is written as
ADAPTER_FORMAT = 3          # ... and one with an adapter; the newest this deepthink reads
DTYPES = ("float32", "bfloat16", "float16")             # what a context is saved and loaded in
SAFETENSORS_DTYPES = {"F32": ("float32", 4), "BF16": ("bfloat16", 2), "F16": ("float16", 2)}
MAX_JSON_BYTES = 32 << 20       # context.json: prefix ids, per-step norms and the demonstration text
MAX_HEADER_BYTES = 16 << 20     # the safetensors header (JSON)
MAX_LAYERS = 10_000
MAX_TOKENS = 10_000_000
MAX_STEPS = 1_000_000
MAX_DIM = 1 << 20
MAX_NAME = 4096

REQUIRED = ("format_version", "model", "dtype", "tuning", "steps_done", "stopped", "demonstrations", "prefix_ids",
            "tokens", "layers", "history", "tensors", "checksums")
OPTIONAL = ("deepthink_version", "origin", "method")
ADDED_IN_2 = ("json_sha256", "task")
ADDED_IN_3 = ("adapter",)
ADAPTER_KEYS = ("peft_version", "in_model", "sha256")
MODEL_REQUIRED = ("name", "source", "fingerprint", "tokenizer_fingerprint")
MODEL_OPTIONAL = ("model_type", "max_positions", "sliding_window")
ORIGIN_KEYS = ("task", "seed", "shots", "demos_file")
HISTORY_KEYS = ("step", "dk", "dv", "loss", "batch", "lr", "grad_norm")   # lr, grad_norm: gradient updates
METHOD_KEYS = ("name", "options", "selection")
# methods whose cache `deepthink tune` saves (tuning.gradient.METHOD_NAME, methods/ctkv.py, methods/peft_baselines.py)
SAVING_METHODS = ("grad_kv", "ct_kv", "lora", "lora_icl", "ia3", "prefix", "prompt", "cpt")
IN_MODEL = ("lora", "lora_icl", "ia3")                      # their cache and scores need the adapter in the model
PEFT_SAVED = (*IN_MODEL, "prefix", "prompt", "cpt")           # contexts that carry a peft adapter
# task fields that do not change how a row becomes a query and its choices (compared when --task is also given)
TASK_NOT_FORMAT = ("name", "description", "hf_dataset", "hf_config", "hf_splits", "data_files", "sampling",
                   "scored_subset", "demo_pool", "quirks", "deviations")
HEX64 = re.compile(r"[0-9a-f]{64}")
# a model's weights fingerprint: the sha256 of its weights, or of the GGUF file it was loaded from (models.py)
FINGERPRINT = re.compile(r"(gguf-sha256:)?[0-9a-f]{64}")
TENSOR_NAME = re.compile(r"([kv])\.(0|[1-9][0-9]{0,5})")
RESAVE = "re-run `deepthink tune`"


class ContextError(ValueError):
    """A saved context refused on reading: `path` is the file, `field` the field (dotted) that is wrong.

    ContextError("message") also works (path and field None), so that callers may re-raise with more context
    as `type(e)(f"context {name!r}: {e}")`."""

    def __init__(self, path, field: str | None = None, problem: str | None = None):
        if problem is None:
            self.path, self.field, self.problem = None, None, str(path)
            super().__init__(str(path))
            return
        self.path, self.field, self.problem = Path(path), field, problem
        super().__init__(f"{path}: {field}: {problem}" if field else f"{path}: {problem}")


class UnverifiedContextWarning(UserWarning):
    """A context saved before context.json carried its own digest: edits to it cannot be detected."""


def show(value, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters: a hostile value never floods a message (and never holds a newline)."""
    try:
        text = repr(value) if not isinstance(value, (dict, list)) else json.dumps(value, ensure_ascii=True)
    except (RecursionError, ValueError):
        text = f"a {type(value).__name__} nested too deeply"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _clip(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---------------------------------------------------------------- parsing

def read_json(path, what: str = "context.json"):
    """Parse a JSON file of at most MAX_JSON_BYTES; damage, deep nesting, NaN or repeated keys are a ContextError."""
    path, limit = Path(path), MAX_JSON_BYTES
    try:
        size = path.stat().st_size
        if size > limit:
            raise ContextError(path, None, f"is {size} bytes, more than any {what} ({limit} bytes): "
                                           f"not a deepthink context; {RESAVE}")
        return parse_json(path.read_bytes(), path)
    except OSError as e:
        raise ContextError(path, None, f"cannot be read ({e.strerror or e})") from None


def parse_json(data: bytes, path):
    def no_constants(name):
        raise ValueError(f"{name} is not a JSON number")

    def no_repeats(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                raise ValueError(f"key {show(k)} appears twice in one object")
            out[k] = v
        return out

    try:
        return json.loads(data.decode("utf-8"), parse_constant=no_constants, object_pairs_hook=no_repeats)
    except RecursionError:
        raise ContextError(path, None, f"cannot be read as JSON (nested too deeply): the artifact is damaged; "
                                       f"{RESAVE}") from None
    except ValueError as e:     # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
        raise ContextError(path, None, f"cannot be read as JSON ({_clip(e, 160)}): the artifact is damaged; "
                                       f"{RESAVE}") from None


def json_sha256(meta: dict) -> str:
    """sha256 of the canonical JSON of `meta` without its "json_sha256" field: keys sorted, no spaces, ASCII."""
    import hashlib

    body = {k: v for k, v in meta.items() if k != "json_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


# ---------------------------------------------------------------- the schema

def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return (_is_int(x) or isinstance(x, float)) and math.isfinite(x)


class _Check:
    def __init__(self, file):
        self.file = file

    def fail(self, field, problem):
        raise ContextError(self.file, field, problem)

    def int(self, field, x, lo, hi, what=""):
        if not _is_int(x) or not lo <= x <= hi:
            self.fail(field, f"{show(x)} is not an integer in {lo}..{hi}{what}")
        return x

    def text(self, field, x, limit=MAX_NAME, line=True, null=False, empty=True):
        if x is None and null:
            return x
        if not isinstance(x, str) or len(x) > limit or (not empty and not x) or (
                line and any(c < " " or c == "\x7f" for c in x)):
            kind = "a one-line string" if line else "a string"
            self.fail(field, f"{show(x)} is not {'a non-empty ' + kind[2:] if not empty else kind} of at most "
                             f"{limit} characters{' (or null)' if null else ''}")
        return x

    def keys(self, field, d, allowed, required=()):
        if not isinstance(d, dict):
            self.fail(field, f"{show(d)} is not a JSON object")
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            self.fail(field, f"unknown key(s) {show(unknown)}; valid: {', '.join(allowed)}")
        missing = [k for k in required if k not in d]
        if missing:
            self.fail(field, f"lacks key(s) {missing}")
        return d

    def numbers(self, field, xs, n=None, nullable=False):
        if not isinstance(xs, list) or (n is not None and len(xs) != n) or not all(
                _is_number(x) or (nullable and x is None) for x in xs):
            self.fail(field, f"{show(xs)} is not a list of {'' if n is None else f'{n} '}finite numbers"
                             + (" (or nulls)" if nullable else ""))


def check_meta(meta, file) -> int:
    """Raise a ContextError unless `meta` (a parsed context.json) is one this deepthink wrote; returns its format
    version. Checks types, ranges and cross-field agreement; nothing is allocated beyond `meta` itself."""
    try:
        return _check_meta(meta, _Check(file))
    except RecursionError:      # a value nested just below the parser's limit, met by a repr in a message
        raise ContextError(file, None, f"holds a value nested too deeply: the artifact is damaged; {RESAVE}") from None


def _check_meta(meta, c: "_Check") -> int:
    if not isinstance(meta, dict):
        c.fail(None, f"holds {type(meta).__name__}, expected a JSON object: not a deepthink context")
    version = meta.get("format_version")
    if not _is_int(version) or version < 1:
        c.fail("format_version", f"{show(version)} is not one deepthink knows (expected an integer "
                                 f"1..{FORMAT_VERSION}): not a deepthink context")
    if version > ADAPTER_FORMAT:
        made = meta.get("deepthink_version")
        made = made if isinstance(made, str) and len(made) < 40 else "a newer deepthink"
        c.fail("format_version", f"context format version {version} is newer than the {ADAPTER_FORMAT} this "
                                 f"deepthink reads (it was written by deepthink {made}): upgrade deepthink")
    added = (ADDED_IN_2 if version >= 2 else ()) + (ADDED_IN_3 if version >= 3 else ())
    missing = [k for k in REQUIRED + added if k not in meta]
    model = meta.get("model")
    missing += [f"model.{k}" for k in MODEL_REQUIRED if not isinstance(model, dict) or k not in model]
    if missing:
        c.fail(None, f"lacks field(s) {missing}: the artifact is damaged; {RESAVE}")
    unknown = sorted(set(meta) - set(REQUIRED + OPTIONAL + added))
    if unknown:
        c.fail(show(unknown[0], 40).strip("'"), f"is not a field of context format version {version}"
               + (" (a digest or task in a version-1 file: the file was altered)" if set(unknown) & set(ADDED_IN_2)
                  else "") + f": the artifact is damaged; {RESAVE}")

    c.text("deepthink_version", meta.get("deepthink_version", ""), limit=100)
    _check_model(c, model)
    if meta["dtype"] not in DTYPES:
        c.fail("dtype", f"{show(meta['dtype'])} is not a dtype contexts are saved in; allowed: {', '.join(DTYPES)}")
    steps_cap = _check_how(c, meta)
    origin = meta.get("origin")
    if origin is not None:
        c.keys("origin", origin, ORIGIN_KEYS)
        c.text("origin.task", origin.get("task"), null=True, empty=False)
        c.text("origin.demos_file", origin.get("demos_file", ""))
        if "seed" in origin:
            c.int("origin.seed", origin["seed"], -(1 << 63), (1 << 64) - 1)
        if "shots" in origin:
            c.int("origin.shots", origin["shots"], 0, MAX_STEPS)
    steps = c.int("steps_done", meta["steps_done"], 0, steps_cap[0], steps_cap[1])
    c.text("stopped", meta["stopped"], limit=10_000, null=True)
    if not isinstance(meta["demonstrations"], str):
        c.fail("demonstrations", f"{show(meta['demonstrations'])} is not a string")

    limit = model.get("max_positions") or MAX_TOKENS
    tokens = c.int("tokens", meta["tokens"], 0, limit, " (the model's positions)" if limit != MAX_TOKENS else "")
    ids = meta["prefix_ids"]
    if not isinstance(ids, list) or len(ids) != tokens:
        what = f"holds {len(ids)} ids" if isinstance(ids, list) else f"{show(ids)} is not a list"
        c.fail("prefix_ids", f"{what}, but tokens is {tokens}")
    bad = next((i for i, x in enumerate(ids) if not _is_int(x) or not 0 <= x < 1 << 31), None)
    if bad is not None:
        c.fail(f"prefix_ids[{bad}]", f"{show(ids[bad])} is not a token id (an integer >= 0)")
    layers = c.int("layers", meta["layers"], 0, MAX_LAYERS)
    if (layers == 0) != (tokens == 0):
        c.fail("layers", f"{layers} layers for {tokens} tokens: a context has tensors exactly when it has tokens")
    _check_tensors(c, meta["tensors"], layers, tokens, meta["dtype"])
    _check_history(c, meta["history"], steps, layers)
    c.keys("checksums", meta["checksums"], ("context.safetensors",), ("context.safetensors",))
    if not isinstance(meta["checksums"]["context.safetensors"], str) or \
            not HEX64.fullmatch(meta["checksums"]["context.safetensors"]):
        c.fail("checksums.context.safetensors", f"{show(meta['checksums']['context.safetensors'])} is not a sha256 "
                                                "(64 hexadecimal digits)")
    if version >= 2:
        task = meta["task"]
        if task is not None:
            task_from_definition(task, c.file)
            named = origin.get("task") if isinstance(origin, dict) else None
            if isinstance(named, str) and not named.endswith((".yaml", ".yml", ".json")) and named != task.get("name"):
                c.fail("origin.task", f"{show(named)}, but the embedded task definition is {show(task.get('name'))}")
        digest = meta["json_sha256"]
        if not isinstance(digest, str) or not HEX64.fullmatch(digest):
            c.fail("json_sha256", f"{show(digest)} is not a sha256 (64 hexadecimal digits)")
        if json_sha256(meta) != digest:
            c.fail("json_sha256", f"the content's sha256 is {json_sha256(meta)[:16]}, the file records {digest[:16]}: "
                                  f"context.json was altered after it was saved; {RESAVE}")
    return version


def check_model(record: dict, file="context.json") -> None:
    """The "model" record a context of this model would carry, checked as loading checks it: run before tuning, so
    that hours of tuning never end in a save that refuses the model's own record."""
    _check_model(_Check(file), record)


def _check_model(c: _Check, m: dict) -> None:
    c.keys("model", m, MODEL_REQUIRED + MODEL_OPTIONAL)
    c.text("model.name", m["name"], empty=False)
    c.text("model.source", m["source"], empty=False)
    if not isinstance(m["fingerprint"], str) or not FINGERPRINT.fullmatch(m["fingerprint"]):
        c.fail("model.fingerprint", f"{show(m['fingerprint'])} is not a fingerprint (a sha256: 64 hexadecimal "
                                    "digits, or 'gguf-sha256:' and one for a model loaded from a GGUF file)")
    if not isinstance(m["tokenizer_fingerprint"], str) or not HEX64.fullmatch(m["tokenizer_fingerprint"]):
        c.fail("model.tokenizer_fingerprint", f"{show(m['tokenizer_fingerprint'])} is not a sha256 (64 hexadecimal "
                                              "digits)")
    c.text("model.model_type", m.get("model_type"), limit=100, null=True)
    for k in ("max_positions", "sliding_window"):
        if m.get(k) is not None:
            c.int(f"model.{k}", m[k], 1, MAX_TOKENS)


def _check_how(c: _Check, meta: dict) -> tuple[int, str]:
    """tuning / method; returns the largest steps_done they allow and what sets it."""
    from .tuning.config import TuningConfig

    tuning, method = meta["tuning"], meta.get("method")
    if meta.get("adapter") is not None and (tuning is not None or not isinstance(method, dict)):
        c.fail("adapter", "is set, but no peft baseline made this context (its method record says which)")
    if tuning is not None:
        if method is not None:
            c.fail("method", "is set together with tuning: a context is made by forward tuning (tuning) or by a "
                             "method (method), not both")
        if not isinstance(tuning, dict):
            c.fail("tuning", f"{show(tuning)} is not a JSON object (or null)")
        try:
            config = TuningConfig.from_dict(tuning)
        except (ValueError, TypeError) as e:
            c.fail("tuning", _clip(e))
        return config.steps, f" (tuning.steps is {config.steps})"
    if method is None:
        return MAX_STEPS, ""
    c.keys("method", method, METHOD_KEYS, ("name", "options"))
    if method["name"] not in SAVING_METHODS:
        c.fail("method.name", f"{show(method['name'])} is not a method that saves contexts; valid: "
                              f"{', '.join(SAVING_METHODS)} (forward tuning records 'tuning' instead)")
    # the options' own class (e.g. GradientConfig) lives above this module (it imports TunedContext), so they are
    # checked for shape here: a flat object of plain values, whose "steps" bounds steps_done
    options = method["options"]
    if not isinstance(options, dict) or len(options) > 100 or not all(
            k.isidentifier() and len(k) <= 100 and _is_plain(v) for k, v in options.items()):
        c.fail("method.options", f"{show(options)} is not an object of option names and plain values")
    if method["name"] == "ct_kv":      # epochs E: steps 1 (plain ICL, epoch 0) .. E + 1
        cap = c.int("method.options.epochs", options.get("epochs"), 1, MAX_STEPS - 1) + 1
    else:                              # grad_kv: T in 1..steps; a peft baseline: updates in 0..steps
        cap = c.int("method.options.steps", options.get("steps"), 1, MAX_STEPS)
    _check_adapter(c, meta, method["name"])
    selection = method.get("selection")
    if selection is not None:
        if not isinstance(selection, dict) or len(selection) > 100 or not all(
                _is_plain(v) or (isinstance(v, list) and len(v) <= MAX_STEPS and all(
                    x is None or _is_number(x) for x in v)) for v in selection.values()):
            c.fail("method.selection", f"{show(selection)} is not an object of plain values and lists of numbers")
        c.text("method.selection.rule", selection.get("rule", ""), limit=100)
        level = selection.get("level")        # the guarded rules' threshold (dev-mcnemar, dev-bootstrap)
        if level is not None and not (_is_number(level) and 0 < level < 1):
            c.fail("method.selection.level", f"{show(level)} is not a number between 0 and 1 (exclusive)")
        if "chosen_steps" in selection:
            c.int("method.selection.chosen_steps", selection["chosen_steps"], 0, cap)
            if selection["chosen_steps"] != meta["steps_done"]:
                c.fail("steps_done", f"{show(meta['steps_done'])}, but method.selection.chosen_steps is "
                                     f"{selection['chosen_steps']}")
    return cap, (f" (method.options.epochs is {cap - 1})" if method["name"] == "ct_kv" else
                 f" (method.options.steps is {cap})")


def _check_adapter(c: _Check, meta: dict, name: str) -> None:
    """A peft baseline's context carries its adapter (format 3), and no other context does."""
    adapter = meta.get("adapter")
    if name not in PEFT_SAVED:
        if adapter is not None:
            c.fail("adapter", f"is set, but method {name} saves no peft adapter")
        return
    if adapter is None:
        c.fail("adapter", f"is missing: method {name} saves its peft adapter (format {ADAPTER_FORMAT}); {RESAVE}")
    c.keys("adapter", adapter, ADAPTER_KEYS, ADAPTER_KEYS)
    c.text("adapter.peft_version", adapter["peft_version"], limit=100, empty=False)
    if adapter["in_model"] is not (name in IN_MODEL):
        c.fail("adapter.in_model", f"{show(adapter['in_model'])}, but method {name} "
                                   + ("needs" if name in IN_MODEL else "does not need") + " its adapter in the model")
    from .adapter import FILES

    c.keys("adapter.sha256", adapter["sha256"], FILES, FILES)
    for k, v in adapter["sha256"].items():
        if not isinstance(v, str) or not HEX64.fullmatch(v):
            c.fail(f"adapter.sha256.{k}", f"{show(v)} is not a sha256 (64 hexadecimal digits)")


def _is_plain(v) -> bool:
    """null, true/false, a finite number or a one-line string of at most 1000 characters."""
    return v is None or isinstance(v, bool) or _is_number(v) or (
        isinstance(v, str) and len(v) <= 1000 and not any(c < " " for c in v))


def _check_history(c: _Check, history, steps: int, layers: int) -> None:
    if not isinstance(history, list) or len(history) not in (0, steps):
        what = f"holds {len(history)} steps" if isinstance(history, list) else f"{show(history)} is not a list"
        c.fail("history", f"{what}, but steps_done is {steps} (expected {steps} entries, or none)")
    for i, h in enumerate(history):
        where = f"history[{i}]"
        c.keys(where, h, HISTORY_KEYS, ("step", "dk", "dv"))
        if h["step"] != i + 1 or not _is_int(h["step"]):
            c.fail(f"{where}.step", f"{show(h['step'])}, expected {i + 1}")
        for k in ("dk", "dv"):
            c.numbers(f"{where}.{k}", h[k], layers)
        for k in ("loss", "lr", "grad_norm"):
            if k in h and h[k] is not None and not _is_number(h[k]):
                c.fail(f"{where}.{k}", f"{show(h[k])} is not a finite number (or null)")
        if "batch" in h and not (isinstance(h["batch"], list) and all(_is_int(x) and x >= 0 for x in h["batch"])):
            c.fail(f"{where}.batch", f"{show(h['batch'])} is not a list of demonstration indices")


def _check_tensors(c: _Check, tensors, layers: int, tokens: int, dtype: str) -> None:
    if not isinstance(tensors, dict) or len(tensors) != 2 * layers:
        what = f"lists {len(tensors)} tensors" if isinstance(tensors, dict) else f"{show(tensors)} is not an object"
        c.fail("tensors", f"{what}, but layers is {layers} (expected k.0..k.{layers - 1} and v.0..v.{layers - 1})")
    for name, t in tensors.items():       # 2 * layers distinct names, each k.i or v.i with i < layers: exactly all
        m = TENSOR_NAME.fullmatch(name)
        if not m or int(m[2]) >= layers:
            c.fail("tensors", f"{show(name)} is not a tensor of a {layers}-layer context (k.0..k.{layers - 1}, "
                              f"v.0..v.{layers - 1})")
        c.keys(f"tensors.{name}", t, ("shape", "dtype"), ("shape", "dtype"))
        if t["dtype"] != dtype:
            c.fail(f"tensors.{name}.dtype", f"{show(t['dtype'])}, but the context's dtype is {dtype}")
        shape = t["shape"]
        if not (isinstance(shape, list) and len(shape) == 3 and all(_is_int(x) and 1 <= x <= MAX_DIM for x in shape)
                and shape[1] == tokens):
            c.fail(f"tensors.{name}.shape", f"{show(shape)} is not [kv_heads, {tokens}, head_dim] "
                                            f"(positive sizes; tokens is {tokens})")


# ---------------------------------------------------------------- the tensor file's header

def check_tensor_header(path, meta: dict) -> None:
    """Read the safetensors header of `path` (8-byte length, then JSON; the tensors are not read) and refuse any
    tensor whose name, dtype, shape or byte range disagrees with `meta["tensors"]`."""
    import struct

    path = Path(path)
    c = _Check(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if n is None or n > min(size - 8, MAX_HEADER_BYTES):
                c.fail(None, f"is not a safetensors file (header length {n} for a file of {size} bytes): "
                             f"the artifact is damaged; {RESAVE}")
            header = parse_json(f.read(n), path)
    except OSError as e:
        c.fail(None, f"cannot be read ({e.strerror or e})")
    if not isinstance(header, dict):
        c.fail(None, f"has a header of {type(header).__name__}, not a JSON object: not a safetensors file; {RESAVE}")
    header.pop("__metadata__", None)
    recorded = meta["tensors"]
    extra, lacking = sorted(set(header) - set(recorded)), sorted(set(recorded) - set(header))
    if extra or lacking:
        c.fail(None, "does not match context.json: " + (f"tensor(s) {show(extra)} not listed there" if extra else
                                                         f"tensor(s) {show(lacking)} missing") + f"; {RESAVE}")
    data = size - 8 - n
    for name, want in recorded.items():
        got = header[name]
        kind = SAFETENSORS_DTYPES.get(got.get("dtype")) if isinstance(got, dict) else None
        shape, offsets = (got.get("shape"), got.get("data_offsets")) if isinstance(got, dict) else (None, None)
        found = {"shape": shape, "dtype": kind[0] if kind else (got.get("dtype") if isinstance(got, dict) else got)}
        if found != want:
            c.fail(f"tensor {name}", f"expected {show(want, 100)}, the header has {show(found, 100)}: the file does "
                                     f"not match context.json; {RESAVE}")
        nbytes = math.prod(shape) * kind[1]
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(x) for x in offsets)
                and 0 <= offsets[0] and offsets[1] - offsets[0] == nbytes and offsets[1] <= data):
            c.fail(f"tensor {name}", f"byte range {show(offsets)} does not hold {nbytes} bytes inside the file's "
                                     f"{data} bytes of data: the artifact is damaged; {RESAVE}")


# ---------------------------------------------------------------- the embedded task definition

def task_definition(task) -> dict:
    """A Task's declared fields as JSON values (tuples as lists): what the YAML loader builds it from."""
    from dataclasses import fields

    out = {}
    for f in fields(task):
        v = getattr(task, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, dict) else v
    return out


def task_from_definition(d, file):
    """The Task a context embeds; refuses anything the YAML loader refuses, and templates with anything but
    plain {name} fields (no attribute or index access, format spec or conversion)."""
    from .tasks import _from_mapping

    c = _Check(file)
    if not isinstance(d, dict):
        c.fail("task", f"{show(d)} is not a JSON object (or null)")
    for k in ("query_template", "choice_template"):
        v = d.get(k)
        if isinstance(v, str):
            try:
                parts = list(string.Formatter().parse(v))
            except ValueError as e:
                c.fail(f"task.{k}", f"{show(v)} is not a template ({_clip(e, 80)})")
            for _, name, spec, conv in parts:
                if name is not None and (not name.isidentifier() or spec or conv):
                    c.fail(f"task.{k}", f"{show(v)}: {{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}"
                                        " is not a plain {name} field")
    try:
        return _from_mapping(d, "task", Path("."))
    except (ValueError, TypeError) as e:
        c.fail("task", _clip(str(e).removeprefix("task: ")))


def task_differences(embedded, given) -> list[str]:
    """The fields (besides name, description and data sources) in which two tasks format rows differently."""
    a, b = task_definition(embedded), task_definition(given)
    return [k for k in a if k not in TASK_NOT_FORMAT and a[k] != b.get(k)]
