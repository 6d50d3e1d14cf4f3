"""`python -m kbvq_cli ARGS`: the `kbvq` command, for an environment whose scripts directory is not on PATH."""

from kbvq_cli.app import main

main()
