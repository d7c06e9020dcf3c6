"""The one formatter of errors for users: whatever was raised, one line."""

from __future__ import annotations

MAX_CHARS = 1000


def one_line(error: BaseException | str, max_chars: int = MAX_CHARS) -> str:
    """The message as one line. Our own errors are one line already and pass unchanged. An error raised in a
    DataLoader worker arrives wrapped in the worker's traceback, whose last line is `module.Class: the message`; a
    library's multi-line message is cut to its first line; an empty one becomes the exception's type name."""
    text = (error if isinstance(error, str) else str(error)).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    else:
        text = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not text:
        text = type(error).__name__ if not isinstance(error, str) else "error"
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


def cause_line(error: BaseException) -> str:
    """A library error's first line, with the next one when the first only announces it (torch.compile's
    "backend='inductor' raised:" and then the cause)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    return " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]


def os_reason(error: BaseException) -> str:
    """What went wrong in a write, in the system's words where it has them ("No space left on device")."""
    return getattr(error, "strerror", None) or one_line(error)
