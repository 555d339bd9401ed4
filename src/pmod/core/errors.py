"""Errors a user can fix. The command line prints them as one line, without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """An error in what the user asked for or passed (a path, a flag, a file); the message names the fix."""
