"""The field's parameter-efficient fine-tuning baselines, through the peft library (`pip install 'deepthink[peft]'`).

    lora      LoRA, r 8 / alpha 16 on every attention projection; the adapted model answers zero-shot (T-Few's use)
    lora_icl  the same adapter (the same training run), the demonstrations still in the prompt
    ia3       (IA)^3 on peft's default modules for the architecture (keys, values, feed-forward); zero-shot
    prefix    peft PrefixTuning: trained keys/values for `virtual_tokens` positions per layer (peft's random init)
    prompt    peft PromptTuning: a soft prompt initialised from the demonstrations' token embeddings
    cpt       peft CPT: the demonstrations' embeddings tuned by projected updates; CPT's own loss (the answers
              inside the context as well as the training answer)

Training reads the k demonstrations alone, full batch: step t is t AdamW updates (weight decay 0, constant lr,
gradient norm clipped at 1.0), each on the mean over the demonstrations of -log p(answer | query), tokenised by the
scoring rule (scoring.py: tok(Q) and tok(Q + A)[len(tok(Q)):], after the tokenizer's own special tokens, e.g. BOS).
Step 0 is the untrained adapter (for lora and ia3 exactly the base model). Dev accuracy (summed log-probability) is
recorded at steps 0, eval_every, 2 * eval_every, ..., steps, and the step is chosen on it, ties to fewer steps
(selection.argmax_first, as grad_kv); without dev items, the last step. The learning rate is an option; LR_GRID is
the small grid to fix it on a screen's units before a confirmation (its default is not tuned).

Scoring goes through deepthink's scorer (TunedContext: the same tokenisation, the fast path). lora, lora_icl and
ia3 put their adapter into the model only while their scorer scores, and take it out after (peft's `unload`), so
that the next method of a unit sees the frozen base model; the prompt before the query (the special tokens, or the
demonstrations for lora_icl) is encoded by the adapted model. prefix, prompt and cpt become an ordinary prefix
cache: prefix tuning's keys/values as peft feeds them to the model, a soft prompt encoded by the frozen model; the
special tokens follow them, as in peft's forward. The base weights are never written.

Where peft cannot run a method on an architecture, the method raises MethodFailed with peft's reason, and the
evaluation records "fails: <reason>" for it (no silent skip).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch

from .. import kv
from ..adapter import INSTALL, peft_module  # noqa: F401  (INSTALL: the hint, re-exported)
from ..context import TunedContext
from .base import Method, MethodFailed, Prepared, Setup, register_method
from .selection import argmax_first

# the learning rates a screen tries per method (fixed before a confirmation run; see the module docstring)
LR_GRID = {"lora": (1e-4, 1e-3, 1e-2), "ia3": (1e-3, 1e-2, 1e-1), "prefix": (1e-3, 1e-2, 1e-1),
           "prompt": (1e-3, 1e-2, 1e-1), "cpt": (1e-3, 1e-2, 1e-1)}
ATTENTION = ("attn", "attention")     # a module whose name holds one of these is an attention block

_peft = peft_module        # the peft library, or an ImportError with the install hint (INSTALL)


# ---- configs ------------------------------------------------------------------------------------------------------

def _check_number(cfg, name: str, low: float, integer: bool = False, strict: bool = False) -> None:
    v = getattr(cfg, name)
    kind = int if integer else (int, float)
    if isinstance(v, bool) or not isinstance(v, kind) or not math.isfinite(v) or v < low or (strict and v == low):
        raise ValueError(f"{type(cfg).__name__}.{name}={v!r}: must be {'an integer' if integer else 'a number'} "
                         f"{'>' if strict else '>='} {low:g}")


@dataclass(frozen=True)
class PeftTrainConfig:
    """What every peft baseline shares: the optimiser and the steps tried."""

    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate (constant, weight decay 0)"})
    steps: int = field(default=15, metadata={
        "help": "largest number of full-batch updates tried; the step in 0..steps is chosen on dev"})
    eval_every: int = field(default=1, metadata={"help": "dev accuracy is recorded every this many steps"})
    seed: int = field(default=0, metadata={"help": "seed of the adapter's initialisation"})

    def __post_init__(self):
        _check_number(self, "lr", 0, strict=True)
        _check_number(self, "steps", 1, integer=True)
        _check_number(self, "eval_every", 1, integer=True)
        _check_number(self, "seed", 0, integer=True)


@dataclass(frozen=True)
class LoraOptions(PeftTrainConfig):
    r: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (the update is scaled by alpha / r)"})
    targets: str = field(default="attention", metadata={
        "help": "'attention' (every linear projection inside the attention blocks) or comma-separated module "
                "names (peft's target_modules)"})

    def __post_init__(self):
        super().__post_init__()
        _check_number(self, "r", 1, integer=True)
        _check_number(self, "alpha", 0, strict=True)
        if not isinstance(self.targets, str) or not self.targets.strip():
            raise ValueError(f"{type(self).__name__}.targets={self.targets!r}: 'attention' or module names, e.g. "
                             "'q_proj,v_proj'")


@dataclass(frozen=True)
class IA3Options(PeftTrainConfig):
    lr: float = field(default=1e-2, metadata={"help": "AdamW learning rate (constant, weight decay 0)"})


@dataclass(frozen=True)
class PrefixOptions(PeftTrainConfig):
    lr: float = field(default=1e-2, metadata={"help": "AdamW learning rate (constant, weight decay 0)"})
    virtual_tokens: int = field(default=10, metadata={"help": "trained key/value positions per layer"})

    def __post_init__(self):
        super().__post_init__()
        _check_number(self, "virtual_tokens", 1, integer=True)


@dataclass(frozen=True)
class PromptOptions(PeftTrainConfig):
    lr: float = field(default=1e-2, metadata={"help": "AdamW learning rate (constant, weight decay 0)"})


@dataclass(frozen=True)
class CPTOptions(PeftTrainConfig):
    lr: float = field(default=1e-2, metadata={"help": "AdamW learning rate (constant, weight decay 0)"})
    epsilon: float = field(default=0.1, metadata={
        "help": "CPT's bound on each query token's update (scaled by sqrt(width / 2048))"})
    format_epsilon: float = field(default=0.1, metadata={
        "help": "CPT's bound on each separator token's update (scaled by sqrt(width / 2048))"})

    def __post_init__(self):
        super().__post_init__()
        _check_number(self, "epsilon", 0)
        _check_number(self, "format_epsilon", 0)


# ---- training data: the demonstrations by the scoring rule ---------------------------------------------------------

def _special(lm) -> list[int]:
    """The tokenizer's own special tokens before any text (e.g. BOS), as zero-shot scoring has them."""
    return list(lm.tokenizer("").input_ids)


