"""The method contract: one way of answering multiple-choice queries from a set of demonstrations.

A method is prepared once per (model, demonstrations, its own config) and then scores queries x choices
the way `TunedContext.score` does. It may read dev items (labelled training items disjoint from the
demonstrations) to make its own choices; it never sees eval items.

    @register_method
    class MyMethod(Method):
        name, label = "my_method", "my method"            # registry key, table column
        Config = MyConfig                                 # a frozen dataclass; fields carry metadata["help"]
        def prepare(self, setup: Setup) -> Prepared:
            ctx = setup.icl()                             # contexts and scores are shared across methods
            return Prepared(ctx, info={"anything": "JSON-serialisable"})

`deepthink eval --methods my_method ...` runs it; `--plugin FILE.py` or an installed package's entry
point in the group `deepthink.methods` registers it without editing deepthink.
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from ..context import TunedContext, zero_shot
from ..scoring import Scores, score_grouped
from ..tuning.config import TuningConfig
from ..tuning.tuner import ForwardTuner

ENTRY_POINT_GROUP = "deepthink.methods"


class MethodFailed(RuntimeError):
    """A method that cannot run on this model for a reason outside deepthink (e.g. the peft library raising on an
    architecture). An evaluation records "fails: <the message>" for it in the unit and goes on with the other
    methods; the message says what failed and why."""


@dataclass(frozen=True)
class NoOptions:
    """A method without options."""


class Workspace:
    """What the methods of one (model, demonstrations) share, so that nothing is computed twice: tuning runs
    (one per TuningConfig apart from its step count, extended on demand), the step-1 context (plain ICL, the
    same object for every tuning run), the zero-shot context, and the scores of a scorer on a list of items.

    `on_progress(what)`, when set, is called after each piece of work (a tuning step, a scoring pass), so that a
    caller can show movement within a method (the runner's progress bar); methods that run steps of their own
    call `progress(...)` too."""

    def __init__(self, lm, demonstrations: str, on_progress: Callable[[str], None] | None = None):
        self.lm, self.demonstrations = lm, demonstrations
        self.on_progress = on_progress
        self._runs: dict[tuple, tuple[ForwardTuner, list[TunedContext]]] = {}
        self._step1: TunedContext | None = None
        self._zero_shot: TunedContext | None = None
        self._scores: dict[tuple[int, int], tuple[Any, Sequence, Scores]] = {}
        self._memo: dict[tuple, Any] = {}

    def contexts(self, config: TuningConfig) -> list[TunedContext]:
        """The contexts after steps 1..config.steps of forward tuning with `config`."""
        key = tuple(sorted((k, v) for k, v in config.to_dict().items() if k != "steps"))
        if key not in self._runs:
            self._runs[key] = (ForwardTuner(self.lm, self.demonstrations, config), [])
        tuner, ctxs = self._runs[key]
        if config.steps > tuner.config.steps:    # a longer run than the tuner was made for: check it fits
            tuner.config = config
            tuner.check_lengths()
        while len(ctxs) < config.steps:
            ctx = tuner.step()
            self.progress(f"forward step {tuner.step_count}")
            if tuner.step_count == 1:            # step 1 is plain ICL whatever the config: one shared object
                self._step1 = self._step1 or ctx
                ctx = self._step1
            ctxs.append(ctx)
        return ctxs[:config.steps]

    def progress(self, what: str) -> None:
        """Report one finished piece of work (e.g. "gradient step 3") to `on_progress`, if set."""
        if self.on_progress is not None:
            self.on_progress(what)

    def shared(self, key: tuple, make: Callable[[], Any]) -> Any:
        """`make()` once per `key` (hashable) for all methods of this workspace: e.g. a gradient tuning run that
        grad_kv, its leave-one-out selection and its calibrated form all read."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def icl(self) -> TunedContext:
        """Plain in-context learning: the demonstrations' own cache (step 1 of any tuning run)."""
        if self._step1 is None:
            self.contexts(TuningConfig(steps=1))
        return self._step1

    def zero_shot(self) -> TunedContext:
        if self._zero_shot is None:
            self._zero_shot = zero_shot(self.lm)
        return self._zero_shot

    def has_scores(self, scorer, examples: Sequence) -> bool:
        """Whether `score(scorer, examples)` is already computed (another method scored the same scorer)."""
        return (id(scorer), id(examples)) in self._scores

    def score(self, scorer, examples: Sequence, batch_size: int = 16) -> Scores:
        """`scorer.score` over `examples` (any numbers of choices), computed once per (scorer, list).

        A scorer derived from others' scores (calibration, step ensembles) says so with `parts` (the scorers it
        reads) and `combine(part_scores, queries, choices) -> Scores`: its parts are scored here (once, shared
        with every method that scores them) and combined, which gives what its own `.score` gives."""
        key = (id(scorer), id(examples))
        if key not in self._scores:
            queries, choices = [e.query for e in examples], [list(e.continuations) for e in examples]
            if getattr(scorer, "parts", None) is not None:
                s = scorer.combine([self.score(p, examples, batch_size) for p in scorer.parts], queries, choices)
            else:
                s = score_grouped(scorer.score, queries, choices, batch_size=batch_size)
                self.progress(f"scored {len(examples)} items")
            self._scores[key] = (scorer, examples, s)    # holding both keeps their ids from being reused
        return self._scores[key][2]


@dataclass
class Setup:
    """What a method is prepared with: the model, the demonstrations, dev items (never eval items)."""

    lm: Any
    demonstrations: str
    dev: Sequence = ()            # tasks.Example items from training data, disjoint from the demonstrations
    batch_size: int = 16
    workspace: Workspace | None = None
    task: Any = None              # the tasks.Task the items come from (None outside a task, e.g. a demos file)
    demos: Sequence = ()          # the demonstrations as tasks.Example items, in prompt order, when known:
                                  # demonstrations == "".join(e.block for e in demos)
    on_step: Callable | None = None   # called by step-by-step methods after each step: {step, loss, dev_accuracy}

    def __post_init__(self):
        if self.workspace is None:
            self.workspace = Workspace(self.lm, self.demonstrations)

    def contexts(self, config: TuningConfig) -> list[TunedContext]:
        return self.workspace.contexts(config)

    def icl(self) -> TunedContext:
        return self.workspace.icl()

    def zero_shot(self) -> TunedContext:
        return self.workspace.zero_shot()

    def score_dev(self, scorer) -> Scores:
        return self.workspace.score(scorer, self.dev, self.batch_size)

    def dev_accuracy(self, scorer) -> dict:
        """{"sum": %, "norm": %} of `scorer` on the dev items."""
        return accuracies(self.score_dev(scorer), [e.label for e in self.dev])


@dataclass
class Prepared:
    """A prepared method: `scorer.score(queries, choices, batch_size=...)` -> Scores answers queries
    (a TunedContext, or any object with that method); `info` is recorded in the results (JSON values);
    `curve` lists per-step contexts, scored on eval only for the labelled oracle curve of `--curve`."""

    scorer: Any
    info: dict = field(default_factory=dict)
    curve: Sequence = ()


class NotApplicable(ValueError):
    """Raised by `Method.check` when a method cannot answer a task by its nature (e.g. calibration on a task whose
    choices differ per item), not because of a setting the user can fix: an evaluation run records the reason in
    the unit and shows "–" for that method and task instead of stopping."""


class Method:
    """Base class of a registered method; subclasses set `name`, `label`, `Config` and `prepare`."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""             # short column label in tables
    Config: ClassVar[type] = NoOptions

    def __init__(self, config=None, key: str | None = None):
        self.key = key or self.name           # the column name in a run: NAME, or NAME@VARIANT
        self.config = self.Config() if config is None else config
        if not isinstance(self.config, self.Config):
            raise TypeError(f"method {self.name!r} takes a {self.Config.__name__}, got {type(self.config).__name__}")

    def prepare(self, setup: Setup) -> Prepared:
        raise NotImplementedError

    def check(self, setup: Setup) -> None:
        """Raise ValueError, saying what to fix, if this method cannot run on `setup` (e.g. demonstrations too long
        for the model), or NotApplicable if it cannot answer this task at all. Cheap: a run checks every method
        before any of them computes anything, so that a refusal does not come after the other methods' work.
        Default: nothing to check."""

    def adapt(self, scorer, setup: Setup):
        """How this method reads a scorer's scores: the scorer itself here. A wrapper that changes scores (e.g.
        calibration, methods/calibration.py) overrides it; a method that chooses among scorers on training
        data compares `self.adapt(scorer, setup)`, so that it chooses on the scores it will answer with."""
        return scorer

    @property
    def title(self) -> str:
        """The column label of this instance: the method's label, with "@VARIANT" for a named variant."""
        return variant_label(self.key)

    def describe(self, info: dict) -> str:
        """A one-line description of the prepared method (e.g. with the T it chose), for logs and the demo."""
        return self.title

    def options(self) -> dict:
        return {f.name: getattr(self.config, f.name) for f in fields(self.config)}


