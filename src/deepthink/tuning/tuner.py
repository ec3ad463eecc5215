"""Iterative forward tuning ("Deep-Thinking", Yang et al. 2023/2024), on a plain KV cache.

Step 1 encodes the demonstrations D (L tokens) and keeps each layer's keys/values K~, V~
(`[1, kv_heads, L, head_dim]`): plain in-context learning. Every later step re-encodes D with
K~, V~ as its past and takes the keys/values K_t, V_t of the L new positions:

    g = K_t - K~                 (pseudo-gradient; the same for V)
    m = g            (first update),   m = g + beta * m   (later updates)
    K~ = K~ + eta * m

With beta = 0 this is the ACL paper's gate, K~ = eta * K_t + (1 - eta) * K~. No weight changes.
Other rules (TuningConfig.rule, tuning/rules.py) and targets (TuningConfig.target, tuning/targets.py:
K_t, V_t from re-encoding, or the positional control) plug into the same step.
"""
from __future__ import annotations

import warnings

import torch

from .. import kv
from ..context import TunedContext
from .config import TuningConfig
from .rules import get_rule
from .targets import make_target


def _norm_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||, in float64: finite for any finite float32/bf16 states (so history stays valid JSON)."""
    return float((a.double() - b.double()).norm())


class ForwardTuner:
    """Owns the tuning state of one set of demonstrations; `step()` advances it by one forward pass.

    >>> tuner = ForwardTuner(lm, demos, TuningConfig(steps=5))
    >>> for ctx in tuner: ...    # a TunedContext after steps 1, 2, ..., T
    """

    def __init__(self, lm, demonstrations: str | list[int], config: TuningConfig | None = None):
        self.lm, self.config = lm, config or TuningConfig()
        self.rule = get_rule(self.config.rule)
        if isinstance(demonstrations, (list, tuple)) and demonstrations and all(
                isinstance(t, int) and not isinstance(t, bool) for t in demonstrations):
            ids = list(demonstrations)                        # token ids, used as given (special tokens included)
            demonstrations = lm.tokenizer.decode(ids)
        elif isinstance(demonstrations, str) and demonstrations.strip():
            ids = lm.tokenizer(demonstrations).input_ids      # the tokenizer's default special tokens
        else:
            raise ValueError("demonstrations are empty: pass the demonstration text (or its token ids) to tune "
                             "(for a zero-shot baseline use deepthink.zero_shot(lm))")
        self.demonstrations = demonstrations
        self.input_ids = torch.tensor([ids], device=lm.device)  # (1, L)
        self.check_lengths()
        self.target = make_target(self.config.target, lm, self.input_ids, self.config)   # K_t, V_t of a step
        self.reset()

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def check_lengths(self) -> None:
        cfg, L = self.lm.config, self.length
        limit = kv.max_positions(cfg)
        need = 2 * L if self.config.steps > 1 and self.config.positions == "shifted" else L
        if limit is not None and need > limit:
            raise kv.DemonstrationsTooLong(
                f"demonstrations are {L} tokens; {'re-encoding them at positions L..2L-1 needs' if need > L else 'they need'} "
                f"{need} positions but the model supports {limit}: use fewer or shorter demonstrations")
        window = kv.sliding_window(cfg)
        if window is not None and self.config.steps > 1 and L > window - 1:
            raise kv.DemonstrationsTooLong(
                f"demonstrations are {L} tokens but the model's sliding-window layers see only the last {window}: "
                f"the re-encoded copy could not attend to the whole cache. Use at most {window - 1} tokens of demonstrations")
        if self.config.positions == "aligned" and not kv.supports_position_ids(self.lm.model):
            raise ValueError(f"positions='aligned' needs explicit position ids, which {cfg.model_type} "
                             "(ALiBi) does not take: use positions='shifted'")

    def reset(self) -> None:
        """Forget everything: cache, momentum, step count, history."""
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._mk = self._mv = None    # the rule's state for keys / values
        self.step_count = 0
        self.history: list[dict] = []   # per step: {"step", "dk": [per layer], "dv": [...]}
        self.stopped: str | None = None

    @torch.inference_mode()
    def _encode(self, past: kv.Prefix | None) -> kv.Prefix:
        """Keys/values of the demonstrations' L positions, encoded after `past` (or alone)."""
        model, L = self.lm.model, self.length
        if past is None:
            return kv.encode(model, self.input_ids)
        cache = kv.build_cache(model, *past)
        kwargs = {}
        if self.config.positions == "aligned":
            kwargs["position_ids"] = torch.arange(L, device=self.input_ids.device)[None]
        mask = torch.ones(1, 2 * L, dtype=torch.long, device=self.input_ids.device)
        keys, values = kv.encode(model, self.input_ids, cache, attention_mask=mask, **kwargs)
        return [k[..., -L:, :] for k in keys], [v[..., -L:, :] for v in values]

    def step(self) -> "TunedContext":
        """Advance one step (the first is plain ICL) and return the context after it."""
        if self.step_count == 0:
            self.keys, self.values = (list(map(torch.clone, t)) for t in self._encode(None))
            self.history.append({"step": 1, "dk": [0.0] * len(self.keys), "dv": [0.0] * len(self.keys)})
        elif self.stopped is None:
            cfg = self.config
            new_k, new_v = self.target(self.keys, self.values, self._encode)
            keys, values, mk, mv = self.keys, self.values, self._mk, self._mv
            if cfg.update in ("kv", "k"):
                keys, mk = self.rule.fn(self.keys, new_k, self._mk, cfg)
            if cfg.update in ("kv", "v"):
                values, mv = self.rule.fn(self.values, new_v, self._mv, cfg)
            if not all(torch.isfinite(t).all() for t in keys + values):
                self.stopped = (f"non-finite cache at step {self.step_count + 1}; kept step "
                                f"{self.step_count}: lower step_size ({cfg.step_size}) or momentum ({cfg.momentum})")
                warnings.warn(self.stopped, RuntimeWarning, stacklevel=2)
            else:
                self.history.append({
                    "step": self.step_count + 1,
                    "dk": [_norm_diff(a, b) for a, b in zip(keys, self.keys)],
                    "dv": [_norm_diff(a, b) for a, b in zip(values, self.values)],
                })
                self.keys, self.values, self._mk, self._mv = keys, values, mk, mv
        self.step_count += 1
        return self.context()

    def context(self) -> "TunedContext":
        """The current state as a TunedContext (tensors are shared: updates never modify them in place)."""
        if self.step_count == 0:
            raise RuntimeError("no step has run yet: call step() first")
        return TunedContext(self.lm, list(self.keys), list(self.values), self.input_ids[0].tolist(),
                            config=self.config, demonstrations=self.demonstrations,
                            steps_done=len(self.history), history=[dict(h) for h in self.history],
                            stopped=self.stopped)

    def __iter__(self):
        while self.step_count < self.config.steps:
            yield self.step()


def tune(lm, demonstrations: str | list[int], config: TuningConfig | None = None, progress: bool = False) -> "TunedContext":
    """Forward-tune `demonstrations` (text, or token ids used as given) for `config.steps` steps."""
    tuner = ForwardTuner(lm, demonstrations, config)
    ctx = None
    steps = iter(tuner)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, total=tuner.config.steps, desc="tuning", unit="step")
    for ctx in steps:
        pass
    return ctx
