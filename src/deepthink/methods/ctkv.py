"""ct_kv: Context Tuning (CT-KV) with its authors' recipe, on our gradient-tuning machinery.

Lu, Teehan, Yang, Ren, "Context Tuning for In-Context Optimization", arXiv 2507.04221 (ICML 2026); code
agentic-learning-ai-lab/context-tuning, train.py `context_tuning`. The cache of every layer starts as the
demonstrations' own (plain ICL), the weights stay frozen, and each epoch is one full-batch AdamW update of the keys
and values on the leave-one-out objective (deepthink.tuning.gradient, loss="token"): weight decay 0, lr 1e-3 on a
cosine schedule to 0 without warm-up over E epochs, the cache's gradient norm clipped at 1.0, token dropout 0.05
(each prefix position hidden from each training row with probability 0.05, drawn per row and epoch). E is fixed
(default 200, their README): the answer is the cache after the last epoch, and no dev item is read for it.

Dev accuracy is recorded every `record_every` epochs (and at epochs 0 and E) so that a dev-chosen variant
(`ct_kv@dev` with selection=dev-acc) reads the same run and the same scores at no further cost.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..tuning.gradient import GradientConfig, GradientTuner
from .base import Method, Prepared, Setup, register_method
from .gradient import ONE_DEMO, _peak_rss_mb
from .selection import argmax_first

SELECTIONS = ("last", "dev-acc")


@dataclass(frozen=True)
class CTKVConfig:
    """CT-KV's recipe (defaults: the authors' code); every option is a GradientConfig option but `epochs`,
    `record_every` and `selection`; `micro_batch` (like checkpointing) changes memory, not the result."""

    epochs: int = field(default=200, metadata={
        "help": "E: AdamW updates, one per epoch over all demonstrations (the cache after epoch E answers)"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (the cosine schedule starts here)"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw (theirs) or adam", "choices": ("adam", "adamw")})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW's decoupled weight decay (theirs: 0)"})
    schedule: str = field(default="cosine", metadata={
        "help": "cosine (lr to 0 over E epochs, no warm-up) or none", "choices": ("none", "cosine")})
    clip: float = field(default=1.0, metadata={"help": "max total gradient norm of the cache (0 = no clipping)"})
    token_dropout: float = field(default=0.05, metadata={
        "help": "probability that a prefix position is hidden from a training row, drawn per row and epoch"})
    loss: str = field(default="token", metadata={
        "help": "token: mean NLL over the batch's answer tokens (theirs); row: mean of per-demonstration NLLs",
        "choices": ("row", "token")})
    record_every: int = field(default=10, metadata={
        "help": "record dev accuracy (and keep the context) every this many epochs, and at epochs 0 and E"})
    selection: str = field(default="last", metadata={
        "help": "last: the cache after epoch E (their protocol, no dev items read for it); dev-acc: the recorded "
                "epoch with the best dev accuracy, ties to the earlier (the last without dev items)",
        "choices": SELECTIONS})
    seed: int = field(default=0, metadata={"help": "seed of the token-dropout draws"})
    checkpointing: bool = field(default=False, metadata={
        "help": "recompute each layer's activations in the backward pass (less memory, more time)"})
    micro_batch: int = field(default=0, compare=False, metadata={
        "help": "rows back-propagated at once in an epoch, the gradient accumulated over micro-batches of at most "
                "this many before the one AdamW step: less peak memory, the same result up to float rounding "
                "(0 = all at once)"})

    def __post_init__(self):
        for name in ("epochs", "record_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"CTKVConfig.{name}={v!r}: must be an integer >= 1")
        if self.selection not in SELECTIONS:
            raise ValueError(f"CTKVConfig.selection={self.selection!r}: valid: {', '.join(SELECTIONS)}")
        try:
            self.gradient_config()
        except ValueError as e:
            raise ValueError(str(e).replace("GradientConfig.", "CTKVConfig.")) from None

    def gradient_config(self) -> GradientConfig:
        """The tuner's config: E epochs are steps 1 (plain ICL) .. E + 1; full batch, loo-mask, keys and values of
        every layer."""
        return GradientConfig(steps=self.epochs + 1, lr=self.lr, optimizer=self.optimizer,
                              weight_decay=self.weight_decay, schedule=self.schedule, clip=self.clip,
                              token_dropout=self.token_dropout, loss=self.loss, seed=self.seed,
                              checkpointing=self.checkpointing, micro_batch=self.micro_batch, batch=0,
                              objective="loo-mask", update="kv", layers="all")


def recorded_epochs(epochs: int, every: int) -> list[int]:
    """0, every, 2 every, ... and E (epoch 0 is plain ICL)."""
    return sorted(set(range(0, epochs + 1, every)) | {epochs})


@register_method
class CTKV(Method):
    """Context Tuning (Lu et al., arXiv 2507.04221), authors' recipe: AdamW 1e-3, cosine, 200 epochs, clip, dropout.

    The objective and the tuner are grad_kv's; only the recipe differs (docs/gradient.md, docs/methods.md)."""

    name, label = "ct_kv", "CT-KV"
    Config = CTKVConfig

    @staticmethod
    def _need_items(setup: Setup) -> None:
        if not setup.demos:
            raise ValueError("ct_kv needs the demonstrations as items (Setup.demos: a task draw or a .jsonl demos "
                             "file) to know each one's query and answer; a verbatim text file has none")

    def check(self, setup: Setup) -> None:
        self._need_items(setup)
        if len(setup.demos) >= 2:
            GradientTuner(setup.lm, setup.demonstrations, setup.demos, self.config.gradient_config())  # lengths only

    def prepare(self, setup: Setup) -> Prepared:
        cfg = self.config
        self._need_items(setup)
        if len(setup.demos) < 2:
            icl = setup.icl()
            info = {"epochs": 0, "chosen_epoch": 0, "selection_used": "none", "note": ONE_DEMO, "dev_record": [],
                    "train_loss": [], "grad_norm": [], "stopped": None, "tuning_seconds": 0.0,
                    "process_peak_rss_mb": _peak_rss_mb()}
            if cfg.selection == "dev-acc":
                info["chosen_steps"] = 1
            return Prepared(icl, info=info, curve=[icl])
        gcfg = cfg.gradient_config()
        # one run per (recipe, recording) in a workspace: ct_kv and ct_kv@dev read the same run and dev scores
        tuner, points, seconds, peak = setup.workspace.shared(
            ("ct_kv", gcfg, cfg.record_every), lambda: self._run(setup, gcfg, cfg.record_every))
        dev_record = [{"epoch": e, **setup.dev_accuracy(ctx)} for e, ctx in points] if setup.dev else []
        selection = "dev-acc" if cfg.selection == "dev-acc" and dev_record else "last"
        chosen = argmax_first([p["sum"] for p in dev_record]) - 1 if selection == "dev-acc" else len(points) - 1
        epoch, best = points[chosen]
        updates = tuner.history[1:]
        info = {"epochs": cfg.epochs, "chosen_epoch": epoch, "selection_used": selection,
                "record_every": cfg.record_every, "dev_record": dev_record,
                "train_loss": [h["loss"] for h in updates], "grad_norm": [h["grad_norm"] for h in updates],
                "clipped": sum(1 for h in updates if cfg.clip and h["grad_norm"] > cfg.clip),
                "stopped": tuner.stopped, "tuning_seconds": round(seconds, 3), "process_peak_rss_mb": peak}
        if cfg.selection == "dev-acc":
            info["chosen_steps"] = epoch + 1     # the step count convention of grad_kv: step 1 = ICL = epoch 0
        return Prepared(best, info=info, curve=[ctx for _, ctx in points])

    @staticmethod
    def _run(setup: Setup, gcfg: GradientConfig, every: int) -> tuple:
        """(tuner, [(epoch, context)] at the recorded epochs, seconds, process peak RSS in MB after the run); only
        the recorded contexts are kept (200 copies of the cache would be most of the memory)."""
        start = time.perf_counter()
        icl = setup.icl()
        tuner = GradientTuner(setup.lm, setup.demonstrations, setup.demos, gcfg, init=icl)
        epochs = gcfg.steps - 1
        keep = set(recorded_epochs(epochs, every))
        points = []
        for epoch in range(epochs + 1):
            ctx = tuner.step()
            if epoch == 0:
                ctx = icl                 # the same object as every other method's ICL: its scores are shared
            if epoch in keep:
                points.append((epoch, ctx))
            if setup.on_step is not None and epoch > 0:     # `deepthink tune`'s progress line, one per epoch
                last = tuner.history[-1]
                setup.on_step({"step": epoch, "loss": last["loss"] if last["step"] == epoch + 1 else None,
                               "dev_accuracy": setup.dev_accuracy(ctx)["sum"] if setup.dev and epoch in keep
                               else None})
        return tuner, points, time.perf_counter() - start, _peak_rss_mb()

    def describe(self, info: dict) -> str:
        if info.get("note"):
            return f"CT-KV: {info['note']}"
        cfg = self.config
        how = (f"epoch {info['chosen_epoch']} chosen on dev" if info["selection_used"] == "dev-acc"
               else f"the cache after epoch {info['chosen_epoch']}")
        return f"CT-KV, {cfg.optimizer} lr {cfg.lr:g} {cfg.schedule}, {cfg.epochs} epochs: {how}"
