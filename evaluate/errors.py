"""The evaluate stage's error type: one clear line at the CLI, never a traceback."""

from __future__ import annotations

from codejepa.core import CodejepaError


class EvaluateError(CodejepaError):
    """An evaluation that cannot be done as asked (mismatched inputs, empty pools, bad options)."""
