"""The one exception type the CLI turns into a one-line message instead of a traceback."""


class KbvqError(Exception):
    """A problem with the user's input or run directory, phrased as what to do about it.

    The CLI prints `error: <message>` and exits with status 2. Raise it for anything a user can fix
    (unknown architecture, missing or unfinished stage, changed recipe, corrupt shard, bad option).
    """


def exit_status(call) -> int:
    """Run `call()` for a script's `main`: 0, or, on a KbvqError, its one line `error: ...` on stderr and 2 (what
    the CLI does for its commands)."""
    import sys

    try:
        call()
    except KbvqError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
