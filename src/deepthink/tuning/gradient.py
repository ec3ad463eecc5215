"""Gradient KV tuning: the demonstrations' keys/values optimised with real gradients, weights frozen.

Forward tuning moves the cache K~, V~ (per layer `[1, kv_heads, L, head_dim]`) along a pseudo-gradient
K_t - K~. Here the same tensors are leaves of an autograd graph and Adam follows the gradient of a
leave-one-out objective over the n demonstrations d_1..d_n (each a query q_i and its gold continuation c_i):

    J(K~, V~) = 1/|B| sum_{i in B} -log p(c_i | K~, V~ with span(d_i) hidden, q_i)

Query tokens sit after the L prefix positions at L, L+1, ... exactly as in scoring (the scored tokens
are tok(q_i + c_i)[len(tok(q_i)):]); an additive attention mask hides d_i's own span of the prefix from
its query, so that its label cannot simply be copied. B is a batch of demonstrations (all by default).
Optional: only keys or only values, a range of layers, and an L2 pull l2 * mean((K~ - K_1)^2) towards
the step-1 cache K_1 (plain ICL).

What the mask does not hide: the keys/values of demonstrations *after* d_i were computed while reading
d_i, so they carry some of it. The objective "loo-reencode" removes that leak: for demonstration i the
prefix is K_{-i} + (K~ - K_1), where K_{-i} is the demonstrations encoded with nothing attending to d_i
(same tokens, same positions) - the change learnt so far, applied to a context that never saw d_i.
`leak` compares the two per demonstration.

Steps count as in forward tuning: step 1 is plain ICL, and step t is the cache after t - 1 Adam updates.

The objective is Context Tuning's (CT-KV: Lu, Teehan, Yang, Ren, arXiv 2507.04221, code
agentic-learning-ai-lab/context-tuning). The options that make up their recipe are here too: AdamW with weight
decay, a cosine schedule from lr to 0 over the T - 1 updates, the cache's gradient norm clipped, token dropout on
the cache (each prefix position hidden from a training row with some probability, drawn per row and update) and
the loss as a mean over answer tokens; methods/ctkv.py sets them to their values.

Memory: an update scores its rows in one forward (the prefix expanded per row), so its peak grows with the rows
trained at once. `micro_batch` scores and back-propagates them a few at a time and accumulates the gradient
before the one optimiser step: the same objective, gradient and updates (up to float rounding), less memory.
"""
from __future__ import annotations

import contextlib
import math
import random
import re
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .. import kv
from ..context import TunedContext
from ..scoring import _head

TARGETS = ("kv", "k", "v")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("none", "cosine")
LOSSES = ("row", "token")
READ_ROWS = 16          # rows per forward when the objective is only read (no gradient), e.g. loo_eval
METHOD_NAME = "grad_kv"


# the prefix each demonstration's query reads (GradientTuner._prefix builds it)
OBJECTIVES: dict[str, str] = {
    "loo-mask": "the tuned cache, the demonstration's own span hidden from its query",
    "loo-reencode": "the demonstrations encoded with nothing attending to it, plus the learnt change; its span hidden",
}


