"""Write every ``dcal`` command and its options into docs/commands.md, from the parser itself.

    python docs/cli_reference.py           # rewrite the part between the CLI markers of docs/commands.md
    python docs/cli_reference.py --check   # exit 1 when that part is not what the parser says

The option lists are the command line's (``dcal.cli.build_parser``), never copied by hand:
``tests/test_package.py`` fails when docs/commands.md and the parser differ. The rendering reads the parser's
actions (names, metavars, choices, defaults, help), not argparse's formatted usage, so it does not depend on the
terminal width or the Python version.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent / "commands.md"
START = "<!-- CLI:START (written by docs/cli_reference.py from dcal.cli.build_parser; do not edit by hand) -->"
END = "<!-- CLI:END -->"


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _flag(action: argparse.Action) -> str:
    """``--topk TOPK``, ``--flip / --no-flip``, ``paths ...``, ``--fusion {sa+glca,sa,glca}``."""
    if not action.option_strings:
        name = action.metavar or action.dest
        return f"{name} ..." if action.nargs in ("*", "+") else name
    if isinstance(action, argparse.BooleanOptionalAction):
        return " / ".join(action.option_strings)
    names = ", ".join(action.option_strings)
    if action.nargs == 0:
        return names
    value = action.metavar or (f"{{{','.join(map(str, action.choices))}}}" if action.choices else action.dest.upper())
    return f"{names} {value} ..." if action.nargs in ("*", "+") else f"{names} {value}"


def _help(action: argparse.Action) -> str:
    text = (action.help or "") % {**vars(action), "default": action.default}
    if action.required and (action.option_strings or action.nargs not in ("?", "*")):
        text = f"required; {text}" if text else "required"
    show_default = action.option_strings and action.nargs != 0 and action.default not in (None, argparse.SUPPRESS, [])
    if show_default and "default" not in text:
        text += f" (default: {action.default})"
    return text.replace("|", "\\|")


def _command(name: str, parser: argparse.ArgumentParser, summary: str) -> list[str]:
    lines = [f"### `{name}`", "", summary[:1].upper() + summary[1:] + ".", ""]
    groups = {id(a): g for g in parser._mutually_exclusive_groups for a in g._group_actions}
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        one_of = groups.get(id(action))
        note = ""
        if one_of is not None:
            others = [_flag(a).split()[0] for a in one_of._group_actions if a is not action]
            listed = ", ".join(f"`{o}`" for o in others)
            note = f" (one of this and {listed}" + (", required)" if one_of.required else ")")
        rows.append(f"| `{_flag(action)}` | {_help(action)}{note} |")
    if rows:
        lines += ["| option | what |", "| --- | --- |", *rows, ""]
    sub = _subcommands(parser)
    if sub is not None:
        for action in sub._choices_actions:
            lines += _command(f"{name} {action.dest}", sub.choices[action.dest], action.help or "")
    return lines


def render() -> str:
    """The Markdown between the markers: one section per command, each option with its help and default."""
    from dcal.cli import build_parser

    sub = _subcommands(build_parser())
    lines = []
    for action in sub._choices_actions:
        lines += _command(f"dcal {action.dest}", sub.choices[action.dest], action.help or "")
    return "\n".join(lines).rstrip("\n")


def replace_section(text: str, body: str) -> str:
    """``text`` with the lines between the marker lines replaced by ``body``."""
    lines = text.split("\n")
    if lines.count(START) != 1 or lines.count(END) != 1 or lines.index(START) > lines.index(END):
        raise ValueError(f"{DOC}: expected one marker line {START!r} followed by one {END!r}")
    return "\n".join([*lines[: lines.index(START) + 1], body, *lines[lines.index(END):]])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only check that docs/commands.md is up to date")
    args = ap.parse_args(argv)
    text = DOC.read_text(encoding="utf-8")
    new = replace_section(text, render())
    if args.check:
        if new != text:
            print(f"{DOC} is out of date with dcal's parser: run python docs/cli_reference.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
