"""The plus ablation over seeds and test-beds (`make plus-ablation`): `kbvq table plus` from a script.

Each arm (kbvq_cli/plus_ablation.py: kbvq-w2, bcos-only, gptq-w2g128, kbvq-w2-plus and the parts: routing
all, output-aware k-means, refinement, error feedback, budget) runs on every test-bed and k-means seed
given, resuming what is done (runs/TESTBED/plus/ARM-sSEED), then the table prints: per arm the mean and
spread over seeds of ppl - FP, the measured bits per expert weight and the mean relative output errors.

    python benchmarks/plus_ablation.py [--testbed testbed-mini ...] [--seeds 0,1,2] [--arms kbvq-w2,...]
                                       [--no-run] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    from kbvq_cli.errors import exit_status
    from kbvq_cli.plus_ablation import ARMS, DEFAULT_ARMS
    from kbvq_cli.tables import print_plus_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--testbed", action="append", help="test-bed directory (repeatable; default testbed-mini)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"comma-separated, of: {', '.join(ARMS)}")
    parser.add_argument("--no-run", action="store_true", help="only print what has been run")
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args()
    return exit_status(lambda: print_plus_table(args.testbed or ["testbed-mini"], args.arms, args.seeds,
                                                not args.no_run, Path(args.markdown) if args.markdown else None))


if __name__ == "__main__":
    sys.exit(main())