# ---- configuration ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GradientConfig:
    """How the demonstrations' cache is optimised. Validated on construction; saved in artifacts."""

    steps: int = field(default=15, metadata={
        "help": "T: contexts 1..T; step 1 is plain ICL, step t the cache after t - 1 Adam updates"})
    lr: float = field(default=0.001, metadata={"help": "Adam learning rate (0 leaves the cache unchanged)"})
    update: str = field(default="kv", metadata={"help": "what is optimised: kv (keys and values), k or v",
                                                "choices": TARGETS})
    layers: str = field(default="all", metadata={
        "help": "layers optimised: 'all', or 'a:b' (0-based, b excluded; either end may be omitted)"})
    l2: float = field(default=0.0, metadata={
        "help": "weight of the pull l2 * mean((K~ - K_1)^2) towards the step-1 cache (0 = none)"})
    batch: int = field(default=0, metadata={
        "help": "demonstrations per Adam update, drawn in a seeded order (0 = all of them every step)"})
    objective: str = field(default="loo-mask", metadata={
        "help": "loo-mask: each demonstration's span hidden from its own query; loo-reencode: its query reads "
                "the other demonstrations encoded without it, plus the learnt change (leak-free, n encodings)",
        "choices": tuple(OBJECTIVES)})
    seed: int = field(default=0, metadata={
        "help": "seed of the batch order (only matters with batch < n) and of token dropout's draws"})
    checkpointing: bool = field(default=False, metadata={
        "help": "recompute each layer's activations in the backward pass instead of keeping them (less memory)"})
    optimizer: str = field(default="adam", metadata={
        "help": "adam, or adamw (decoupled weight decay, CT-KV's)", "choices": OPTIMIZERS})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW's decoupled weight decay (adamw only)"})
    schedule: str = field(default="none", metadata={
        "help": "learning rate over the T - 1 updates: none (constant), or cosine from lr to 0, no warm-up "
                "(update u of U at lr * (1 + cos(pi u / U)) / 2, as transformers' cosine schedule)",
        "choices": SCHEDULES})
    clip: float = field(default=0.0, metadata={
        "help": "clip the cache's total gradient norm (all tuned tensors together) to this (0 = no clipping)"})
    token_dropout: float = field(default=0.0, metadata={
        "help": "in each update, hide each prefix position from each training row with this probability "
                "(drawn per row and update, seeded by seed; never when scoring)"})
    loss: str = field(default="row", metadata={
        "help": "row: mean over demonstrations of the answer's summed NLL; token: mean NLL over all answer "
                "tokens of the batch (CT-KV's)", "choices": LOSSES})
    # a memory knob, not part of what a run computes: compare=False keeps it out of ==/hash (runs that differ only
    # in it are the same run); it is still recorded in to_dict, i.e. in artifacts and results
    micro_batch: int = field(default=0, compare=False, metadata={
        "help": "rows scored and back-propagated at once within an update: the batch's gradient is accumulated "
                "over micro-batches of at most this many rows, then one optimiser step; less peak memory (about "
                "0.9 GB per row at once on a 7B shape), same objective, gradient and result up to float rounding "
                "(0 = all rows of the update at once)"})

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"{type(self).__name__}.{name}={getattr(self, name)!r}: {why}")

        for name in ("steps", "batch", "seed", "micro_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                bad(name, "must be an integer")
        if self.steps < 1:
            bad("steps", "must be >= 1 (1 = plain ICL, the demonstrations' own cache)")
        if self.batch < 0:
            bad("batch", "must be >= 0 (0 = every demonstration in every step)")
        if self.micro_batch < 0:
            bad("micro_batch", "must be >= 0 (0 = all rows of an update at once; e.g. 4 backpropagates 4 at a time)")
        for name in ("lr", "l2"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                bad(name, "must be a finite number >= 0")
        if self.update not in TARGETS:
            bad("update", f"must be one of {', '.join(TARGETS)}")
        if not isinstance(self.layers, str) or not (self.layers == "all" or re.fullmatch(r"\d*:\d*", self.layers)):
            bad("layers", "must be 'all' or a range 'a:b' of 0-based layer numbers, e.g. '0:4' or '6:'")
        if self.objective not in OBJECTIVES:
            bad("objective", f"unknown objective; valid: {', '.join(OBJECTIVES)}")
        if not isinstance(self.checkpointing, bool):
            bad("checkpointing", "must be true or false")
        for name, valid in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("loss", LOSSES)):
            if getattr(self, name) not in valid:
                bad(name, f"valid: {', '.join(valid)}")
        for name in ("weight_decay", "clip"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                bad(name, "must be a finite number >= 0")
        if self.weight_decay and self.optimizer != "adamw":
            bad("weight_decay", "is AdamW's decoupled weight decay: set optimizer='adamw' too (or weight_decay=0)")
        v = self.token_dropout
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            bad("token_dropout", "must be a probability in [0, 1)")

    def lr_at(self, update: int) -> float:
        """The learning rate of update `update` (0-based) of the run's steps - 1 updates."""
        total = self.steps - 1
        if self.schedule == "none" or total <= 0:
            return float(self.lr)
        return float(self.lr) * 0.5 * (1.0 + math.cos(math.pi * min(update, total) / total))

    def layer_range(self, n_layers: int) -> range:
        """The layers optimised, for a model of `n_layers`; a range outside the model is an error."""
        if self.layers == "all":
            return range(n_layers)
        a, b = self.layers.split(":")
        a, b = int(a) if a else 0, int(b) if b else n_layers
        if not 0 <= a < b <= n_layers:
            raise ValueError(f"layers={self.layers!r} is not a non-empty range inside the model's {n_layers} "
                             f"layers: use 'a:b' with 0 <= a < b <= {n_layers}")
        return range(a, b)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GradientConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown gradient-tuning option(s) {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**d)


# ---- demonstrations as token spans ---------------------------------------------------------------------------------

def demonstration_spans(tokenizer, demonstrations: str, demos: Sequence) -> tuple[list[int], list[tuple[int, int]]]:
    """(prefix ids, [(start, end) per demonstration]): demonstration i's tokens in the tokenised prefix.

    The prefix is tokenised as forward tuning does (the tokenizer's default special tokens). A token is
    assigned to the demonstration whose text it starts in (character offsets of a fast tokenizer); without
    offsets, the demonstrations are tokenised cumulatively and each must extend the previous ids exactly.
    """
    texts = [e.block for e in demos]
    if not texts:
        raise ValueError("gradient tuning needs the demonstrations as items (Setup.demos / tasks.Example), "
                         "one per demonstration: got none")
    if "".join(texts) != demonstrations:
        raise ValueError("the demonstration items do not spell the demonstration text: expected "
                         "demonstrations == ''.join(e.block for e in demos) (each demonstration's text and separator)")
    bounds = [0]
    for t in texts:
        bounds.append(bounds[-1] + len(t))
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(demonstrations, return_offsets_mapping=True)
        ids, offsets = enc.input_ids, enc.offset_mapping
        special = set(tokenizer.all_special_ids)
        spans = []
        for i in range(len(texts)):
            inside = [p for p, (s, e) in enumerate(offsets)
                      if e > s and bounds[i] <= s < bounds[i + 1] and ids[p] not in special]
            if not inside or inside != list(range(inside[0], inside[-1] + 1)):
                raise ValueError(f"demonstration {i} has no contiguous tokens in the tokenised prefix: "
                                 "its span cannot be hidden; check the tokenizer")
            spans.append((inside[0], inside[-1] + 1))
        return ids, spans
    ids = tokenizer(demonstrations).input_ids
    prev = tokenizer("").input_ids
    spans = []
    for i in range(len(texts)):
        cur = tokenizer("".join(texts[:i + 1])).input_ids
        if cur[:len(prev)] != prev or ids[:len(cur)] != cur:
            raise ValueError(f"the tokenizer is not prefix-stable at demonstration {i} (adding it re-tokenises "
                             "earlier text) and gives no character offsets: its span cannot be found; use a "
                             "fast tokenizer")
        spans.append((len(prev), len(cur)))
        prev = cur
    return ids, spans


@dataclass
class Row:
    """One scored continuation after the prefix: tokens F = tok(query + continuation), scored from `start`."""

    demo: int | None          # the demonstration whose span is hidden (None: nothing hidden)
    ids: list[int]            # F, without special tokens
    start: int                # len(tok(query)): F[start:] are the scored tokens


def make_rows(tokenizer, demos: Sequence, choices: bool = False, hide: bool = True) -> list[Row]:
    """The gold continuation of every demonstration (or, with choices, every continuation: for accuracy)."""
    rows = []
    for i, e in enumerate(demos):
        start = len(tokenizer(e.query, add_special_tokens=False).input_ids)
        for j, c in enumerate(e.continuations):
            if not choices and j != e.label:
                continue
            ids = tokenizer(e.query + c, add_special_tokens=False).input_ids
            if start == 0 or len(ids) <= start:
                raise ValueError(f"demonstration {i}: its query or continuation {j} ({c!r}) tokenises to nothing "
                                 "to score (the scoring rule of scoring.py needs both)")
            rows.append(Row(i if hide else None, ids, start))
    return rows


# ---- the masked forward -----------------------------------------------------------------------------------------

class _ReadOnlyPrefix(DynamicLayer):
    """A layer's prefix keys/values (B, h, L, d); `update` returns them with the new ones but stores nothing,
    so a recomputed (checkpointed) layer sees exactly what the first pass saw."""

    is_sliding = False     # windows are in the attention mask (_layer_masks), from true positions

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, *args, **kwargs):
        return torch.cat([self.keys, key_states], -2), torch.cat([self.values, value_states], -2)


def _allowed(L: int, spans: list[tuple[int, int] | None], lengths: list[int], T: int, device,
             dropped: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, L + T) True where query t of row b may attend: the prefix outside the row's hidden span (and outside
    `dropped`, (B, L) True where token dropout hides a prefix position from the row), and its own real tokens up
    to t."""
    B = len(lengths)
    pre = torch.ones(B, T, L, dtype=torch.bool, device=device)
    for b, span in enumerate(spans):
        if span is not None:
            pre[b, :, span[0]:span[1]] = False
    if dropped is not None:
        pre &= ~dropped.to(device)[:, None, :]
    t = torch.arange(T, device=device)
    own = (t[None, :] <= t[:, None])[None] & (t[None, None, :] < torch.tensor(lengths, device=device)[:, None, None])
    return torch.cat([pre, own], -1)


def _additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """(B, 1, T, S) additive mask: 0 where allowed, the dtype's lowest value elsewhere."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min)[:, None]


