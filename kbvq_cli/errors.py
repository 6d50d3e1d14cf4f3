"""The one exception type the CLI turns into a one-line message instead of a traceback."""


class KbvqError(Exception):
    """A problem with the user's input or run directory, phrased as what to do about it.

    The CLI prints `error: <message>` and exits with status 2. Raise it for anything a user can fix
    (unknown architecture, missing or unfinished stage, changed recipe, corrupt shard, bad option).
    """
