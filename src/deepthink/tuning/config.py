"""TuningConfig: how the demonstrations are thought over (validated on construction; saved in artifacts)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from .rules import RULES

POSITIONS = ("shifted", "aligned")
UPDATES = ("kv", "k", "v")
TARGETS = ("reencode", "rotation")   # implemented in tuning/targets.py


@dataclass(frozen=True)
class TuningConfig:
    """How the demonstrations are thought over. Validated on construction."""

    steps: int = field(default=15, metadata={"help": "T, forward passes over the demonstrations; 1 = plain ICL"})
    step_size: float = field(default=0.01, metadata={"help": "eta, how far each update moves the cache"})
    momentum: float = field(default=0.9, metadata={"help": "beta; 0 gives the ACL paper's gate form"})
    positions: str = field(default="shifted", metadata={
        "help": "'shifted': the re-encoded copy sits at positions L..2L-1 (the reference); "
                "'aligned': at 0..L-1 (ablation)", "choices": POSITIONS})
    update: str = field(default="kv", metadata={"help": "which of keys and values the update touches: kv, k or v",
                                                "choices": UPDATES})
    rule: str = field(default="momentum", metadata={
        "help": "update rule (deepthink.tuning.RULES): momentum, normalized, nesterov"})
    target: str = field(default="reencode", metadata={
        "help": "what the cache moves towards: 'reencode' (the method: K_t, V_t of the re-encoded copy); "
                "'rotation' (positional control for rotary models: K_t = K~ rotated by L positions, V_t = V~, "
                "no re-encoding)", "choices": TARGETS})

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"TuningConfig.{name}={getattr(self, name)!r}: {why}")

        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            bad("steps", "must be an integer >= 1 (1 = plain ICL, the demonstrations' own cache)")
        for name in ("step_size", "momentum"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(name, "must be a finite number")
        if self.step_size < 0:
            bad("step_size", "must be >= 0 (0 leaves the cache unchanged; the paper uses 0.01)")
        if not 0 <= self.momentum < 1:
            bad("momentum", "must be in [0, 1) (0 = gate form; the v1 code uses 0.9)")
        if self.positions not in POSITIONS:
            bad("positions", f"must be one of {', '.join(POSITIONS)}")
        if self.update not in UPDATES:
            bad("update", f"must be one of {', '.join(UPDATES)} (which of keys and values are updated)")
        if self.target not in TARGETS:
            bad("target", f"must be one of {', '.join(TARGETS)} (reencode: the method; rotation: its positional part)")
        if self.target == "rotation" and self.positions == "aligned":
            bad("target", "'rotation' applies the shifted copy's offset of L positions; with positions='aligned' "
                          "there is no offset: use positions='shifted'")
        if self.rule not in RULES:
            bad("rule", f"unknown update rule; valid: {', '.join(sorted(RULES))}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TuningConfig":
        """From a saved dict; fields it lacks take their defaults (artifacts written before `rule` or `target`
        existed hold neither: they were made with the momentum rule and re-encoding, the defaults)."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown tuning option(s) {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**d)
