"""The one exception type that reaches the user as a message rather than a traceback."""


class ShoalError(Exception):
    """A problem with the user's input or environment, worded for the user.

    The message should name the file, line or key at fault and say what was expected.
    `shoal.cli` prints it as `shoal <command>: error: <message>` and exits with status 2.
    """
