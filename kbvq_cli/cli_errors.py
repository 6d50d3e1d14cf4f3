"""How the `kbvq` commands report failure: a KbvqError or a failed write becomes one line, `error: ...`,
with exit status 2; Ctrl-C becomes a resume hint; click's usage errors are put in the same style.

Part of the CLI layer (with kbvq_cli/app.py), kept apart so app.py holds only the commands.
"""

from __future__ import annotations

from contextlib import contextmanager

import typer

from kbvq_cli.errors import KbvqError


def print_error(message: str) -> None:
    """`error: <message>` on one line, printed literally."""
    from kbvq_cli.console import error

    error(message)


@contextmanager
def user_errors():
    """Turn a KbvqError, or a write that failed on a full or read-only disk, into `error: <message>` and
    exit status 2; Ctrl-C into a resume hint."""
    from kbvq_cli.console import info
    from kbvq_cli.disk_errors import write_error

    from kbvq_cli.distributed import leave_on_error, shutdown

    try:
        yield
    except KbvqError as error:
        if leave_on_error(error):  # under torchrun a rank whose peer failed leaves quietly
            print_error(str(error))
        raise typer.Exit(2) from None
    except Exception as error:  # a mkdir, copy or figure that hit ENOSPC/EROFS/EACCES outside atomic_write
        translated = write_error(error)
        if translated is None:
            raise
        print_error(str(translated))
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        info("interrupted; rerun the same command to resume where it stopped")
        raise typer.Exit(130) from None
    finally:
        shutdown()  # torchrun's processes leave their process group before they exit


def usage_message(error) -> str:
    """click's message on one line, in kbvq's style, pointing at the command's help."""
    message = " ".join(error.format_message().split()).rstrip(".")
    message = message[:1].lower() + message[1:]
    command = error.ctx.command_path if error.ctx is not None else "kbvq"
    return f"{message}; see `{command} --help`"
