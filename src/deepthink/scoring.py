"""Log-likelihood of continuations after a (tuned) prefix: a fast path and the reference-style path.

Tokenisation rule (../shared/TASKS.md §2): the query Q and the full text F = Q + continuation are
tokenised separately, without special tokens. With s = len(tok(Q)), the scored tokens are tok(F)[s:],
each scored by the log-softmax at the position before it; the context is tok(F)[:s] (normally tok(Q)).
Query tokens sit right after the prefix, at positions L, L+1, ...
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from . import kv


@dataclass
class Scores:
    """Per query and choice: summed log-probability of the choice tokens and their count; `last_hidden`, where
    asked for (score_fast), each query's final hidden state at its last position."""

    logprob: list[list[float]]
    n_tokens: list[list[int]]
    last_hidden: list | None = None

    @property
    def normalized(self) -> list[list[float]]:
        """Per-token log-probability (sum / number of choice tokens)."""
        return [[s / n for s, n in zip(row, ns)] for row, ns in zip(self.logprob, self.n_tokens)]

    def predictions(self, normalize: bool = False) -> list[int]:
        """Argmax per query; the first choice wins a tie."""
        rows = self.normalized if normalize else self.logprob
        return [max(range(len(r)), key=lambda j: (r[j], -j)) for r in rows]


def group_by_choices(choices) -> list[list[int]]:
    """Query indices grouped by their number of choices, in first-seen order (one scorer call takes one size)."""
    groups: dict[int, list[int]] = {}
    for i, cs in enumerate(choices):
        groups.setdefault(len(cs), []).append(i)
    return list(groups.values())


def score_grouped(score, queries: Sequence[str], choices: Sequence[Sequence[str]], **kwargs) -> Scores:
    """Scores for queries with any numbers of choices: `score(queries, choices, **kwargs)` once per group of
    equal size, results put back in the queries' order."""
    logprob: list = [None] * len(queries)
    n_tokens: list = [None] * len(queries)
    for idx in group_by_choices(choices):
        s = score([queries[i] for i in idx], [list(choices[i]) for i in idx], **kwargs)
        for i, lp, nt in zip(idx, s.logprob, s.n_tokens):
            logprob[i], n_tokens[i] = lp, nt
    return Scores(logprob, n_tokens)


@dataclass
class Unit:
    """Choices of one query that share a context: encode `context` once, then score each choice."""

    item: int
    context: list[int]
    choices: list[tuple[int, list[int]]]   # (choice index, choice tokens)


def prepare(tokenizer, queries: Sequence[str], choices, prefix_len: int = 0,
            max_positions: int | None = None) -> tuple[list[Unit], int]:
    """Validate and tokenise once; -> (units, choices per item). Raises ValueError on bad input."""
    if isinstance(queries, str) or not isinstance(queries, Sequence):
        raise ValueError("queries must be a list of strings")
    if not queries:
        raise ValueError("queries is empty: pass at least one query")
    if choices and all(isinstance(c, str) for c in choices):
        choices = [list(choices)] * len(queries)       # one set of choices for every query
    if len(choices) != len(queries):
        raise ValueError(f"got {len(queries)} queries but {len(choices)} choice lists: pass one list per query "
                         "or a single list of strings shared by all")
    sizes = {len(c) for c in choices}
    if len(sizes) != 1:
        raise ValueError(f"every query must have the same number of choices in one call; got sizes {sorted(sizes)}: "
                         "group queries by their number of choices")
    n = sizes.pop()
    if n < 1:
        raise ValueError("each query needs at least one choice")
    cache: dict[str, list[int]] = {}

    def tok(text: str) -> list[int]:
        if text not in cache:
            cache[text] = tokenizer(text, add_special_tokens=False).input_ids
        return cache[text]

    units = []
    for i, (q, cs) in enumerate(zip(queries, choices)):
        if not isinstance(q, str) or not all(isinstance(c, str) for c in cs):
            raise ValueError(f"query {i}: queries and choices must be strings")
        if len(set(cs)) != len(cs):
            raise ValueError(f"query {i}: duplicate choices {[c for c in cs if cs.count(c) > 1]!r}: "
                             "each choice must be distinct")
        start = len(tok(q))
        if start == 0:
            raise ValueError(f"query {i} ({q!r}) tokenises to nothing: the first choice token would have no context")
        groups: dict[tuple[int, ...], Unit] = {}
        for j, c in enumerate(cs):
            full = tok(q + c)
            if len(full) <= start:
                raise ValueError(f"query {i}, choice {j} ({c!r}) adds no tokens to the query: "
                                 "a choice must tokenise to at least one token")
            if max_positions is not None and prefix_len + len(full) > max_positions:
                raise ValueError(f"query {i} with choice {j} needs {prefix_len} prefix + {len(full)} tokens, "
                                 f"beyond the model's {max_positions} positions: shorten the query or the demonstrations")
            ctx = tuple(full[:start])
            groups.setdefault(ctx, Unit(i, list(ctx), [])).choices.append((j, full[start:]))
        units.extend(groups.values())
    return units, n


