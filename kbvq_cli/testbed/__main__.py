"""`python -m kbvq_cli.testbed --out DIR [--variant full|mini] [--force]`: build a test-bed directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kbvq_cli.errors import exit_status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kbvq_cli.testbed", description=__doc__)
    parser.add_argument("--out", default="testbed", help="output directory (default: testbed)")
    parser.add_argument("--variant", default="full", choices=("full", "mini", "upcycled", "upcycled-mini"),
                        help="full: about half an hour on 2 cores; mini: about two minutes, for CI; upcycled(-mini): "
                             "a dense model's MLP copied into every expert, then trained as an MoE")
    parser.add_argument("--compare", help="a built test-bed to record beside this one")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    from kbvq_cli.testbed.build import build_testbed

    return exit_status(lambda: build_testbed(Path(args.out), variant=args.variant, force=args.force,
                                             compare=Path(args.compare) if args.compare else None))


if __name__ == "__main__":
    sys.exit(main())
