"""The settings tables of docs/METHODS.md, generated from the method configs, so the docs cannot drift from them.

Each table lists a registered method's settable fields (``pmod.core.config.method_names`` / ``settable_fields``):
the field, its ``--<method>-<field>`` flag, its default, its help text (the dataclass field's ``metadata["help"]``),
and, in a line under the table, the commands that take these flags (read from the commands' own parsers, so the
line is true by construction). The tables stand between marker lines in docs/METHODS.md:

    <!-- settings-table: fastv -->
    ... (generated) ...
    <!-- /settings-table -->

    python docs/settings_tables.py           # rewrite the tables in docs/METHODS.md
    python docs/settings_tables.py --check   # exit 1 when they differ from the configs (tests/test_docs.py does this)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import re
import sys
from pathlib import Path
from typing import Any

from pmod.cli import SUBCOMMANDS
from pmod.core.config import method_class, method_names, settable_fields, setting_key
from pmod.recipes.method_flags import flag
from pmod.recipes.parsing import CommandParser

METHODS_PAGE = Path(__file__).resolve().parent / "METHODS.md"
BLOCK = re.compile(r"(<!-- settings-table: (\w+) -->\n)(.*?)(<!-- /settings-table -->)", re.DOTALL)


def default_text(f: dataclasses.Field) -> str:
    """A field's default as a user writes it in Python: ``"prd"``, ``0.5``, ``None``, ``[8, 16, 24]``."""
    value: Any = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return f"`{value!r}`".replace("'", '"')


def command_flags() -> dict[str, set[str]]:
    """pmod command -> the option strings its parser takes (built as ``pmod <command>`` builds it; no torch)."""
    flags = {}
    for name, (module_name, _) in SUBCOMMANDS.items():
        parser = CommandParser(prog=f"pmod {name}", allow_abbrev=False)
        importlib.import_module(module_name).add_arguments(parser)
        flags[name] = {s for action in parser._actions for s in action.option_strings}
    return flags


def settings_table(method: str, flags: dict[str, set[str]] | None = None) -> str:
    """The markdown table of ``method``'s settings and the line naming the commands that take them as flags."""
    flags = command_flags() if flags is None else flags
    fields = settable_fields(method_class(method))
    rows = ["| field | flag | default | meaning |", "|---|---|---|---|"]
    for f in fields:
        help_text = f.metadata.get("help", "").replace("|", "\\|")
        rows.append(f"| `{f.name}` | `{flag(setting_key(method, f.name))}` | {default_text(f)} | {help_text} |")
    every = {flag(setting_key(method, f.name)) for f in fields}
    full = [f"`pmod {name}`" for name, options in flags.items() if every <= options]
    partial = [f"`pmod {name}`" for name, options in flags.items() if options & every and not every <= options]
    where = ", ".join(full) if full else "no command"
    keys = "a `pmod train` YAML recipe and " if "train" in [n for n, o in flags.items() if every <= o] else ""
    line = (f"Flags of {where}; keys `{method}_<field>` of {keys}`pmod eval` / lmms-eval model args "
            f"(with `method={method}`).")  # fmt: skip
    if partial:
        line += f" Some only of {', '.join(partial)}."
    return "\n".join([*rows, "", line]) + "\n"


def render(text: str) -> str:
    """``text`` with every settings-table block replaced by the generated table of its method."""
    flags = command_flags()
    return BLOCK.sub(lambda m: m.group(1) + settings_table(m.group(2), flags) + m.group(4), text)


def blocks(text: str) -> list[str]:
    """The methods whose tables ``text`` holds, in order."""
    return [m.group(2) for m in BLOCK.finditer(text)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/METHODS.md differs; write nothing")
    args = parser.parse_args(argv)
    text = METHODS_PAGE.read_text()
    missing = [m for m in method_names() if m not in blocks(text)]
    new = render(text)
    if args.check:
        if new != text or missing:
            print(f"{METHODS_PAGE} is out of date (missing tables: {missing or 'none'}); run python "
                  "docs/settings_tables.py", file=sys.stderr)  # fmt: skip
            return 1
        return 0
    if missing:
        print(f"add a '<!-- settings-table: NAME -->' block to {METHODS_PAGE} for {', '.join(missing)}",
              file=sys.stderr)  # fmt: skip
        return 1
    METHODS_PAGE.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
