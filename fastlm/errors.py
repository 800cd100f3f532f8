"""User-facing errors.

Anything a user can cause (bad flags, bad files, a checkpoint from another model) raises
``FastlmError`` with a one-line message that names the problem and what to do. The CLI prints it as
``fastlm: error: <message>`` and exits with status 2, without a traceback.
"""


class FastlmError(Exception):
    """A problem with the user's input, reported as one line and exit status 2."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): what fits in a one-line
    error that passes on a library's words."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def short(error: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, at most about ``limit`` characters, cut between words (never in the
    middle of a word or a quoted name)."""
    text = " ".join(str(error).split()) or type(error).__name__
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " ..."
