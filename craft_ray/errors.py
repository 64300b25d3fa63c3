"""The one exception type that user-facing commands turn into a one-line message and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix (bad config key, missing file, unknown label); printed as one line.

    Entry points catch it, print ``error: <message>`` to stderr and exit with code 2 (a full
    traceback only with ``--debug``). The message names the bad value, the problem and the fix.
    """


def one_of(kind: str, value: object, known: list[str] | tuple[str, ...], context: str = "") -> UserError:
    """Build the standard 'unknown X' error: ``unknown label 'pneumonia' for modality cxr; known: a, b``."""
    where = f" {context}" if context else ""
    return UserError(f"unknown {kind} {value!r}{where}; known: {', '.join(map(str, known))}")
