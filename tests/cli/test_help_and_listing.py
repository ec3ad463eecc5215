"""What the command line shows before anything runs: every option's default in --help, `deepthink methods` in
aligned columns."""
import argparse
import re

import pytest

from deepthink.cli import build_parser, main
from deepthink.cli.methods import describe


def subparsers():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


@pytest.mark.parametrize("command", list(subparsers()))
def test_every_option_of_every_subcommand_shows_its_default(command):
    p = subparsers()[command]
    fmt = p._get_formatter()
    for action in p._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        text = fmt._expand_help(action)
        assert "default" in text or text.endswith("(required)"), (command, action.option_strings, text)


def test_help_text_carries_defaults_without_repeating_them(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())          # argparse wraps lines at the terminal width
    assert e.value.code == 0
    assert "queries per forward pass (default: 16)" in out
    assert "seeds: demonstrations, dev and subsets (default: 0)" in out
    assert "no progress bars (default: off)" in out
    assert "(required)" in out and "Each finished unit is written atomically to OUT/units/;" in out  # raw description
    assert "(default: 15) (default" not in out and out.count("largest T tried on dev by dt_dev (default: 15)") == 1


def test_methods_listing_is_in_columns():
    lines = describe().splitlines()
    methods = [l for l in lines if re.match(r"  \S", l)]
    options = [l for l in lines if l.startswith("      ")]
    assert len(methods) > 10 and len(options) > 20
    # the label (methods) and the description (update rules) start in one column; so do an option's "=", value
    # and help
    assert len({len(re.match(r"  \S+ +", l).group(0)) for l in methods}) == 1
    assert len({l.index(" = ") for l in options}) == 1
    with_help = [re.match(r"      \S+ += \S+ +(?=\S)", l) for l in options]
    assert len({len(m.group(0)) for m in with_help if m}) == 1 and sum(map(bool, with_help)) > 20
    assert "icl_cc" in lines[0]                                   # the default set names calibrated ICL