METHODS: dict[str, type[Method]] = {}
# the baselines, calibrated ICL (the bar for classification tasks), the paper's method in its two settings, and the
# recommended method of benchmarks/results/ABLATIONS.md (grad_kv: lr 0.01, T chosen on dev). Every one runs on
# every task but icl_cc, which is not applicable to tasks whose choices differ per item (NotApplicable: the run
# records why and goes on; tables show "–")
DEFAULT_METHODS = ("zero_shot", "icl", "icl_cc", "dt_fixed", "dt_dev", "grad_kv")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: add a Method subclass to METHODS under `cls.name`."""
    if not (isinstance(cls, type) and issubclass(cls, Method)) or not cls.name:
        raise TypeError(f"{cls!r}: a registered method is a Method subclass with a non-empty `name`")
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        old = METHODS[cls.name]
        raise ValueError(f"method {cls.name!r} is already registered by {old.__module__}.{old.__qualname__}")
    METHODS[cls.name] = cls
    return cls


def split_key(key: str) -> tuple[str, str]:
    """"dt_dev@gate" -> ("dt_dev", "gate"): a run may hold several variants of one method, each under its own
    key; "dt_dev" -> ("dt_dev", "")."""
    name, _, variant = key.partition("@")
    return name, variant


def variant_label(key: str) -> str:
    name, variant = split_key(key)
    base = METHODS[name].label if name in METHODS and METHODS[name].label else name
    return f"{base} @{variant}" if variant else base


def get_method(name: str) -> type[Method]:
    """The registered method class of `name` (or of a variant key NAME@VARIANT)."""
    load_entry_points()
    name = split_key(name)[0]
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(METHODS)} "
                         "(a method of your own: --plugin FILE.py, or an entry point in 'deepthink.methods')")
    return METHODS[name]


def make_method(name: str, options: dict | None = None) -> Method:
    """The method `name` with its config built from `options` ({field: value}); unknown or invalid
    options raise a ValueError that names the method and the option."""
    cls = get_method(name)
    options = dict(options or {})
    known = {f.name for f in fields(cls.Config)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"method {name!r} has no option(s) {unknown}; its options: {sorted(known) or 'none'}")
    try:
        config = cls.Config(**options)
    except (TypeError, ValueError) as e:
        raise ValueError(f"method {name!r}: {e}") from None
    return cls(config, key=name)


_ENTRY_POINTS_LOADED = False


def load_entry_points() -> None:
    """Import every installed plugin in the entry point group `deepthink.methods` (once per process)."""
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:   # a broken plugin must say which one it is
            raise ImportError(f"deepthink plugin {ep.name!r} ({ep.value}) failed to load: {e}") from e


def load_plugin_file(path) -> None:
    """Import a Python file that registers methods or update rules (`@register_method`, `@register_rule`)."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".py":
        raise FileNotFoundError(f"plugin {path} is not a Python file: pass the path of a .py file that "
                                "registers methods with @deepthink.methods.register_method")
    name = f"deepthink_plugin_{path.stem}_{abs(hash(str(path.resolve())))}"
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[name]
        raise


def accuracy(preds: list[int], gold: list[int]) -> float:
    return round(100.0 * sum(p == g for p, g in zip(preds, gold)) / max(1, len(gold)), 4)


def accuracies(scores: Scores, gold: list[int]) -> dict:
    """{"sum": % by summed log-probability, "norm": % by per-token log-probability}."""
    return {"sum": accuracy(scores.predictions(), gold), "norm": accuracy(scores.predictions(normalize=True), gold)}
