"""`deepthink demo`: the baselines, Deep-Thinking and gradient KV tuning on the small sentiment task shipped inside."""
from .common import add_model_args


def register(sub) -> None:
    p = sub.add_parser("demo", help="zero-shot, ICL, calibrated ICL, Deep-Thinking and gradient KV tuning on the "
                                    "small sentiment task shipped inside")
    add_model_args(p)
    p.add_argument("--steps", type=int, default=10, help="forward-tuning steps to show (default: 10)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: physical cores)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..demo import run_demo
    from ..models import set_threads

    set_threads(args.threads)
    return run_demo(model=args.model, device=args.device, steps=args.steps)
