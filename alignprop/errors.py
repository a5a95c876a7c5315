"""The one exception type that means "the user asked for something we can't do", and how it quotes input."""

import argparse

EXCERPT_CHARS = 80


def shorten(text: str, limit: int) -> str:
    """`text` cut to `limit` characters with an ellipsis."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def excerpt(value, limit: int = EXCERPT_CHARS) -> str:
    """repr(value) on one line, cut to `limit` characters with an ellipsis: never echo a huge user value."""
    return shorten(" ".join(repr(value.to_dict() if hasattr(value, "to_dict") else value).splitlines()), limit)


def first_line(error: Exception, limit: int = 100) -> str:
    """The error's type and the first line of its text, cut to `limit` characters (it may quote a long path)."""
    text = str(error).strip().splitlines()
    return shorten(f"{type(error).__name__}: {text[0] if text else ''}", limit)


class UserError(Exception):
    """A problem with the user's input: main.py prints its message as one line and exits non-zero."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the tools' own command lines (`alignprop compare`, `alignprop curves`): a usage error is the
    project's one line, not argparse's usage text and exit status."""

    def error(self, message: str):
        raise UserError(message)


class Interrupted(Exception):
    """Ctrl-C stopped training between updates (after saving a checkpoint): main.py prints it, exits 130."""