def _window_in_mask(cfg, window: int | None, span: int) -> bool:
    """Whether the leave-one-out mask must apply the sliding window itself: positions 0..span-1 reach past it and
    the model does not window by itself (GPT-Neo's local layers do, by cache index)."""
    return window is not None and span > window and cfg.model_type != "gpt_neo"


def _layer_masks(model, allowed: torch.Tensor, L: int, dtype):
    """The forward's attention mask from `allowed` (R, T, L + T) (queries at positions L..L+T-1, keys at 0..L+T-1):
    one additive mask, or, when a sliding window reaches into the prefix, the window applied where the model
    applies it: on every layer (Mistral), per layer type ({"full_attention": ..., "sliding_attention": ...},
    which transformers takes as given: Gemma-3, Qwen2 with windows), or by the model itself (GPT-Neo's local
    layers mask by cache index, which equals the position here)."""
    mask = _additive(allowed, dtype)
    cfg = model.config.get_text_config(decoder=True)
    window, T = kv.sliding_window(cfg), allowed.shape[1]
    if not _window_in_mask(cfg, window, L + T):
        return mask
    q = L + torch.arange(T, device=allowed.device)
    k = torch.arange(L + T, device=allowed.device)
    windowed = _additive(allowed & (q[:, None] - k[None, :] < window), dtype)
    types = set(getattr(cfg, "layer_types", None) or [])       # only known types get here (check_lengths)
    if len(types) > 1:
        return {t: windowed if "sliding" in t else mask for t in types}
    return windowed


