"""EvalConfig: what one evaluation run measures; stored in every unit so that a resumed run can check it."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from ..methods import DEFAULT_METHODS, Method, make_method

ORACLE = "oracle (chosen on eval)"   # the label of anything chosen on eval: never a reported number


def default_methods() -> dict:
    return {name: {} for name in DEFAULT_METHODS}


@dataclass(frozen=True)
class EvalConfig:
    """Run-level sizes plus the methods to compare, {key: {option: value}} (every option is filled in
    from the method's config dataclass on construction, so a unit records exactly what ran). A key is a
    registered method name, or NAME@VARIANT to run several variants of one method side by side.

    fit_shots: where a method refuses a unit's demonstrations as too long for the model (its positions or sliding
    window), draw the largest smaller shot count that every method accepts, instead of stopping; the unit records
    the count it used and why (`demonstrations.shots`, `notes`)."""

    shots: int = 1
    dev_size: int = 128
    max_eval: int | None = None
    curve: bool = False
    batch_size: int = 16
    methods: dict = field(default_factory=default_methods)
    fit_shots: bool = False

    def __post_init__(self):
        for name in ("shots", "dev_size", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name != "dev_size" else 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.max_eval is not None and (isinstance(self.max_eval, bool) or not isinstance(self.max_eval, int)
                                          or self.max_eval < 1):
            raise ValueError(f"--max-eval must be an integer >= 1, got {self.max_eval!r}")
        if not isinstance(self.fit_shots, bool):
            raise ValueError(f"fit_shots must be True or False, got {self.fit_shots!r}")
        if not isinstance(self.methods, dict) or not self.methods:
            raise ValueError("give at least one method (deepthink methods lists them)")
        full = {name: make_method(name, opts).options() for name, opts in self.methods.items()}
        object.__setattr__(self, "methods", full)

    def make_methods(self) -> list[Method]:
        """The methods in run order; each instance's `key` is its column (NAME or NAME@VARIANT)."""
        return [make_method(key, opts) for key, opts in self.methods.items()]

    def to_dict(self) -> dict:
        return asdict(self)


def legacy_methods(steps: int = 15, step_size: float = 0.01, momentum: float = 0.9, fixed_steps: int = 5,
                   fixed_momentum: float = 0.0, positions: str = "shifted", update: str = "kv") -> dict:
    """The four original methods from the flags of the first evaluation runner (and its saved units)."""
    common = {"step_size": step_size, "positions": positions, "update": update}
    return {"zero_shot": {}, "icl": {},
            "dt_fixed": {"steps": fixed_steps, "momentum": fixed_momentum, **common},
            "dt_dev": {"steps": steps, "momentum": momentum, **common}}


RUN_FIELDS = ("shots", "dev_size", "max_eval", "curve", "batch_size", "fit_shots")


def upgrade_config(d: dict) -> dict:
    """A unit's saved config in today's layout (units written before methods existed hold the four
    original methods' flags at the top level; options added to a method since, e.g. `target` or
    `guard_level`, take their defaults, which reproduce what ran before they existed; so does `fit_shots`)."""
    if "methods" in d:
        return {"fit_shots": False, **d,
                "methods": {key: _with_defaults(key, opts) for key, opts in d["methods"].items()}}
    legacy = {k: v for k, v in d.items() if k not in RUN_FIELDS}
    return EvalConfig(**{k: d[k] for k in RUN_FIELDS if k in d}, methods=legacy_methods(**legacy)).to_dict()


def result_options(key: str, options: dict) -> dict:
    """The options of method `key` that decide its results: all but the ones its config keeps out of comparison
    (compare=False: memory knobs such as grad_kv's micro_batch), so that units made with other values of those
    count as the same units (as saved when the method is unknown here)."""
    try:
        cost = {f.name for f in fields(make_method(key, options).config) if not f.compare}
    except (TypeError, ValueError):
        return options
    return {k: v for k, v in options.items() if k not in cost}


def _with_defaults(key: str, options: dict) -> dict:
    """The saved options of method `key` with today's defaults for options it lacks (as saved when the method
    is unknown here, e.g. a plugin not loaded, or the options no longer valid)."""
    try:
        return make_method(key, options).options()
    except (TypeError, ValueError):
        return options
