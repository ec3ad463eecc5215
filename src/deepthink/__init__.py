"""deepthink: iterative forward tuning (Deep-Thinking) for in-context learning of causal LMs."""
from .api import tune
from .context import TunedContext, zero_shot
from .models import LM, REGISTRY, load_model, wrap_model
from .scoring import Scores
from .tasks import Task, get_task, task_from_template
from .tuning import RULES, TuningConfig, register_rule
from .tuning.tuner import ForwardTuner
from .version import __version__

__all__ = ["LM", "REGISTRY", "RULES", "ForwardTuner", "Scores", "Task", "TunedContext", "TuningConfig", "get_task",
           "load_model", "register_rule", "task_from_template", "tune", "wrap_model", "zero_shot", "__version__"]
