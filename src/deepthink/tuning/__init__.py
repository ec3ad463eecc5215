"""Forward tuning: its configuration and update rules (the tuner itself is `deepthink.tuning.tuner`)."""
from .config import POSITIONS, UPDATES, TuningConfig
from .rules import RULES, Rule, get_rule, register_rule

__all__ = ["POSITIONS", "RULES", "UPDATES", "Rule", "TuningConfig", "get_rule", "register_rule"]
