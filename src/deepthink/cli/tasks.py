"""`deepthink tasks`: the built-in tasks and their prompt templates."""


def register(sub) -> None:
    p = sub.add_parser("tasks", help="list the built-in tasks and their prompt templates")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..tasks import describe_tasks

    print(describe_tasks())
    return 0
