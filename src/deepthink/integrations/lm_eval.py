"""deepthink as an lm-evaluation-harness model ("deepthink"): any harness task, scored after a tuned context.

    deepthink lm-eval --model_args model=smollm2-135m,steps=5 --tasks my_task --num_fewshot 4 ...
    lm_eval.simple_evaluate(model=DeepThinkLM(model="smollm2-135m", demos="demos.txt", steps=5), tasks=[...],
                            num_fewshot=0)

Where the tuned context comes from:
- explicit: `context=DIR` (a saved TunedContext, e.g. from `deepthink tune`, gradient KV tuning by default) or
  `demos=FILE` (tuned here: `method=forward` with the TuningConfig options, or `method=grad_kv` with a deepthink
  `task=` whose template the demonstrations follow and the GradKVConfig options). Every request is scored after
  it; the task runs with num_fewshot 0 (the demonstrations are ours, not the harness's).
- shared prefix (neither given): the task's own few-shot examples. With a fixed few-shot set (the harness's
  `first_n` sampler, or fixed `samples`) every request of a task starts with the same demonstrations. Per task
  the adapter encodes each request's context the harness's way, takes the longest common token prefix, cuts it
  back to the last point where its text ends with the few-shot delimiter (so it holds demonstrations only, never
  the start of a query) and leaves each request at least one token of its own; that prefix is tuned once, and
  each request's remaining context tokens and continuation are scored after it. A task whose requests share
  no such prefix is an error that says how to fix its config.

Tokenisation is the harness's (`TemplateLM._encode_pair`, the rule of its `hf` model): trailing spaces of the
context move to the continuation; context and context + continuation are encoded, the continuation is the
tokens after the context's. In the shared-prefix mode the tuned prefix plus a request's remainder is exactly
the token sequence `hf` scores, so with steps=1 (plain ICL) the log-likelihoods are `hf`'s. In the explicit mode
the context is encoded without special tokens (it follows the prefix, which holds them), as TunedContext.score
encodes queries.
"""
from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path

try:
    import lm_eval.models  # noqa: F401  (fill the harness's registry first: it imports its own models only when empty)
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import (handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs,
                                      postprocess_generated_text)
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ModuleNotFoundError as e:         # pragma: no cover - the message is the point
    raise ModuleNotFoundError(f"the lm-evaluation-harness adapter needs lm_eval ({e}): "
                              "pip install 'deepthink[lm-eval]'") from e

import deepthink
from deepthink.api import DEV_SIZE
from deepthink.methods.gradient import GradKVConfig
from deepthink.tuning import TuningConfig

log = logging.getLogger(__name__)

TUNING_ARGS = tuple(f.name for f in fields(TuningConfig))
GRAD_ARGS = tuple(f.name for f in fields(GradKVConfig)) + ("dev_size",)
METHOD_ARGS = {"forward": TUNING_ARGS, "grad_kv": GRAD_ARGS}
OTHER_ARGS = ("model", "method", "context", "demos", "task", "device", "dtype", "batch_size", "max_batch_size",
              "add_bos_token", "fewshot_delimiter", "max_length")
DEFAULT_MAX_LENGTH = 2048


def _coerce(name: str, value, default):
    """Model args arrive as strings from the command line: convert to the type of the option's default."""
    if isinstance(default, bool) or default is None or isinstance(value, type(default)):
        return value
    try:
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float):
            return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"model arg {name}={value!r}: expected {type(default).__name__}") from None
    return value