def _pairs(lm, demos) -> list[tuple[list[int], list[int]]]:
    """(query ids, answer ids) per demonstration by the scoring rule."""
    tok = lm.tokenizer
    out = []
    for e in demos:
        q = tok(e.query, add_special_tokens=False).input_ids
        full = tok(e.query + e.continuations[e.label], add_special_tokens=False).input_ids
        out.append((list(full[:len(q)]), list(full[len(q):])))
    return out


def _batch(rows: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (the last token repeated) and the attention mask."""
    width = max(map(len, rows))
    ids = torch.tensor([r + r[-1:] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return ids, mask


def _answer_loss(logits: torch.Tensor, ids: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """Mean over rows of -log p(answer tokens); `logits` may carry virtual positions in front (prompt tuning)."""
    offset = logits.shape[1] - ids.shape[1]
    losses = []
    for b, (s, e) in enumerate(spans):
        pos = torch.arange(s, e, device=ids.device)
        logp = logits[b, offset + pos - 1].float().log_softmax(-1)                  # (n_answer, V)
        losses.append(-logp.gather(-1, ids[b, pos][:, None]).sum())
    return torch.stack(losses).mean()


# ---- one training run ----------------------------------------------------------------------------------------------

@dataclass
class Run:
    """A training run: the trainable state after each recorded step, and what it cost."""

    steps: list[int]                     # the steps recorded: 0, eval_every, ..., steps
    states: list[dict]                   # the adapter's trainable tensors at each recorded step (CPU copies)
    train_loss: list[float]              # before each update (index t: the loss the t-th update starts from)
    seconds: float
    trainable: int
    adapter_bytes: int


def _fail(method: str, lm, e: Exception) -> MethodFailed:
    import peft

    return MethodFailed(f"peft {peft.__version__} {method} on {lm.config.model_type}: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": "))


def _wrap(method: "PeftMethod", setup: Setup, seed: int = 0, state: dict | None = None):
    """peft's model around setup.lm.model with `method`'s adapter (its trainable tensors set to `state` when given),
    initialised under its own seed: the process's random state is left as it was."""
    peft = _peft()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = peft.get_peft_model(setup.lm.model, method.peft_config(setup))
        except Exception as e:   # peft refusing this architecture: recorded by the runner, not hidden
            raise _fail(method.name, setup.lm, e) from e
    if state is not None:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in state:
                    p.copy_(state[n])
    return model


class PeftMethod(Method):
    """A peft tuner trained on the demonstrations; subclasses set `kind` and how they score."""

    kind: ClassVar[str] = ""              # the training run's family (lora_icl shares lora's run)

    def peft_config(self, setup: Setup):
        raise NotImplementedError

    def check(self, setup: Setup) -> None:
        _peft()
        if not setup.demos:
            raise ValueError(f"{self.name} trains on the demonstrations as items (Setup.demos: a task draw or a "
                             ".jsonl demos file) to know each one's query and answer; a verbatim text file has none")
        limit = kv.max_positions(setup.lm.config)
        if limit is not None:
            longest = max(len(q) + len(a) for q, a in _pairs(setup.lm, setup.demos)) + self.extra_positions(setup)
            if longest > limit:
                raise ValueError(f"{self.name}: a demonstration needs {longest} positions, beyond the model's {limit}")

    def extra_positions(self, setup: Setup) -> int:
        return len(_special(setup.lm))

    def train_key(self) -> tuple:
        return (self.kind, tuple(getattr(self.config, f.name) for f in fields(self.config)))

    # the run, shared within a workspace (lora and lora_icl read one)
    def run(self, setup: Setup) -> Run:
        return setup.workspace.shared(("peft",) + self.train_key(), lambda: self._train(setup))

    def input_special(self, setup: Setup) -> list[int]:
        """The special tokens before each query, after anything peft puts in front (CPT's context has its own)."""
        return _special(setup.lm)

    def _inputs(self, setup: Setup) -> dict:
        """The batch the peft model is trained on: special tokens + query + answer per demonstration."""
        special = self.input_special(setup)
        pairs = _pairs(setup.lm, setup.demos)
        ids, mask = _batch([special + q + a for q, a in pairs], setup.lm.device)
        spans = [(len(special) + len(q), len(special) + len(q) + len(a)) for q, a in pairs]
        return {"ids": ids, "mask": mask, "spans": spans}

    def _loss(self, model, batch: dict) -> torch.Tensor:
        out = model(input_ids=batch["ids"], attention_mask=batch["mask"], use_cache=False)
        return _answer_loss(out.logits, batch["ids"], batch["spans"])

    def _train(self, setup: Setup) -> Run:
        cfg, lm = self.config, setup.lm
        start = time.perf_counter()
        batch = self._inputs(setup)
        model = _wrap(self, setup, seed=cfg.seed)
        try:
            self._initialise(model, setup)
            params = [p for p in model.parameters() if p.requires_grad]
            trainable = sum(p.numel() for p in params)
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
            steps, states, losses = [], [], []
            for t in range(cfg.steps + 1):
                if t % cfg.eval_every == 0 or t == cfg.steps:
                    steps.append(t)
                    states.append(self._state(model))
                if t == cfg.steps:
                    break
                try:
                    loss = self._loss(model, batch)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                except (RuntimeError, TypeError, ValueError, AttributeError, IndexError) as e:
                    if t == 0:           # peft's forward cannot run this architecture (e.g. peft issue 2821)
                        raise _fail(self.name, lm, e) from e
                    raise
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                losses.append(loss.item())
                if setup.on_step is not None:       # `deepthink tune`'s progress line (dev is scored after the run)
                    setup.on_step({"step": t + 1, "loss": losses[-1], "dev_accuracy": None})
            nbytes = sum(v.numel() * v.element_size() for v in states[-1].values())
        finally:
            self._remove(model)
        return Run(steps, states, losses, time.perf_counter() - start, trainable, nbytes)

    def _initialise(self, model, setup: Setup) -> None:
        """Anything peft's own initialisation does not do (PromptTuning from the demonstrations' embeddings)."""

    @staticmethod
    def _state(model) -> dict:
        return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}

    @staticmethod
    def _remove(model) -> None:
        """Take the adapter out of the base model (peft's unload; a prompt-learning model leaves it untouched)."""
        if not model.peft_config["default"].is_prompt_learning:
            model.unload()

    def scorer(self, setup: Setup, state: dict):
        raise NotImplementedError

    def prepare(self, setup: Setup) -> Prepared:
        run = self.run(setup)
        scorers = [self.scorer(setup, s) for s in run.states]
        dev_curve = [setup.dev_accuracy(self.adapt(s, setup)) for s in scorers] if setup.dev else []
        chosen = argmax_first([c["sum"] for c in dev_curve]) if dev_curve else len(run.steps)
        info = {"chosen_step": run.steps[chosen - 1], "selection_used": "dev-acc" if dev_curve else "last step",
                "dev_steps": run.steps, "dev_curve": dev_curve, "train_loss": run.train_loss,
                "tuning_seconds": round(run.seconds, 3), "trainable_parameters": run.trainable,
                "adapter_bytes": run.adapter_bytes, "batch": "full (all demonstrations every step)"}
        return Prepared(scorers[chosen - 1], info=info, curve=scorers)

    def describe(self, info: dict) -> str:
        return (f"{self.title} (peft), lr {self.config.lr:g}, {info['chosen_step']} steps chosen by "
                f"{info['selection_used']}")


