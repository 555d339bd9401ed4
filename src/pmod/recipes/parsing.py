"""Argument parsing shared by the commands: one-line flag errors with a suggestion, flag names that are the same
with dashes or underscores, and output file paths checked before any work."""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path
from typing import NoReturn

from pmod.core.errors import UserError


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose mistakes end in one error line (after a one-line usage), with a suggestion for a
    mistyped flag."""

    def error(self, message: str) -> NoReturn:
        usage = self.format_usage().strip()
        if "\n" in usage:
            usage = f"usage: {self.prog} [options]   (`{self.prog} --help` lists them)"
        print(usage, file=sys.stderr)
        print(f"{self.prog}: error: {message}{self._suggestion(message)}", file=sys.stderr)
        raise SystemExit(2)

    def _suggestion(self, message: str) -> str:
        if not message.startswith("unrecognized arguments:"):
            return ""
        wrong = message.split(":", 1)[1].split()[0].split("=")[0]
        flags = [s for action in self._actions for s in action.option_strings if s.startswith("--")]
        close = difflib.get_close_matches(wrong, flags, n=1, cutoff=0.6)
        if close:
            return f"; did you mean {close[0]}?"
        return f"; `{self.prog} --help` lists the flags"


def dashed(token: str) -> str:
    """``--data_path=x`` -> ``--data-path=x``: a flag's name is the same with dashes or underscores."""
    if not token.startswith("--"):
        return token
    name, sep, value = token.partition("=")
    return name.replace("_", "-") + sep + value


def check_output_file(path: str, flag: str) -> Path:
    """``path`` as a file the command may write, checked before any work: not an existing folder, in a folder it
    can write (created if missing). A :class:`UserError` names the flag and the fix."""
    from pmod.core.files import check_output_folder

    file = Path(path)
    if file.is_dir():
        raise UserError(f"{flag} {file} is an existing folder, not a file; pass a file path.")
    check_output_folder(file.parent, flag)
    return file