@contextlib.contextmanager
def _checkpointed(model, on: bool):
    """Within the block, every decoder layer recomputes its activations in the backward pass."""
    if not on:
        yield
        return
    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise ValueError(f"{model.config.model_type}: no decoder layers found to checkpoint; use checkpointing=False")
    for m in layers:
        inner = m.forward
        m.forward = lambda *a, _f=inner, **k: checkpoint(_f, *a, use_reentrant=False, **k)
    try:
        yield
    finally:
        for m in layers:
            del m.forward       # back to the class's forward


def row_logprobs(model, prefix: kv.Prefix, rows: Sequence[Row], spans: list[tuple[int, int]],
                 checkpointing: bool = False, dropped: torch.Tensor | None = None) -> torch.Tensor:
    """(R,) summed log-probability of each row's scored tokens after `prefix` (per layer (R or 1, h, L, d)),
    each row's hidden span (and the positions `dropped` hides, (R, L)) masked out. Differentiable in the prefix."""
    keys, values = prefix
    R, L = len(rows), keys[0].shape[-2]
    device = keys[0].device
    inputs = [r.ids[:-1] for r in rows]                                   # F[:-1] predicts F[1:]
    T = max(map(len, inputs))
    ids = torch.tensor([x + x[-1:] * (T - len(x)) for x in inputs], device=device)     # (R, T) right-padded
    dtype = model.get_input_embeddings().weight.dtype
    mask = _layer_masks(model, _allowed(L, [spans[r.demo] if r.demo is not None else None for r in rows],
                                        [len(x) for x in inputs], T, device, dropped), L, dtype)   # (R, 1, T, L + T)
    cache = Cache(layers=[_ReadOnlyPrefix(k.expand(R, -1, -1, -1), v.expand(R, -1, -1, -1))
                          for k, v in zip(keys, values)])
    kwargs = {}
    if kv.supports_position_ids(model):
        kwargs["position_ids"] = (L + torch.arange(T, device=device)).expand(R, T)
    with _checkpointed(model, checkpointing):
        hidden = model.base_model(ids, attention_mask=mask, **kv.cache_kwarg(model.base_model, cache), use_cache=True,
                                  **kwargs).last_hidden_state
    which = torch.tensor([b for b, r in enumerate(rows) for _ in range(r.start - 1, len(r.ids) - 1)], device=device)
    pos = torch.tensor([p for r in rows for p in range(r.start - 1, len(r.ids) - 1)], device=device)
    target = torch.tensor([t for r in rows for t in r.ids[r.start:]], device=device)
    lp = _head(model, hidden[which, pos]).gather(-1, target[:, None])[:, 0]          # (N,)
    return torch.zeros(R, dtype=lp.dtype, device=device).index_add(0, which, lp)


@contextlib.contextmanager
def frozen(model):
    """The model's weights without gradients for the duration of the block (restored after)."""
    params = list(model.parameters())
    old = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, r in zip(params, old):
            p.requires_grad_(r)


# ---- the tuner ------------------------------------------------------------------------------------------------------

