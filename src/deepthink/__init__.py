"""deepthink: iterative forward tuning (Deep-Thinking) for in-context learning of causal LMs."""
from .context import TunedContext, zero_shot
from .models import LM, REGISTRY, load_model, wrap_model
from .scoring import Scores
from .tuning import ForwardTuner, TuningConfig, tune

__version__ = "0.1.0"
__all__ = ["LM", "REGISTRY", "ForwardTuner", "Scores", "TunedContext", "TuningConfig", "load_model", "tune",
           "wrap_model", "zero_shot", "__version__"]