# ---- adapters inside the model: lora, lora_icl, ia3 ----------------------------------------------------------------

class AdaptedScorer:
    """Scores with a peft adapter in the model: put in, the prompt encoded, scored, taken out (always)."""

    def __init__(self, method: PeftMethod, setup: Setup, state: dict, demonstrations: str):
        self.method, self.setup, self.state, self.demonstrations = method, setup, state, demonstrations

    def score(self, queries, choices, **kwargs):
        lm = self.setup.lm
        model = _wrap(self.method, self.setup, state=self.state)
        try:
            ids = lm.tokenizer(self.demonstrations).input_ids      # as ICL / zero-shot encode their prefix
            keys, values = kv.encode(lm.model, torch.tensor([ids], device=lm.device)) if ids else ([], [])
            ctx = TunedContext(lm, list(keys), list(values), ids, demonstrations=self.demonstrations)
            return ctx.score(queries, choices, **kwargs)
        finally:
            model.unload()


def _attention_linears(model) -> list[str]:
    """Every linear projection inside an attention block (nn.Linear, or GPT-2's Conv1D), the LM head excluded."""
    from transformers.pytorch_utils import Conv1D

    names = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if isinstance(module, (torch.nn.Linear, Conv1D)) and any(a in p for p in parts[:-1] for a in ATTENTION):
            names.append(name)
    if not names:
        raise ValueError(f"no linear projection inside a module named *attn* / *attention* in this "
                         f"{model.config.model_type} model: pass -o lora.targets=NAME,NAME")
    return names