@register_model("deepthink")
class DeepThinkLM(TemplateLM):
    """An lm-evaluation-harness model backed by a deepthink model and a tuned context (see the module doc).

    model: registry name, local folder, hub id or .gguf file (deepthink.load_model), or a loaded deepthink.LM.
    context: folder of a saved context (any method's; method=, if given, must be the one that made it); demos: a
    text file of demonstrations to tune here, by method=forward (the default here; options: the TuningConfig
    fields steps, step_size, momentum, ...) or method=grad_kv (with task=T, a deepthink task whose template the
    file follows; options: the GradKVConfig fields steps, lr, selection, ... and dev_size, dev items drawn from
    T's training data). Neither: forward-tune the task's shared few-shot prefix.
    fewshot_delimiter: what ends each demonstration in the task's prompts (the harness's default "\\n\\n").
    """

    backend = "causal"

    def __init__(self, model="smollm2-135m", context: str | None = None, demos: str | None = None,
                 device: str | None = "cpu", dtype: str = "float32", batch_size=16, max_batch_size=None,
                 add_bos_token: bool | None = None, fewshot_delimiter: str = "\n\n", max_length: int | None = None,
                 method: str | None = None, task: str | None = None, **tuning):
        super().__init__()
        if method is not None and method not in METHOD_ARGS:
            raise ValueError(f"method={method!r}: valid: {', '.join(METHOD_ARGS)} (grad_kv: gradient KV tuning, the "
                             "default of `deepthink tune`; forward: the paper's forward tuning)")
        self.method = method or "forward"
        valid = METHOD_ARGS[self.method]
        unknown = sorted(set(tuning) - set(valid))
        if unknown:
            raise ValueError(f"unknown deepthink model arg(s) {unknown}; valid: {', '.join(OTHER_ARGS + valid)} "
                             f"(those of method={self.method})")
        if context is not None and demos is not None:
            raise ValueError("give either context=DIR (already tuned) or demos=FILE (tuned here), not both")
        if context is not None and tuning:
            raise ValueError(f"context={context} is already tuned; tuning options {sorted(tuning)} would be ignored: "
                             "drop them, or pass demos=FILE to tune here")
        if task is not None and (self.method != "grad_kv" or demos is None):
            raise ValueError("task= names the deepthink task whose template demos=FILE follows, for method=grad_kv "
                             "(which needs each demonstration's query and answer): drop it, or add both")
        self._grad = None
        if self.method == "grad_kv":
            if context is None and demos is None:
                raise ValueError("method=grad_kv needs each demonstration's query and answer, which the harness's "
                                 "few-shot prompts do not give: tune with `deepthink tune ... --out DIR` and pass "
                                 "context=DIR, or pass demos=FILE with task=T (a deepthink task name or .yaml file "
                                 "whose template the demonstrations follow)")
            dev_size = _coerce("dev_size", tuning.pop("dev_size", DEV_SIZE), DEV_SIZE)
            defaults = GradKVConfig()
            grad = GradKVConfig(**{**defaults.to_dict(), **{k: _coerce(k, v, getattr(defaults, k))
                                                          for k, v in tuning.items()}})   # validated before loading
            self.config = TuningConfig()
            if demos is not None:
                if task is None:
                    raise ValueError("method=grad_kv with demos=FILE needs task=T (a deepthink task name or .yaml "
                                     "file): its template splits the file into demonstrations and reads each one's "
                                     "query and answer")
                from deepthink import api

                self._grad = (grad, api.resolve(Path(demos), task=task, method="grad_kv", dev_size=dev_size,
                                                   selection=grad.selection))
                demos = None
        else:
            defaults = TuningConfig()
            tuning = {k: _coerce(k, v, getattr(defaults, k)) for k, v in tuning.items()}
            self.config = TuningConfig(**{**defaults.to_dict(), **tuning})     # validated here, before loading anything
        if demos is not None:
            demos = _read_demos(demos)                                        # before the (slow) model load
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            batch_size = 16                                                   # no probing on CPU: a fixed batch
        self.batch_size_per_gpu = _coerce("batch_size", batch_size, 16)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if not isinstance(fewshot_delimiter, str) or not fewshot_delimiter:
            raise ValueError("fewshot_delimiter must be a non-empty string (the task's fewshot_delimiter, default \\n\\n)")
        if "\\" in fewshot_delimiter:                                     # typed on a command line: \n, \t
            fewshot_delimiter = fewshot_delimiter.encode("utf-8").decode("unicode_escape").encode("latin-1").decode()
        self.fewshot_delimiter = fewshot_delimiter
        if isinstance(add_bos_token, str):
            if add_bos_token.lower() not in ("true", "false"):
                raise ValueError(f"add_bos_token={add_bos_token!r}: expected True or False")
            add_bos_token = add_bos_token.lower() == "true"
        self.add_bos_token = add_bos_token
        if isinstance(model, deepthink.LM):
            self.lm = model
        else:
            import torch

            if dtype not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"dtype={dtype!r}: valid: float32, bfloat16, float16")
            self.lm = deepthink.load_model(str(model), device=device or "cpu", dtype=getattr(torch, dtype))
        self.tokenizer = self.lm.tokenizer
        self._max_length = int(max_length) if max_length else None
        self.explicit: deepthink.TunedContext | None = None
        if context is not None:
            self.explicit = deepthink.TunedContext.load(context, self.lm)
            made = (self.explicit.method or {}).get("name", "forward")
            if method is not None and made != method:
                raise ValueError(f"context={context} was tuned by {made}, not method={method}: drop method=, or pass "
                                 f"a context tuned by {method}")
        elif self._grad is not None:
            from deepthink import api

            grad, inputs = self._grad
            for w in inputs.warnings:
                log.warning("%s", w)
            self.explicit = api.run(self.lm, inputs, "grad_kv", grad, grad.selection)
        elif demos is not None:
            self.explicit = deepthink.tune(self.lm, demos, self.config)
        self._tuned: dict[tuple[int, ...], deepthink.TunedContext] = {}     # shared prefix ids -> its context
        self.prefixes: dict[str, dict] = {}                                   # per task: the tuned prefix used

    # --- what the harness asks of a TemplateLM -------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """As `hf`: BOS, else EOS; the token put before a text that has no context of its own."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        from deepthink import kv

        return kv.max_positions(self.lm.config) or DEFAULT_MAX_LENGTH

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def device(self):
        return self.lm.device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs):
        """The `hf` model's rule: the tokenizer's default special tokens unless add_bos_token says otherwise, and
        none when the text already starts with the BOS string."""
        if add_special_tokens is not None:
            kw = {"add_special_tokens": add_special_tokens}
        elif self.add_bos_token is not None:
            kw = {"add_special_tokens": self.add_bos_token}
        else:
            kw = {}
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            kw["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **kw)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(self, requests, **kwargs):
        """Token-level requests ((context, continuation), context ids, continuation ids), scored after the
        explicit context (context ids without special tokens); what TemplateLM.loglikelihood would hand over."""
        ctx = self._explicit_or_error("token-level log-likelihood requests")
        return ctx.score_tokens([(c, t) for _, c, t in requests], batch_size=self.batch_size_per_gpu)

    # --- the three request types ---------------------------------------------------------------------------------

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        if self.explicit is not None:
            pairs = [self._pair(*r.args, special=False) for r in requests]
            for task, idx in _by_task(requests).items():
                self._warn_fewshot(task, [pairs[i][0] for i in idx])
            for i, res in enumerate(self.explicit.score_tokens(pairs, batch_size=self.batch_size_per_gpu)):
                out[i] = res
            return self._cached(requests, out, "loglikelihood")
        for task, idx in _by_task(requests).items():
            pairs = [self._pair(*requests[i].args, special=None) for i in idx]
            ctx, cut = self._shared(task, [c for c, _ in pairs], "loglikelihood")
            scored = ctx.score_tokens([(c[cut:], t) for c, t in pairs], batch_size=self.batch_size_per_gpu)
            for i, res in zip(idx, scored):
                out[i] = res
        return self._cached(requests, out, "loglikelihood")

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Each text's tokens scored after the explicit context, preceded (as in `hf`) by the prefix token;
        texts longer than the model's positions left after the context are cut into the harness's windows."""
        ctx = self._explicit_or_error("loglikelihood_rolling (perplexity) requests")
        room = self.max_length - ctx.length
        if room < 2:
            raise ValueError(f"the context is {ctx.length} tokens, leaving no room in the model's {self.max_length} "
                             "positions for the text: use a shorter context")
        out = []
        for r in requests:
            (text,) = r.args
            ids = self.tok_encode(text, add_special_tokens=False)
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=ids, prefix_token=self.prefix_token_id, max_seq_len=room, context_len=1)]
            total = sum(lp for lp, _ in ctx.score_tokens(windows, batch_size=self.batch_size_per_gpu))
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return out

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        eos = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        groups = {None: list(range(len(requests)))} if self.explicit is not None else _by_task(requests)
        for task, idx in groups.items():
            if self.explicit is not None:
                ctx, cut = self.explicit, 0
                encs = [self.tok_encode(requests[i].args[0], add_special_tokens=False) for i in idx]
            else:
                encs = [self.tok_encode(requests[i].args[0]) for i in idx]
                ctx, cut = self._shared(task, encs, "generate_until")
            for i, enc in zip(idx, encs):
                context, gen_kwargs = requests[i].args
                out[i] = self._generate(ctx, enc[cut:], dict(gen_kwargs), eos)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), out[i])
        return out

    # --- helpers ---------------------------------------------------------------------------------------------------

    def _pair(self, context: str, continuation: str, special: bool | None) -> tuple[list[int], list[int]]:
        """The harness's boundary rule (TemplateLM._encode_pair), with the given special-token setting."""
        if context == "":
            if special is False:
                raise ValueError("a request has an empty context; the explicit mode scores contexts after the tuned "
                                 "prefix and needs at least one token of each")
            cont = self.tok_encode(continuation, add_special_tokens=False)
            return ([self.prefix_token_id], cont) if cont[:1] != [self.prefix_token_id] else (cont[:1], cont[1:])
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = self.tok_encode(context + continuation, add_special_tokens=special)
        ctx = self.tok_encode(context, add_special_tokens=special)
        cont = whole[len(ctx):]
        if not cont:
            raise ValueError(f"the continuation {continuation!r} adds no tokens to its context {context[-40:]!r}: "
                             "a scored continuation needs at least one token")
        return ctx, cont

    def _explicit_or_error(self, what: str) -> "deepthink.TunedContext":
        if self.explicit is None:
            raise ValueError(f"{what} carry no few-shot examples to share: pass an explicit context "
                             "(--model_args context=DIR or demos=FILE) for such tasks")
        return self.explicit

    def _warn_fewshot(self, task, encodings: list[list[int]]) -> None:
        """Explicit mode: harness few-shot examples on top of our context are legal but rarely meant."""
        if len({tuple(e) for e in encodings}) > 1 and shared_prefix(encodings, self.tokenizer, self.fewshot_delimiter):
            log.warning("task %s: its requests start with the same text ending in %r, probably the harness's few-shot "
                        "examples; they are scored after the explicit context as well - run with --num_fewshot 0 "
                        "to use only the context's demonstrations", task or "(unnamed task)", self.fewshot_delimiter)

    def _shared(self, task, encodings: list[list[int]], kind: str) -> tuple["deepthink.TunedContext", int]:
        """The tuned context of this task's shared demonstrations and its length in tokens (tuned on first use)."""
        cut = shared_prefix(encodings, self.tokenizer, self.fewshot_delimiter)
        name = task or "(unnamed task)"
        if cut == 0:
            raise ValueError(
                f"task {name}: its {len(encodings)} {kind} requests do not start with the same demonstrations (no "
                f"common token prefix ending in the few-shot delimiter {self.fewshot_delimiter!r}). Give the task a "
                "fixed few-shot set - in its YAML `fewshot_config: {sampler: first_n}` (or fixed `samples`) - and "
                "run it with --num_fewshot N >= 1; if the task joins examples with another fewshot_delimiter, pass "
                "the same fewshot_delimiter=... in --model_args; or tune an explicit context (context=DIR or "
                "demos=FILE) and run with --num_fewshot 0")
        if all(self.fewshot_delimiter in self.tokenizer.decode(e[cut:]) for e in encodings):
            log.warning("task %s: every request still contains the few-shot delimiter %r after the %d shared tokens: "
                        "if these are per-request demonstrations (the harness's default sampler), they are not "
                        "tuned - use `fewshot_config: {sampler: first_n}`", name, self.fewshot_delimiter, cut)
        key = tuple(encodings[0][:cut])
        if key not in self._tuned:
            self._tuned[key] = deepthink.tune(self.lm, list(key), self.config)
            log.info("task %s: tuned the shared %d-token prefix (%d steps)", name, cut, self.config.steps)
        ctx = self._tuned[key]
        self.prefixes[name] = {"tokens": cut, "steps": ctx.steps_done, "text": ctx.demonstrations}
        return ctx, cut

    def _generate(self, ctx, ids: list[int], gen_kwargs: dict, eos: str) -> str:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        max_new = int(kwargs.pop("max_gen_toks"))
        sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0) if sample else 0.0
        if not ids:
            raise ValueError("a generation request has no context of its own after the shared prefix")

        def stop(new: list[int]) -> bool:
            text = self.tok_decode(new)
            return any(s and s in text for s in until)
        new = ctx.generate_tokens(ids, max_new_tokens=max_new, temperature=temperature,
                                  top_p=float(kwargs.pop("top_p", 1.0) or 1.0), seed=kwargs.pop("seed", None),
                                  stop=stop)
        return postprocess_generated_text(self.tok_decode(new), until, None)

    def _cached(self, requests, results, kind):
        for r, res in zip(requests, results):
            self.cache_hook.add_partial(kind, r.args, res)
        return results

    def get_model_info(self) -> dict:
        """What the harness records in its results JSON under model info."""
        return {"deepthink_version": deepthink.__version__, "model": self.lm.name, "model_source": self.lm.source,
                "fingerprint": self.lm.fingerprint, "dtype": str(self.lm.dtype).removeprefix("torch."),
                "mode": "explicit" if self.explicit is not None else "shared-prefix",
                "tuning": (self.explicit.config.to_dict() if self.explicit is not None and self.explicit.config
                           else None if self.explicit is not None else self.config.to_dict()),
                "method": (self.explicit.method or {"name": "forward"}) if self.explicit is not None else
                          {"name": "forward"},
                "explicit_context_tokens": self.explicit.length if self.explicit is not None else None,
                "shared_prefixes": {k: v["tokens"] for k, v in self.prefixes.items()}}


def shared_prefix(encodings: list[list[int]], tokenizer, delimiter: str = "\n\n") -> int:
    """Length of the prefix to tune: the longest common token prefix of all encodings, cut back so that every
    encoding keeps at least one token of its own and the prefix's text ends with the few-shot delimiter. 0: none."""
    if not encodings:
        return 0
    first = encodings[0]
    n = min(len(e) for e in encodings) - 1
    for e in encodings[1:]:
        m = 0
        while m < n and e[m] == first[m]:
            m += 1
        n = m
    for m in range(n, 0, -1):
        if tokenizer.decode(first[:m]).endswith(delimiter):
            return m
    return 0


def _by_task(requests: list[Instance]) -> dict[str | None, list[int]]:
    groups: dict[str | None, list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault(getattr(r, "task_name", None), []).append(i)
    return groups


def _read_demos(path) -> str:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"demos file {path} not found: pass demos=FILE, a text file holding the "
                                "demonstrations exactly as they should precede each query")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"demos file {path} is empty: write the demonstrations into it (or drop demos= to tune the "
                         "task's own few-shot examples)")
    return text
