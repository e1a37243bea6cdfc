"""The README's settings table, the example configuration and the man page, made from the
declarations in `imapveil.config` and the command line parser, so that none of them can drift.

    python3 -m imapveil.docs --write    # rewrites README.md's table, systemd/imapveil.toml,
                                        # man/imapveil.1 (run from the repository)
    python3 -m imapveil.docs table|example|man    # prints one of them

tests/test_config.py checks that the files in the repository are what this makes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imapveil import __version__
from imapveil.cli import EXIT_STATUS, build_parser, default_text, flag, plain
from imapveil.config import DECLARATIONS, Endpoint

TABLE_START = "<!-- settings table: made by `python3 -m imapveil.docs --write`; edit config.py -->"
TABLE_END = "<!-- end of the settings table -->"


def readme_table() -> str:
    lines = [TABLE_START, "| key / flag | default | meaning |", "|---|---|---|"]
    for d in DECLARATIONS:
        if d.metavar is None:
            flags = f"`{flag(d)}`, `--no-{flag(d)[2:]}`"
        else:
            flags = f"`{flag(d)} {d.metavar}`".replace("|", "\\|")
        lines.append(f"| `{d.name}` / {flags} | {default_text(d)} | {d.help} |")
    lines.append(TABLE_END)
    return "\n".join(lines) + "\n"


def replace_table(readme: str) -> str:
    start, end = readme.index(TABLE_START), readme.index(TABLE_END) + len(TABLE_END) + 1
    return readme[:start] + readme_table() + readme[end:]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str | Endpoint):
        return json.dumps(str(value))
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):
        return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in value) + " }"
    if isinstance(value, tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


EXAMPLE_HEAD = """\
# /etc/imapveil/imapveil.toml: imapveil's configuration, every setting with its default.
# A line commented out shows the default or an example; the default is fine unless you uncomment
# it. Every key is also a flag of `imapveil serve` (dashes for underscores; booleans as --compress
# and --no-compress); flags win over this file.
# Check it with `imapveil check-config /etc/imapveil/imapveil.toml` (offline; add --online to
# also resolve the upstream and open the statistics store). Apply changes with
# `systemctl reload imapveil`: open sessions go on, and an invalid file is refused.
# (In the repository this file is made from src/imapveil/config.py by
# `python3 -m imapveil.docs --write`; edit the declarations there.)
"""


def _comment(text: str) -> list[str]:
    return textwrap.wrap(text, 98, initial_indent="# ", subsequent_indent="# ")


def example_config() -> str:
    out = [EXAMPLE_HEAD]
    for d in DECLARATIONS:
        if d.section:
            out.append(f"\n## {d.section}\n")
        text = plain(d.help)
        text = text[0].upper() + text[1:] + f". Default: {plain(default_text(d))}."
        if d.note:
            text += " " + plain(d.note)
        out.extend(_comment(text))
        value = d.example if d.example is not None else toml_value(d.value)
        out.append(f"{'' if d.enabled else '# '}{d.name} = {value}")
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def _roff(text: str) -> str:
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + line) if line[:1] in ".'" else line for line in text.split("\n"))


def _option(action: argparse.Action) -> str:
    names = ", ".join(f"\\fB{_roff(o)}\\fR" for o in action.option_strings)
    if not action.option_strings:
        names = f"\\fI{_roff(str(action.metavar or action.dest))}\\fR"
    elif action.nargs != 0 and not isinstance(action, argparse.BooleanOptionalAction):
        names += f" \\fI{_roff(str(action.metavar or action.dest.upper()))}\\fR"
    text = (action.help or "").replace("%%", "%")
    if action.choices and not isinstance(action, argparse._SubParsersAction):
        text += " (one of: " + ", ".join(str(c) for c in action.choices) + ")"
    return f".TP\n{names}\n{_roff(text)}\n"


def _usage(parser: argparse.ArgumentParser) -> str:
    """The usage line, whatever the terminal's width (roff fills the lines)."""
    return " ".join(parser.format_usage().removeprefix("usage: ").split())


def man_page() -> str:
    parser = build_parser()
    date = datetime.date(2026, 1, 1).isoformat()  # fixed: the page changes with the code only
    out = [
        f'.TH IMAPVEIL 1 "{date}" "imapveil {__version__}" "User Commands"',
        ".SH NAME",
        "imapveil \\- " + _roff(parser.description or ""),
        ".SH SYNOPSIS",
        "\\fBimapveil\\fR \\fICOMMAND\\fR [\\fIOPTIONS\\fR]",
        ".SH DESCRIPTION",
        "Made from the same declarations as \\fBimapveil \\fICOMMAND\\fB \\-\\-help\\fR.",
    ]
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        out.append(f".SH {name.upper()}")
        out.append(_roff(_usage(sub)))
        out.append(".PP")
        out.append(_roff(sub.description or ""))
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if isinstance(action, argparse._SubParsersAction):
                for action_name, action_parser in action.choices.items():
                    out.append(f".TP\n\\fB{_roff(action_name)}\\fR")
                    out.append(_roff(_usage(action_parser)))
                continue
            out.append(_option(action).rstrip("\n"))
    out.append(".SH EXIT STATUS")
    for code, text in EXIT_STATUS:
        out.append(f".TP\n\\fB{code}\\fR\n{_roff(text)}")
    out.append(".SH FILES")
    out.append(".TP\n/etc/imapveil/imapveil.toml\nthe configuration the shipped unit reads")
    out.append(
        ".TP\n/var/lib/imapveil/\nthe unit's state: user\\-key, stats.sqlite, stats\\-spool/"
    )
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["table"]:
        sys.stdout.write(readme_table())
    elif args == ["example"]:
        sys.stdout.write(example_config())
    elif args == ["man"]:
        sys.stdout.write(man_page())
    elif args == ["--write"]:
        root = Path.cwd()
        readme = root / "README.md"
        readme.write_text(replace_table(readme.read_text(encoding="utf-8")), encoding="utf-8")
        (root / "systemd" / "imapveil.toml").write_text(example_config(), encoding="utf-8")
        (root / "man").mkdir(exist_ok=True)
        (root / "man" / "imapveil.1").write_text(man_page(), encoding="utf-8")
    else:
        print("usage: python3 -m imapveil.docs table|example|man|--write", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