@register_method
class LoRA(PeftMethod):
    """LoRA on the attention projections, trained on the demonstrations; answers zero-shot."""

    name, label, kind = "lora", "LoRA", "lora"
    Config = LoraOptions
    icl: ClassVar[bool] = False

    def peft_config(self, setup: Setup):
        cfg = self.config
        targets = (_attention_linears(setup.lm.model) if cfg.targets == "attention"
                   else [t.strip() for t in cfg.targets.split(",") if t.strip()])
        return _peft().LoraConfig(task_type="CAUSAL_LM", r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                  target_modules=targets)

    def extra_positions(self, setup: Setup) -> int:
        return len(setup.lm.tokenizer(setup.demonstrations).input_ids) if self.icl else len(_special(setup.lm))

    def scorer(self, setup: Setup, state: dict):
        return AdaptedScorer(self, setup, state, setup.demonstrations if self.icl else "")


@register_method
class LoRAICL(LoRA):
    """lora's adapter (the same run), with the demonstrations in the prompt."""

    name, label = "lora_icl", "LoRA+ICL"
    icl = True


@register_method
class IA3(PeftMethod):
    """(IA)^3 (T-Few) on peft's default modules for the architecture; answers zero-shot."""

    name, label, kind = "ia3", "IA3", "ia3"
    Config = IA3Options

    def peft_config(self, setup: Setup):
        return _peft().IA3Config(task_type="CAUSAL_LM")

    def scorer(self, setup: Setup, state: dict):
        return AdaptedScorer(self, setup, state, "")


