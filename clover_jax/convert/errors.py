"""The one error type every checkpoint reader raises for a file it cannot trust or understand."""
from __future__ import annotations


class CheckpointFormatError(ValueError):
    """A checkpoint file is damaged, hostile or not in a format we read; the message names the file
    (and the tensor, when one is at fault) in one line."""


def clip(text: object, limit: int = 160) -> str:
    """`text` as one short line, safe to put in an error message."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."