class GradientTuner:
    """Owns the optimisation state of one set of demonstrations; `step()` advances it by one Adam update.

    >>> tuner = GradientTuner(lm, setup.demonstrations, setup.demos, GradientConfig(steps=15))
    >>> for ctx in tuner: ...    # a TunedContext after steps 1 (plain ICL), 2, ..., T
    """

    def __init__(self, lm, demonstrations: str, demos: Sequence, config: GradientConfig | None = None,
                 init: TunedContext | None = None):
        self.lm, self.config = lm, config or GradientConfig()
        if not isinstance(self.config, GradientConfig):
            raise TypeError(f"config must be a GradientConfig, got {type(self.config).__name__}")
        if not isinstance(demonstrations, str) or not demonstrations.strip():
            raise ValueError("demonstrations are empty: gradient tuning needs demonstrations to leave out")
        self.demonstrations, self.demos = demonstrations, list(demos)
        if len(self.demos) < 2:
            raise ValueError(f"gradient tuning leaves one demonstration out of the others: it needs at least 2, "
                             f"got {len(self.demos)}")
        tok = lm.tokenizer
        ids, self.spans = demonstration_spans(tok, demonstrations, self.demos)
        self.input_ids = torch.tensor([ids], device=lm.device)                        # (1, L)
        self.rows = make_rows(tok, self.demos)
        self.choice_rows = make_rows(tok, self.demos, choices=True)
        if init is not None and init.prefix_ids != ids:
            raise ValueError("init is not the cache of these demonstrations (its prefix ids differ)")
        self._init = init
        self.layers = self.config.layer_range(lm.model.config.get_text_config(decoder=True).num_hidden_layers)
        self.check_lengths()
        self.reset()

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def check_lengths(self) -> None:
        cfg, L = self.lm.config, self.length
        longest = max(len(r.ids) for r in self.choice_rows)
        limit = kv.max_positions(cfg)
        if limit is not None and L + longest > limit:
            raise kv.DemonstrationsTooLong(f"{L} prefix + {longest} query tokens exceed the model's {limit} "
                                           "positions: use fewer or shorter demonstrations")
        window = kv.sliding_window(cfg)
        if window is None:
            return
        if L > window - 1:                              # queries may cross the window (_layer_masks masks it)
            raise kv.DemonstrationsTooLong(
                f"demonstrations are {L} tokens but the model's sliding-window layers see only the last {window}: a "
                "demonstration could not read the whole prefix in the leave-one-out objective. Use at most "
                f"{window - 1} tokens of demonstrations")
        text = cfg.get_text_config(decoder=True)
        types = set(getattr(text, "layer_types", None) or [])
        if _window_in_mask(text, window, L + longest) and types - {"full_attention", "sliding_attention"}:
            raise ValueError(f"{text.model_type}: layer types {sorted(types)} — gradient KV tuning's leave-one-out "
                             "mask knows full and sliding-window attention only, and these queries cross the "
                             f"{window}-token window; keep prefix + query within {window} tokens, or use forward "
                             "tuning")

    def reset(self) -> None:
        """Forget everything: cache, optimiser, step count, history, batch order."""
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.k1 = self.v1 = None           # the step-1 cache
        self.params: list[torch.Tensor] = []
        self.optimizer = None
        self.step_count = 0
        self.history: list[dict] = []
        self.stopped: str | None = None
        self._rng = random.Random(self.config.seed)
        self._drop_rng = torch.Generator(device="cpu").manual_seed(self.config.seed)   # token dropout's draws
        self._order: list[int] = []
        self._reencoded = None

    # -- the pieces of the objective

    @torch.no_grad()
    def _encode(self, hide: int | None = None) -> kv.Prefix:
        """The demonstrations' keys/values (1, h, L, d) per layer; with `hide`, no later token attends to that
        demonstration's span (its own tokens still read what precedes them)."""
        model, L = self.lm.model, self.length
        if hide is None:
            return tuple(list(map(torch.clone, t)) for t in kv.encode(model, self.input_ids))
        a, b = self.spans[hide]
        t = torch.arange(L, device=self.input_ids.device)
        allowed = (t[None, :] <= t[:, None]) & ~((t[None, :] >= a) & (t[None, :] < b) & (t[:, None] >= b))
        mask = _additive(allowed[None], model.get_input_embeddings().weight.dtype)          # (1, 1, L, L)
        kwargs = {"position_ids": t[None]} if kv.supports_position_ids(model) else {}     # not read from the mask
        return tuple(list(map(torch.clone, t)) for t in kv.encode(model, self.input_ids, attention_mask=mask, **kwargs))

    def reencoded(self) -> list[kv.Prefix]:
        """K_{-i}, V_{-i} for every demonstration i (computed once)."""
        if self._reencoded is None:
            self._reencoded = [self._encode(hide=i) for i in range(len(self.demos))]
        return self._reencoded

    def _prefix(self, rows: Sequence[Row], keys, values, objective: str) -> kv.Prefix:
        """The prefix each row reads, per layer (1 or R, h, L, d)."""
        if objective == "loo-mask" or all(r.demo is None for r in rows):
            return keys, values
        if objective != "loo-reencode":
            raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
        alone = self.reencoded()
        out_k, out_v = [], []
        for layer in range(len(keys)):
            dk, dv = keys[layer] - self.k1[layer], values[layer] - self.v1[layer]
            out_k.append(torch.cat([alone[r.demo][0][layer] + dk for r in rows]))
            out_v.append(torch.cat([alone[r.demo][1][layer] + dv for r in rows]))
        return out_k, out_v

    def logprobs(self, rows: Sequence[Row], keys=None, values=None, objective: str | None = None,
                 dropped: torch.Tensor | None = None) -> torch.Tensor:
        """(R,) log-probability of each row's continuation after the cache (default: the current one); `dropped`
        (R, L) True hides that prefix position from that row as well (token dropout)."""
        keys = self.keys if keys is None else keys
        values = self.values if values is None else values
        objective = objective or self.config.objective
        if not keys:
            raise RuntimeError("no step has run yet: call step() first (step 1 encodes the demonstrations)")
        if not torch.is_grad_enabled() and len(rows) > READ_ROWS:      # a reading, not an update: bounded memory
            return torch.cat([self.logprobs(rows[i:i + READ_ROWS], keys, values, objective,
                                            None if dropped is None else dropped[i:i + READ_ROWS])
                              for i in range(0, len(rows), READ_ROWS)])
        prefix = self._prefix(rows, keys, values, objective)
        return row_logprobs(self.lm.model, prefix, rows, self.spans, self.config.checkpointing, dropped)

    def check_mask(self) -> None:
        """Refuse a model whose attention does not honour the custom mask: with nothing hidden the masked forward
        must give plain scoring's log-probability, and with demonstration 0 hidden its term must not move when
        that span's keys/values are perturbed."""
        model, (a, b) = self.lm.model, self.spans[0]
        arch = model.config.model_type
        help_ = (f"{arch}: its attention does not take a custom 4D attention mask as given (ALiBi models such as "
                 "BLOOM build their position bias from a 2D mask): gradient KV tuning with a leave-one-out mask "
                 "is not available for it; use forward tuning")
        row = self.rows[0]
        try:
            with torch.no_grad():
                plain = float(self.logprobs([Row(None, row.ids, row.start)], objective="loo-mask")[0])
                hidden = float(self.logprobs([row], objective="loo-mask")[0])
                g = torch.Generator(device="cpu").manual_seed(0)
                noisy_k = [k.clone() for k in self.keys]
                noisy_v = [v.clone() for v in self.values]
                for t in noisy_k + noisy_v:
                    t[..., a:b, :] += 10 * torch.randn(t[..., a:b, :].shape, generator=g).to(t)
                moved = float(self.logprobs([row], noisy_k, noisy_v, objective="loo-mask")[0])
        except Exception as e:   # an architecture whose forward rejects the mask
            raise ValueError(f"{help_} ({type(e).__name__}: {e})") from e
        ctx = self.context()
        e = self.demos[0]
        ref = ctx.score([e.query], [[e.continuations[e.label]]]).logprob[0][0]
        tol = 1e-3 if self.lm.dtype == torch.float32 else 5e-2
        if not math.isclose(plain, ref, abs_tol=tol * max(1.0, abs(ref))) or \
                not math.isclose(hidden, moved, abs_tol=tol * max(1.0, abs(hidden))):
            raise ValueError(f"{help_} (unmasked {plain:.5f} vs scoring {ref:.5f}; hidden span perturbed "
                             f"{hidden:.5f} -> {moved:.5f})")

    # -- stepping

    def _batch(self) -> list[int]:
        n, size = len(self.demos), self.config.batch
        if size == 0 or size >= n:
            return list(range(n))
        out = []
        while len(out) < size:
            if not self._order:
                self._order = list(range(n))
                self._rng.shuffle(self._order)
            out.append(self._order.pop(0))
        return sorted(out)

    def draw_dropout(self, n_rows: int) -> torch.Tensor | None:
        """(n_rows, L) True where token dropout hides a prefix position from a training row: each position
        independently with probability token_dropout, a new draw per row and update (None at 0)."""
        p = self.config.token_dropout
        if not p:
            return None
        return torch.rand(n_rows, self.length, generator=self._drop_rng) < p

    def objective(self, which: Sequence[int] | None = None, keys=None, values=None,
                  dropped: torch.Tensor | None = None) -> torch.Tensor:
        """J over the demonstrations `which` (default all): mean negative log-likelihood of their gold
        continuations (per demonstration, or per answer token with loss="token"), each with its own span hidden
        (and `dropped`'s positions: token dropout), plus the L2 pull. Differentiable in keys/values."""
        keys = self.keys if keys is None else keys
        values = self.values if values is None else values
        which = range(len(self.demos)) if which is None else which
        rows = [self.rows[i] for i in which]
        lp = self.logprobs(rows, keys, values, dropped=dropped)
        if self.config.loss == "token":
            loss = -lp.sum() / self._denominator(rows)
        else:
            loss = -lp.mean()
        pull = self._pull(keys, values)
        return loss if pull is None else loss + pull

    def _denominator(self, rows: Sequence[Row]) -> int:
        """What the summed NLL of a batch's rows is divided by: its rows (loss "row") or answer tokens ("token")."""
        if self.config.loss == "token":
            return sum(len(r.ids) - r.start for r in rows)
        return len(rows)

    def _pull(self, keys, values) -> torch.Tensor | None:
        """The L2 pull l2 * mean((K~ - K_1)^2) over the tuned tensors (None without one)."""
        if not (self.config.l2 and self.params):
            return None
        pulls = [(t - t0).pow(2) for t, t0 in self._pairs(keys, values)]
        return self.config.l2 * sum(p.sum() for p in pulls) / sum(p.numel() for p in pulls)

    def _backward(self, which: list[int], dropped: torch.Tensor | None) -> torch.Tensor:
        """J over the demonstrations `which` (detached) with its gradient accumulated into the cache's .grad.

        With micro_batch m (0 < m < |which|) the rows are scored and back-propagated m at a time, each part's
        summed NLL divided by the whole batch's denominator (rows, or answer tokens with loss "token"), so that the
        parts add up to J and their gradients to J's; `dropped` (|which|, L) is drawn once for the batch and sliced,
        and the L2 pull is added once. A non-finite part stops there (no step follows: see _update)."""
        m = self.config.micro_batch
        if not m or m >= len(which):                       # all at once: one graph, one backward
            loss = self.objective(which, dropped=dropped)
            if torch.isfinite(loss):
                loss.backward()
            return loss.detach()
        rows = [self.rows[i] for i in which]
        denominator = self._denominator(rows)
        total = 0.0
        for a in range(0, len(rows), m):
            lp = self.logprobs(rows[a:a + m], dropped=None if dropped is None else dropped[a:a + m])   # (<= m,)
            part = -lp.sum() / denominator
            total = total + part.detach().double()          # the sum in float64 whatever the model's dtype
            if not torch.isfinite(part):
                return total
            part.backward()                                # frees this part's graph: the peak is one part's
        pull = self._pull(self.keys, self.values)
        if pull is not None:
            total = total + pull.detach().double()
            if torch.isfinite(pull):
                pull.backward()
        return total

    def _pairs(self, keys, values):
        cfg = self.config
        for layer in self.layers:
            if cfg.update in ("kv", "k"):
                yield keys[layer], self.k1[layer]
            if cfg.update in ("kv", "v"):
                yield values[layer], self.v1[layer]

    def step(self) -> TunedContext:
        """Advance one step (the first is plain ICL) and return the context after it."""
        if self.step_count == 0:
            self._start()
            self.step_count = 1
            self.check_mask()
        else:
            if self.stopped is None:
                self._update()
            self.step_count += 1
        return self.context()

    def _start(self) -> None:
        if self._init is not None:
            k1, v1 = [k.detach().clone() for k in self._init.keys], [v.detach().clone() for v in self._init.values]
        else:
            k1, v1 = self._encode()
        self.k1, self.v1 = k1, v1
        cfg = self.config
        self.keys = [k.clone().requires_grad_(i in self.layers and cfg.update in ("kv", "k")) for i, k in enumerate(k1)]
        self.values = [v.clone().requires_grad_(i in self.layers and cfg.update in ("kv", "v"))
                       for i, v in enumerate(v1)]
        self.params = [t for t in self.keys + self.values if t.requires_grad]
        if cfg.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr)
        self.history.append({"step": 1, "loss": None, "batch": [], "dk": [0.0] * len(k1), "dv": [0.0] * len(k1)})

    def _update(self) -> None:
        which = self._batch()
        old_k = [k.detach().clone() for k in self.keys]
        old_v = [v.detach().clone() for v in self.values]
        lr = self.config.lr_at(self.step_count - 1)           # update u = step_count - 1 of steps - 1
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        grad_norm = None
        with frozen(self.lm.model), torch.enable_grad():
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._backward(which, self.draw_dropout(len(which)))
            if torch.isfinite(loss):
                # the total norm before clipping; max_norm inf (clip 0) multiplies every gradient by 1.0 exactly
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.clip or math.inf))
                self.optimizer.step()
        finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(t).all()) for t in self.params)
        if not finite:
            with torch.no_grad():
                for t, o in zip(self.keys + self.values, old_k + old_v):
                    t.copy_(o)
            self.stopped = (f"non-finite objective or cache at step {self.step_count + 1}; kept step "
                            f"{self.step_count}: lower lr ({self.config.lr})")
            warnings.warn(self.stopped, RuntimeWarning, stacklevel=3)
            return
        with torch.no_grad():
            self.history.append({
                "step": self.step_count + 1,
                "loss": float(loss),            # J on this step's batch, at the cache before the update
                "batch": which,
                "lr": lr,
                "grad_norm": grad_norm,         # the cache's total gradient norm before clipping
                "dk": [float((a.double() - b.double()).norm()) for a, b in zip(self.keys, old_k)],
                "dv": [float((a.double() - b.double()).norm()) for a, b in zip(self.values, old_v)],
            })

    def method_record(self) -> dict:
        """What a saved context records about how it was made."""
        return {"name": METHOD_NAME, "options": self.config.to_dict()}

    def context(self) -> TunedContext:
        """The current cache as a TunedContext (detached copies: later updates never change it)."""
        if self.step_count == 0:
            raise RuntimeError("no step has run yet: call step() first")
        return TunedContext(self.lm, [k.detach().clone() for k in self.keys],
                            [v.detach().clone() for v in self.values], self.input_ids[0].tolist(), config=None,
                            demonstrations=self.demonstrations, steps_done=len(self.history),
                            history=[dict(h) for h in self.history], stopped=self.stopped,
                            method=self.method_record())

    def __iter__(self):
        while self.step_count < self.config.steps:
            yield self.step()

    # -- held-out readings of a context

    @torch.no_grad()
    def loo_eval(self, ctx: TunedContext | None = None, objective: str | None = None) -> dict:
        """Leave-one-out reading of a context (default: the current cache): per demonstration the log-probability
        of every continuation with its own span hidden; -> {"acc" (%), "loss" (mean gold NLL), "per_demo"}."""
        keys = ctx.keys if ctx is not None else self.keys
        values = ctx.values if ctx is not None else self.values
        lp = self.logprobs(self.choice_rows, keys, values, objective).tolist()
        k, per = 0, []
        for e in self.demos:
            n = len(e.continuations)
            per.append(lp[k:k + n])
            k += n
        gold = [row[e.label] for row, e in zip(per, self.demos)]
        hits = [max(range(len(row)), key=lambda j: (row[j], -j)) == e.label for row, e in zip(per, self.demos)]
        return {"acc": round(100.0 * sum(hits) / len(hits), 4), "loss": -sum(gold) / len(gold), "per_demo": per}