def _head(model, hidden: torch.Tensor) -> torch.Tensor:
    """Log-probabilities from final hidden states, running the LM head only on the rows given."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits.log_softmax(-1)


def _pad(rows: list[list[int]], device, width: int = 0) -> torch.Tensor:
    """Right-pad by repeating each row's last token (never attended to by real tokens: causal)."""
    width = max(width, *map(len, rows))
    return torch.tensor([r + r[-1:] * (width - len(r)) for r in rows], device=device)


CONTINUATION_TOKENS = 4096   # context + choice positions per forward when multi-token choices are scored


@torch.inference_mode()
def score_fast(model, prefix: kv.Prefix, units: list[Unit], n_choices: int, n_items: int,
               batch_size: int = 16, progress: bool = False, shared: bool | None = None,
               last_hidden: bool = False) -> Scores:
    """Each context encoded once after the prefix; all its choices scored from that.

    Contexts are batched longest first and right-padded per batch (pads sit after every real token, so
    causal attention never sees them). Single-token choices need nothing more: the LM head runs only at each
    context's last position. Longer choices run as one more forward per batch - every multi-token choice of
    the batch a row, after its own context's keys/values - with the head only at the scored positions.

    shared: attend to the prefix held once for the whole batch (kv.shared_forward) instead of a copy per row
    (then the longer choices run one forward per context); None picks it whenever the model supports it
    (kv.supports_shared_prefix). Both give the same scores.

    last_hidden: also keep each context's final hidden state at its last position (after the model's last norm:
    what the LM head reads, the `hidden_states[-1]` of a whole-prompt forward), float32 numpy, per item.
    """
    keys, values = prefix
    L = keys[0].shape[-2] if keys else 0
    if shared is None:
        shared = kv.supports_shared_prefix(model)
    elif shared and not kv.supports_shared_prefix(model):
        raise ValueError(f"{model.config.model_type} does not route attention through transformers' "
                         "AttentionInterface: the shared-prefix path cannot serve it; use shared=False")
    device = model.get_input_embeddings().weight.device
    logprob = [[0.0] * n_choices for _ in range(n_items)]
    n_tok = [[0] * n_choices for _ in range(n_items)]
    hidden: list | None = [None] * n_items if last_hidden else None
    order = sorted(range(len(units)), key=lambda u: -len(units[u].context))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="scoring", unit="batch", leave=False)
    for batch in batches:
        us = [units[u] for u in batch]
        lens = torch.tensor([len(u.context) for u in us], device=device)
        multi = any(len(t) > 1 for u in us for _, t in u.choices)
        ids = _pad([u.context for u in us], device)                            # (B, T)
        if shared:
            out = kv.shared_forward(model, ids, prefix, use_cache=multi)
        elif L or multi:
            cache = kv.build_cache(model, keys, values, batch=len(us))
            out = model.base_model(ids, **kv.cache_kwarg(model.base_model, cache), use_cache=multi)
        else:
            out = model.base_model(ids, use_cache=False)
        rows = torch.arange(len(us), device=device)
        last = out.last_hidden_state[rows, lens - 1]                            # (B, H)
        first = _head(model, last)                                              # (B, V)
        if hidden is not None:
            for u, h in zip(us, last.detach().float().cpu().numpy()):
                hidden[u.item] = h
        picks = [(b, u.item, j, toks) for b, u in enumerate(us) for j, toks in u.choices]
        firsts = first[[p[0] for p in picks], [p[3][0] for p in picks]].tolist()   # one gather per batch
        for (_, item, j, toks), lp in zip(picks, firsts):
            logprob[item][j] = lp
            n_tok[item][j] = len(toks)
        if not multi:
            continue
        longer = [(b, us[b].item, j, toks) for b, _, j, toks in picks if len(toks) > 1]
        own = kv.cache_tensors(kv.output_cache(out))       # (B, h, T, d) shared; (B, h, L + T, d) expanded
        if shared:
            # each row gets a copy of its context's keys/values: rows per forward are bounded so that a long
            # context (vanilla ICL puts the demonstrations there) is not copied for every choice at once
            width = own[0][0].shape[-2] + max(len(t) for *_, t in longer)
            step = max(1, CONTINUATION_TOKENS // width)
            for i in range(0, len(longer), step):
                chunk = longer[i:i + step]
                idx = torch.tensor([b for b, *_ in chunk], device=device)
                past = tuple([t.index_select(0, idx) for t in ts] for ts in own)
                sums = _continuations(model, [t for *_, t in chunk],
                                      lambda ids: kv.shared_forward(model, ids, prefix, past, lens[idx]))
                for (_, item, j, _), lp in zip(chunk, sums):
                    logprob[item][j] += lp
        else:
            for b, u in enumerate(us):
                mine = [(j, t) for bb, _, j, t in longer if bb == b]
                if not mine:
                    continue
                end = L + len(u.context)
                ctx = ([k[b:b + 1, :, :end] for k in own[0]], [v[b:b + 1, :, :end] for v in own[1]])

                def forward(ids, ctx=ctx):
                    cache = kv.build_cache(model, *ctx, batch=ids.shape[0])
                    return model.base_model(ids, **kv.cache_kwarg(model.base_model, cache), use_cache=False)
                for (j, _), lp in zip(mine, _continuations(model, [t for _, t in mine], forward)):
                    logprob[u.item][j] += lp
    return Scores(logprob, n_tok, hidden)


def _continuations(model, choices: list[list[int]], forward) -> list[float]:
    """log p(tokens[1:]) of each choice, one row per choice, its tokens[:-1] fed after its context (`forward`
    runs the base model on the right-padded ids); the LM head runs only at the scored positions."""
    device = model.get_input_embeddings().weight.device
    hidden = forward(_pad([t[:-1] for t in choices], device)).last_hidden_state        # (C, n-1, D)
    rows = torch.cat([torch.full((len(t) - 1,), c, device=device) for c, t in enumerate(choices)])
    cols = torch.cat([torch.arange(len(t) - 1, device=device) for t in choices])
    targets = torch.tensor([x for t in choices for x in t[1:]], device=device)
    lp = _head(model, hidden[rows, cols]).gather(-1, targets[:, None])[:, 0].tolist()
    out, k = [], 0
    for t in choices:
        out.append(sum(lp[k:k + len(t) - 1]))
        k += len(t) - 1
    return out


@torch.inference_mode()
def score_naive(model, prefix: kv.Prefix, units: list[Unit], n_choices: int, n_items: int,
                batch_size: int = 16, pad_to: int | None = None, progress: bool = False) -> Scores:
    """The reference scorer: per choice index, one right-padded forward of context + choice over a batch
    of items in data order, the prefix expanded over the batch, full logits at every position."""
    keys, values = prefix
    L = keys[0].shape[-2] if keys else 0
    device = next(model.parameters()).device
    logprob = [[0.0] * n_choices for _ in range(n_items)]
    n_tok = [[0] * n_choices for _ in range(n_items)]
    jobs = [(u.item, j, u.context, toks) for u in units for j, toks in u.choices]
    jobs.sort(key=lambda x: (x[1], x[0]))
    batches = [jobs[i:i + batch_size] for i in range(0, len(jobs), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="scoring (naive)", unit="batch", leave=False)
    for batch in batches:
        rows = [ctx + toks for _, _, ctx, toks in batch]
        ids = _pad(rows, device, pad_to or 0)
        width = ids.shape[1]
        mask = torch.cat([torch.ones(len(rows), L, dtype=torch.long, device=device),
                          (torch.arange(width, device=device)[None] < torch.tensor([len(r) for r in rows],
                                                                                   device=device)[:, None]).long()], 1)
        cache = kv.build_cache(model, keys, values, batch=len(rows))
        logits = model(ids, attention_mask=mask, **kv.cache_kwarg(model, cache), use_cache=False).logits.float()
        logp = logits.log_softmax(-1)
        for b, (item, j, ctx, toks) in enumerate(batch):
            s, e = len(ctx), len(ctx) + len(toks)
            pos = torch.arange(s, e, device=device)
            logprob[item][j] = float(logp[b, pos - 1, ids[b, pos]].sum())
            n_tok[item][j] = len(toks)
    return Scores(logprob, n_tok)


def _hidden_after(model, prefix: kv.Prefix, ids: torch.Tensor) -> torch.Tensor:
    """The base model's last hidden states (B, T, D) of right-padded `ids` after the prefix: the prefix held once
    for the batch where the model supports it (kv.shared_forward), else a copy per row, or no prefix at all."""
    keys, values = prefix
    if not (keys and keys[0].shape[-2]):
        return model.base_model(ids, use_cache=False).last_hidden_state
    if kv.supports_shared_prefix(model):
        return kv.shared_forward(model, ids, prefix).last_hidden_state
    cache = kv.build_cache(model, keys, values, batch=ids.shape[0])
    return model.base_model(ids, **kv.cache_kwarg(model.base_model, cache), use_cache=False).last_hidden_state


@torch.inference_mode()
def score_tokens(model, prefix: kv.Prefix, pairs: list[tuple[list[int], list[int]]],
                 batch_size: int = 16) -> list[tuple[float, bool]]:
    """Token-level scoring after the prefix: per (context ids, continuation ids) pair, the summed log-probability
    of the continuation and whether greedy decoding would have produced it (every continuation token the argmax).

    The caller has already tokenised both parts (this is the contract of lm-evaluation-harness' `loglikelihood`);
    the context sits right after the prefix. Rows are batched longest first and right-padded per batch; the LM
    head runs only at the continuation's positions.
    """
    device = model.get_input_embeddings().weight.device
    out: list[tuple[float, bool] | None] = [None] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        rows = [pairs[i][0] + pairs[i][1][:-1] for i in batch]
        ids = _pad(rows, device)                                                         # (B, T)
        hidden = _hidden_after(model, prefix, ids)                                       # (B, T, D)
        r = torch.cat([torch.full((len(pairs[i][1]),), b, device=device) for b, i in enumerate(batch)])
        c = torch.cat([torch.arange(len(pairs[i][0]) - 1, len(pairs[i][0]) + len(pairs[i][1]) - 1, device=device)
                       for i in batch])
        targets = torch.tensor([t for i in batch for t in pairs[i][1]], device=device)
        logp = _head(model, hidden[r, c])                                                # (N, V)
        lp = logp.gather(-1, targets[:, None])[:, 0].tolist()
        hit = (logp.argmax(-1) == targets).tolist()
        k = 0
        for i in batch:
            n = len(pairs[i][1])
            out[i] = (sum(lp[k:k + n]), all(hit[k:k + n]))
            k += n
    return out


@torch.inference_mode()
def token_logprobs(model, prefix: kv.Prefix, seqs: list[list[int]], top_k: int = 0,
                   batch_size: int = 16) -> list[dict]:
    """Per token of each sequence, its log-probability after the prefix and the tokens before it (the "echo" of
    an OpenAI completion): the same forward pass as `score_tokens`, with every position read.

    Returns per sequence {"logprobs": T-1 floats (tokens 1..T-1; token 0 has no position before it but the
    prefix's last, whose logits the cache does not hold), "top": T lists of (id, logprob), the top_k tokens at
    each position (the last one predicts the token after the sequence), "next": the log-probabilities (V,)
    after the whole sequence}.
    """
    device = model.get_input_embeddings().weight.device
    out: list[dict | None] = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        ids = _pad([seqs[i] for i in batch], device)                                     # (B, T)
        hidden = _hidden_after(model, prefix, ids)                                       # (B, T, D)
        for b, i in enumerate(batch):
            seq = seqs[i]
            logp = _head(model, hidden[b, :len(seq)])                                    # (T, V)
            targets = torch.tensor(seq[1:], device=device)
            lp = logp[:-1].gather(-1, targets[:, None])[:, 0].tolist() if len(seq) > 1 else []
            top = []
            if top_k:
                v, j = logp.topk(min(top_k, logp.shape[-1]), dim=-1)                       # (T, k)
                top = [list(zip(jj, vv)) for jj, vv in zip(j.tolist(), v.tolist())]
            out[i] = {"logprobs": lp, "top": top, "next": logp[-1].cpu()}
    return out
