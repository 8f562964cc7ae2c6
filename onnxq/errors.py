"""User-facing errors.

Every mistake a user can make (a wrong file, data that does not fit the model, an unwritable output)
raises :class:`OnnxqError` with one line that names the problem. The CLI prints that line and exits
with status 2; it never shows a traceback for these unless ``--debug`` is given.
"""

from __future__ import annotations

__all__ = ["OnnxqError"]


class OnnxqError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""

    exit_code = 2
