"""deepthink: iterative forward tuning (Deep-Thinking) for in-context learning of causal LMs."""
from .context import TunedContext, zero_shot
from .context_schema import ContextError, UnverifiedContextWarning
from .models import LM, REGISTRY, load_model, wrap_model
from .scoring import Scores
from .tuning import RULES, TuningConfig, register_rule
from .tuning.tuner import ForwardTuner, tune
from .version import __version__

__all__ = ["LM", "REGISTRY", "RULES", "ContextError", "ForwardTuner", "Scores", "TunedContext", "TuningConfig",
           "UnverifiedContextWarning", "load_model", "register_rule", "tune", "wrap_model", "zero_shot", "__version__"]
