"""The one exception type normscope raises for bad input.

Every message is one line: what was wrong, and what to do about it. The CLI prints it
without a traceback (``--debug`` shows one).
"""


class NormscopeError(Exception):
    """A problem with the user's input or files, explained in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
