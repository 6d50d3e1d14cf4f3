"""Run `kbvq` in-process through typer's CliRunner (resume_util.py runs it as a killable subprocess)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from kbvq_cli.app import app

runner = CliRunner()


def run_cli(*args):
    """`kbvq ARGS` (each argument str()-ed, so paths and numbers can be passed as they are); the Result."""
    return runner.invoke(app, [str(arg) for arg in args])


def invoke(*args, code: int = 0):
    """`kbvq ARGS`, asserting its exit status (0 unless `code` says otherwise); the Result."""
    result = run_cli(*args)
    assert result.exit_code == code, result.output
    return result


def last_json(result) -> dict:
    """The JSON object a `--json` command prints on its last line."""
    return json.loads(result.output.strip().splitlines()[-1])