# ---- what peft puts before the input, as a prefix cache: prefix, prompt, cpt -------------------------------------

class PromptMethod(PeftMethod):
    """A prompt-learning tuner: its scorer is a TunedContext (virtual positions, then the special tokens)."""

    def _prompt(self, setup: Setup, state: dict):
        """peft's prompt at `state`: a Cache of keys/values (prefix) or (1, P, D) embeddings (prompt, cpt)."""
        model = _wrap(self, setup, state=state)
        try:
            with torch.no_grad():
                return model.get_prompt(batch_size=1)
        finally:
            self._remove(model)

    def placeholder_ids(self, setup: Setup) -> list[int]:
        """Token ids recorded for the virtual positions (a TunedContext keeps one id per position)."""
        pad = setup.lm.tokenizer.pad_token_id
        return [0 if pad is None else pad] * self.n_virtual(setup)

    def n_virtual(self, setup: Setup) -> int:
        raise NotImplementedError

    def extra_positions(self, setup: Setup) -> int:
        return self.n_virtual(setup) + len(self.input_special(setup))

    @torch.no_grad()
    def scorer(self, setup: Setup, state: dict) -> TunedContext:
        lm = setup.lm
        special = self.input_special(setup)
        prompt = self._prompt(setup, state)
        if isinstance(prompt, torch.Tensor):                                   # (1, P, D) embeddings
            embeds = prompt.to(lm.dtype)
            if special:
                embeds = torch.cat([embeds, lm.model.get_input_embeddings()(torch.tensor([special], device=lm.device))], 1)
            out = lm.model(inputs_embeds=embeds, **kv.cache_kwarg(lm.model, kv.build_cache(lm.model)), use_cache=True)
            keys, values = kv.cache_tensors(kv.output_cache(out))
        else:                                                                  # a cache: keys/values per layer
            keys, values = [k.detach().clone() for k in kv.cache_tensors(prompt)[0]], \
                           [v.detach().clone() for v in kv.cache_tensors(prompt)[1]]
            if special:
                keys, values = kv.encode(lm.model, torch.tensor([special], device=lm.device),
                                         kv.build_cache(lm.model, keys, values))
        return TunedContext(lm, list(keys), list(values), self.placeholder_ids(setup) + special,
                            method={"name": self.name, "options": self.options()})


@register_method
class Prefix(PromptMethod):
    """peft PrefixTuning: trained keys/values before the input (random init); answers zero-shot."""

    name, label, kind = "prefix", "prefix tuning", "prefix"
    Config = PrefixOptions

    def n_virtual(self, setup: Setup) -> int:
        return self.config.virtual_tokens

    def peft_config(self, setup: Setup):
        return _peft().PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=self.config.virtual_tokens)


