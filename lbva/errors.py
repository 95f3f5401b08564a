"""The one exception type for mistakes a user can fix (bad config, bad path, bad data).

The CLI prints such an error as one line and exits with status 2; anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """Bad input from the user: the message names the file, field or option and what to do."""
