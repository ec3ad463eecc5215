"""`deepthink report DIR...`: re-render tables and plots from saved runs, merging several."""


def register(sub) -> None:
    p = sub.add_parser("report", help="re-render tables and plots from saved runs, merging several")
    p.add_argument("dirs", nargs="+", help="output folders of `deepthink eval`")
    p.add_argument("--out", default=None, help="where to write the merged results (default: the first folder)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..evaluation.report import write_report

    write_report(args.dirs, args.out or args.dirs[0])
    return 0
