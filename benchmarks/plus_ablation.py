"""What each output-aware VQ option adds to the paper's 2-bit KBVQ on a test-bed (`make plus-ablation`).

Every arm is the `kbvq-w2` recipe of a test-bed size (recipes/FAMILY/kbvq-w2.yaml: the `kbvq-w2` preset
with that size's calibration, rank and evaluation settings), pointed at the test-bed directory TESTBED
(another of the same size, e.g. the upcycled one, may stand in), with the arm's settings laid over it,
one k-means seed; all arms share one calibration (runs/TESTBED/calibration). Prints, per arm: measured bits per
expert weight, vq's mean relative output error (before BCOS), bcos's after, and test perplexity beside
the FP one. Runs resume: a second call only prints.

    python benchmarks/plus_ablation.py [--family testbed-mini] [--testbed DIR] [--seed 42] [--arms kbvq-w2,...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# arm -> stage settings laid over the kbvq-w2 recipe (2 bits throughout: the same codebook and index bits)
ARMS: dict[str, dict] = {
    "kbvq-w2": {},
    "output": {"vq": {"objective": "output"}},
    "refine": {"vq": {"refine_iters": 4}},
    "output+refine": {"vq": {"objective": "output", "refine_iters": 4}},
    "ef": {"vq": {"error_feedback": True}},
    "ef+refine": {"vq": {"error_feedback": True, "refine_iters": 4}},
    "ef+output": {"vq": {"error_feedback": True, "objective": "output"}},
    "ef+output+refine": {"vq": {"error_feedback": True, "objective": "output", "refine_iters": 4}},
    "bcos-only": {"klt-svd": {"rank": 0}},
    "bcos-only+ef+output+refine": {"klt-svd": {"rank": 0},
                                   "vq": {"error_feedback": True, "objective": "output", "refine_iters": 4}},
}
DEFAULT_ARMS = "kbvq-w2,output,refine,output+refine,ef,ef+output,ef+refine,ef+output+refine"


def _retarget(recipe: dict, family: str, testbed: str) -> dict:
    """A `family` recipe (e.g. testbed-mini's) pointed at another test-bed directory of the same size."""
    text = yaml.safe_dump(recipe, sort_keys=False)
    return yaml.safe_load(text.replace(f"{family}/", f"{testbed}/").replace(f"model: {family}\n", f"model: {testbed}\n"))


def arm_recipe(family: str, testbed: str, arm: str, seed: int, variant: str = "kbvq-w2") -> Path:
    """recipes/FAMILY/VARIANT.yaml on TESTBED with the arm's settings laid over it (and the k-means seed),
    written to runs/TESTBED/plus/ARM-sSEED.yaml."""
    recipe = _retarget(yaml.safe_load((ROOT / "recipes" / family / f"{variant}.yaml").read_text()), family, testbed)
    name = f"{arm}-s{seed}"
    recipe["run"] = f"runs/{testbed}/plus/{name}"
    recipe["description"] = f"plus ablation {name}: {variant} with {ARMS.get(arm, {})}"
    for stage, settings in ARMS.get(arm, {}).items():
        recipe[stage] = {**recipe.get(stage, {}), **settings}
    if variant != "fp16":
        recipe["vq"] = {**recipe.get("vq", {}), "seed": seed}
    path = Path(f"runs/{testbed}/plus/{name}.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def measured(run: Path) -> dict:
    def summary(stage):
        return json.loads((run / stage / "manifest.json").read_text())["summary"]

    (entry,) = json.loads((run / "eval" / "results.json").read_text())["entries"].values()
    return {"bits": summary("pack")["storage"]["bits_per_expert_weight"],
            "vq_error": summary("vq")["mean_relative_output_error"],
            "bcos_error": summary("bcos")["mean_relative_output_error_after"], "ppl": entry["ppl"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="testbed-mini", help="whose recipes: testbed-mini or testbed")
    parser.add_argument("--testbed", default=None, help="test-bed directory of that size (default: the family's)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma-separated, of: {', '.join(ARMS)}")
    args = parser.parse_args()
    from kbvq_cli.pipeline import run_recipe

    testbed = args.testbed or args.family
    fp_run = run_recipe(str(arm_recipe(args.family, testbed, "fp16", 0, variant="fp16")), None)
    (fp_entry,) = json.loads((fp_run / "eval" / "results.json").read_text())["entries"].values()
    rows = [(arm, measured(run_recipe(str(arm_recipe(args.family, testbed, arm, args.seed)), None)))
            for arm in args.arms.split(",")]
    print(f"\n{testbed}, 2 bits, k-means seed {args.seed}; FP test perplexity {fp_entry['ppl']:.2f}\n")
    print("| arm | settings over kbvq-w2 | bits/weight | rel. output error (vq) | after BCOS | test ppl | ppl - FP |")
    print("|---|---|---|---|---|---|---|")
    for arm, m in rows:
        print(f"| {arm} | {ARMS[arm] or 'the paper'} | {m['bits']:.2f} | {m['vq_error']:.4f} | {m['bcos_error']:.4f} | "
              f"{m['ppl']:.2f} | {m['ppl'] - fp_entry['ppl']:+.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
