"""User-facing errors.

Anything a user can cause (bad flags, bad files, a checkpoint from another model) raises
``FastlmError`` with a one-line message that names the problem and what to do. The CLI prints it as
``fastlm: error: <message>`` and exits with status 2, without a traceback.
"""


class FastlmError(Exception):
    """A problem with the user's input, reported as one line and exit status 2."""