def _demo_ids(setup: Setup) -> list[int]:
    return setup.lm.tokenizer(setup.demonstrations, add_special_tokens=False).input_ids


@register_method
class Prompt(PromptMethod):
    """peft PromptTuning, the soft prompt initialised from the demonstrations' token embeddings."""

    name, label, kind = "prompt", "prompt tuning", "prompt"
    Config = PromptOptions

    def n_virtual(self, setup: Setup) -> int:
        return len(_demo_ids(setup))

    def placeholder_ids(self, setup: Setup) -> list[int]:
        return _demo_ids(setup)

    def peft_config(self, setup: Setup):
        # RANDOM, then the demonstrations' embeddings copied in (_initialise): peft's TEXT init would load the
        # tokenizer by name, which an in-memory or GGUF-loaded model does not have
        return _peft().PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=self.n_virtual(setup))

    def _initialise(self, model, setup: Setup) -> None:
        lm = setup.lm
        with torch.no_grad():
            emb = lm.model.get_input_embeddings()(torch.tensor(_demo_ids(setup), device=lm.device))
            model.prompt_encoder["default"].embedding.weight.copy_(emb)


@register_method
class CPT(PromptMethod):
    """peft CPT: the demonstrations' embeddings as the context, tuned within CPT's bounds; CPT's own loss.

    The context is the demonstrations tokenised by the scoring rule; the training loss is CPT's (the context's
    answers and each training answer)."""

    name, label, kind = "cpt", "CPT", "cpt"
    Config = CPTOptions

    def _context(self, setup: Setup) -> tuple[list[int], list[int]]:
        """CPT's context ids and type mask: the special tokens (type 0), then per demonstration i (1-based) its
        query (4i - 2, input), answer (4i, label) and the blank line after it (4i - 1, output template)."""
        tok = setup.lm.tokenizer
        ids, types = _special(setup.lm), [0] * len(_special(setup.lm))
        sep = tok("\n\n", add_special_tokens=False).input_ids
        for i, (q, a) in enumerate(_pairs(setup.lm, setup.demos), start=1):
            ids += q + a + sep
            types += [4 * i - 2] * len(q) + [4 * i] * len(a) + [4 * i - 1] * len(sep)
        return ids, types

    def n_virtual(self, setup: Setup) -> int:
        return len(self._context(setup)[0])

    def placeholder_ids(self, setup: Setup) -> list[int]:
        return self._context(setup)[0]

    def peft_config(self, setup: Setup):
        ids, types = self._context(setup)
        return _peft().CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=ids, cpt_mask=[1] * len(ids),
                                 cpt_tokens_type_mask=types, opt_weighted_loss_type="none",
                                 opt_projection_epsilon=self.config.epsilon,
                                 opt_projection_format_epsilon=self.config.format_epsilon)

    def _inputs(self, setup: Setup) -> dict:
        batch = super()._inputs(setup)
        labels = torch.full_like(batch["ids"], -100)
        types = torch.zeros_like(batch["ids"])
        for b, (s, e) in enumerate(batch["spans"]):
            labels[b, s:e] = batch["ids"][b, s:e]
            types[b, :s] = 2                                     # the query: input
            types[b, s:e] = 4                                    # the answer: label
        types[batch["mask"] == 0] = 0
        return {**batch, "labels": labels, "types": types}

    def input_special(self, setup: Setup) -> list[int]:
        return []                                                # the context already starts with them

    def _loss(self, model, batch: dict) -> torch.Tensor:
        out = model(input_ids=batch["ids"], attention_mask=batch["mask"], labels=batch["labels"],
                    input_type_mask=batch["types"].clone(), use_cache=False)   # peft shifts the mask in place
        return out.loss

    def extra_positions(self, setup: Setup) -> int:
        return self.n_virtual(setup) + len(self.input_special(setup))