def leak(tuner: GradientTuner, ctx: TunedContext | None = None) -> dict:
    """How much of each demonstration reaches its own query through the later demonstrations' keys/values.

    Per demonstration i, the negative log-likelihood of its gold continuation after the cache (default: the
    tuner's current one) under three prefixes: "visible" (nothing hidden: the label can be copied), "mask"
    (loo-mask: span i hidden) and "reencode" (loo-reencode: what follows span i re-encoded without it).
    leak = reencode - mask (how much easier the masked term is than the leak-free one); share = leak / (reencode
    - visible), the part of the copying advantage that the mask lets through (None where that gap is ~0).
    """
    keys = ctx.keys if ctx is not None else tuner.keys
    values = ctx.values if ctx is not None else tuner.values
    with torch.no_grad():
        visible = (-tuner.logprobs([Row(None, r.ids, r.start) for r in tuner.rows], keys, values)).tolist()
        mask = (-tuner.logprobs(tuner.rows, keys, values, "loo-mask")).tolist()
        reenc = (-tuner.logprobs(tuner.rows, keys, values, "loo-reencode")).tolist()
    per = []
    for i, (a, m, r) in enumerate(zip(visible, mask, reenc)):
        gap = r - a
        per.append({"demo": i, "visible": a, "mask": m, "reencode": r, "leak": r - m,
                    "share": (r - m) / gap if abs(gap) > 1e-6 else None})
    n = len(per)
    shares = [p["share"] for p in per if p["share"] is not None]
    return {"per_demo": per, "mean_visible": sum(visible) / n, "mean_mask": sum(mask) / n,
            "mean_reencode": sum(reenc) / n, "mean_leak": sum(p["leak"] for p in per) / n,
            "mean_abs_leak": sum(abs(p["leak"]) for p in per) / n,
            "mean_share": sum(shares) / len(shares) if shares else None}


def gradient_tune(lm, demonstrations: str, demos: Sequence, config: GradientConfig | None = None,
                  progress: bool = False, callback: Callable | None = None) -> TunedContext:
    """Gradient-tune the cache for `config.steps` steps (no selection) and return the last context."""
    tuner = GradientTuner(lm, demonstrations, demos, config)
    steps = iter(tuner)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, total=tuner.config.steps, desc="gradient tuning", unit="step")
    ctx = None
    for ctx in steps:
        if callback is not None:
            callback(ctx)
    return ctx
