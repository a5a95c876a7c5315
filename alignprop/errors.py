"""The one exception type that means "the user asked for something we can't do"."""


class UserError(Exception):
    """A problem with the user's input: main.py prints its message as one line and exits non-zero."""


class Interrupted(Exception):
    """Ctrl-C stopped training between updates (after saving a checkpoint): main.py prints it, exits 130."""
