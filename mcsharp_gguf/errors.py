"""One exception type for every user-facing failure: a single line naming the thing and the fix."""


class McsharpError(Exception):
    """Bad input or environment; ``str(e)`` is a one-line message that says what to do."""
