"""The one exception type that means "the user asked for something we can't do", and how it quotes input."""

EXCERPT_CHARS = 80


def shorten(text: str, limit: int) -> str:
    """`text` cut to `limit` characters with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def excerpt(value, limit: int = EXCERPT_CHARS) -> str:
    """repr(value) on one line, cut to `limit` characters with an ellipsis: never echo a huge user value."""
    return shorten(" ".join(repr(value.to_dict() if hasattr(value, "to_dict") else value).splitlines()), limit)


class UserError(Exception):
    """A problem with the user's input: main.py prints its message as one line and exits non-zero."""


class Interrupted(Exception):
    """Ctrl-C stopped training between updates (after saving a checkpoint): main.py prints it, exits 130."""
