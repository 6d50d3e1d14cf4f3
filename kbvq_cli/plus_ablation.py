"""The plus ablation (`kbvq table plus`, `make plus-ablation`): what each part of kbvq's own recipe adds to
the paper's 2-bit KBVQ, over k-means seeds and test-beds.

Every arm is a test-bed family's recipe (recipes/FAMILY/VARIANT.yaml, FAMILY `testbed-mini` for the
mini-sized test-beds and `testbed` for the full-sized ones) pointed at the test-bed directory, with the
arm's settings laid over it and the k-means seed set; its run is `runs/TESTBED/plus/ARM-sSEED` (a gptq
arm has no seed: `-s0` for all), so a second call resumes or only reads. Arms that change calibrate
(`routing: all`) get their own shared calibration, `runs/TESTBED/calibration-ARMPART`; the rest share
`runs/TESTBED/calibration`. A `budget` arm sets `klt-svd: {target_bits: B}` with B the measured bits per
expert weight of the same test-bed's `kbvq-w2` run, so its bits equal the paper recipe's (at or below);
its `budget_settings` then go over klt-svd (the code-size arms: `code_sizes`, and `rank: 0` for BCOS-only
at those bits).

Library module: the recipes and the table; running them is the caller's (`kbvq_cli.tables`). No torch.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kbvq_cli.errors import KbvqError
from kbvq_cli.presets import PLUS_REFINE_ITERS, PLUS_VQ


@dataclass(frozen=True)
class Arm:
    name: str
    variant: str  # the family recipe it starts from
    settings: dict = field(default_factory=dict)  # stage -> settings laid over it
    budget: bool = False  # klt-svd target_bits = the kbvq-w2 arm's measured bits
    seeded: bool = True  # k-means seeds matter (not for gptq)
    calibration: str = ""  # suffix of its own calibration directory ("" = the shared one)
    budget_settings: dict = field(default_factory=dict)  # klt-svd settings laid over a budget arm's target_bits


ROUTING_ALL = {"calibrate": {"routing": "all"}}
PLUS = {"vq": {**PLUS_VQ, "refine_iters": PLUS_REFINE_ITERS}}
# The code sizes a budget may choose besides vq's 2x4 (stages/klt_svd/budget.py weighs their codebooks);
# not 3x4: plus's codebook refinement does not take 4096-entry codebooks.
CODE_SIZES = {"code_sizes": ["2x2", "3x2", "4x2"]}
BCOS_ONLY_CODE_SIZES = {"rank": 0, **CODE_SIZES}  # every bit of the budget spent on code sizes, none on IDRE

ARMS: dict[str, Arm] = {arm.name: arm for arm in (
    Arm("kbvq-w2", "kbvq-w2"),
    Arm("bcos-only", "kbvq-w2", {"klt-svd": {"rank": 0}}),
    Arm("gptq-w2g128", "gptq-w2", seeded=False),
    # GPTQ with smaller groups, to bracket the KBVQ arms' measured bits (2.71 on the full-sized test-beds:
    # groups of 64 are 2.5 bits, of 32 are 3.0), since groups of 128 are only 2.25
    Arm("gptq-w2g64", "gptq-w2", {"gptq": {"group_size": 64}}, seeded=False),
    Arm("gptq-w2g32", "gptq-w2", {"gptq": {"group_size": 32}}, seeded=False),
    Arm("kbvq-w2-plus", "kbvq-w2-plus"),
    # the parts, each alone over kbvq-w2
    Arm("routing-all", "kbvq-w2", ROUTING_ALL, calibration="routing-all"),
    Arm("output", "kbvq-w2", {"vq": {"objective": "output"}}),
    Arm("refine", "kbvq-w2", {"vq": {"refine_iters": PLUS_REFINE_ITERS}}),
    Arm("ef", "kbvq-w2", {"vq": {"error_feedback": True}}),
    Arm("budget", "kbvq-w2", budget=True),
    # combinations the other measurements asked for
    Arm("output+refine", "kbvq-w2", {"vq": {"objective": "output", "refine_iters": PLUS_REFINE_ITERS}}),
    Arm("ef+refine", "kbvq-w2", {"vq": {"error_feedback": True, "refine_iters": PLUS_REFINE_ITERS}}),
    Arm("ef+output", "kbvq-w2", {"vq": {"error_feedback": True, "objective": "output"}}),
    Arm("plus+routing-all", "kbvq-w2-plus", ROUTING_ALL, calibration="routing-all"),
    Arm("plus+budget", "kbvq-w2-plus", budget=True),
    Arm("bcos-only+plus", "kbvq-w2", {"klt-svd": {"rank": 0}, **PLUS}),
    # a budget that chooses code sizes too, and BCOS-only at the paper recipe's bits (IDRE against no IDRE)
    Arm("codebits", "kbvq-w2", budget=True, budget_settings=CODE_SIZES),
    Arm("bcos-only-eqbits", "kbvq-w2", budget=True, budget_settings=BCOS_ONLY_CODE_SIZES),
    Arm("plus+codebits", "kbvq-w2-plus", budget=True, budget_settings=CODE_SIZES),
    # the same question with plus's vq options on both sides: kbvq-w2-plus against this
    Arm("plus+bcos-only-eqbits", "kbvq-w2-plus", budget=True, budget_settings=BCOS_ONLY_CODE_SIZES),
)}
DEFAULT_ARMS = ("kbvq-w2", "bcos-only", "gptq-w2g128", "kbvq-w2-plus", "routing-all", "output", "refine", "ef",
                "budget")
FAMILY_OF_VARIANT = {"mini": "testbed-mini", "upcycled-mini": "testbed-mini", "full": "testbed",
                     "upcycled": "testbed"}


def family_of(testbed: str) -> str:
    """The recipe family of a test-bed directory, from its testbed.json's variant."""
    path = Path(testbed) / "testbed.json"
    if not path.exists():
        raise KbvqError(f"{testbed} is not a built test-bed (no testbed.json); build it with "
                        f"`kbvq testbed --variant mini --out {testbed}` (or another variant)")
    variant = json.loads(path.read_text()).get("variant", "full")
    return FAMILY_OF_VARIANT.get(variant, "testbed")


def parse_arms(text: str | None) -> list[str]:
    names = list(DEFAULT_ARMS) if not text else [part for part in text.split(",") if part]
    unknown = [name for name in names if name not in ARMS]
    if unknown:
        raise KbvqError(f"unknown arm(s) {', '.join(unknown)}; use some of {', '.join(ARMS)}")
    return names


def run_name(arm: str, seed: int) -> str:
    return f"{arm}-s{seed if ARMS[arm].seeded else 0}" if arm in ARMS else f"{arm}-s{seed}"


def _retarget(recipe: dict, family: str, testbed: str) -> dict:
    """A `family` recipe (e.g. testbed-mini's) pointed at another test-bed directory of the same size."""
    text = yaml.safe_dump(recipe, sort_keys=False)
    return yaml.safe_load(text.replace(f"{family}/", f"{testbed}/").replace(f"model: {family}\n", f"model: {testbed}\n"))


def arm_recipe(recipes: Path, testbed: str, arm: str, seed: int, target_bits: float | None = None) -> Path:
    """recipes/FAMILY/VARIANT.yaml on TESTBED with the arm's settings laid over it, written to
    runs/TESTBED/plus/RUN.yaml (`arm` may also be `fp16`)."""
    family = family_of(testbed)
    spec = ARMS.get(arm, Arm(arm, arm, seeded=False))
    recipe = _retarget(yaml.safe_load((recipes / family / f"{spec.variant}.yaml").read_text()), family, testbed)
    name = run_name(arm, seed)
    recipe["run"] = f"runs/{testbed}/plus/{name}"
    recipe["description"] = f"plus ablation {name}: {spec.variant} with {spec.settings or 'nothing'} over it"
    if spec.calibration:
        recipe["calibration"] = f"runs/{testbed}/calibration-{spec.calibration}"
    for stage, settings in spec.settings.items():
        recipe[stage] = {**recipe.get(stage, {}), **settings}
    if spec.budget:
        klt = {key: value for key, value in recipe.get("klt-svd", {}).items()
               if key not in ("rank", "rank_ratio", "energy")}
        recipe["klt-svd"] = {**klt, "target_bits": target_bits, **spec.budget_settings}
    if spec.seeded and recipe.get("method", "kbvq") == "kbvq":
        recipe["vq"] = {**recipe.get("vq", {}), "seed": seed}
    path = Path(f"runs/{testbed}/plus/{name}.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def measured(run: Path) -> dict | None:
    """bits, vq's and bcos's mean relative output errors, and test perplexity of a finished run; else None."""
    def summary(stage):
        path = run / stage / "manifest.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        return data.get("summary") if data.get("complete") else None

    results = run / "eval" / "results.json"
    if not results.exists() or summary("pack") is None:
        return None
    (entry,) = json.loads(results.read_text())["entries"].values()
    vq, bcos = summary("vq"), summary("bcos")
    return {"bits": summary("pack")["storage"]["bits_per_expert_weight"], "ppl": entry["ppl"],
            "vq_error": vq["mean_relative_output_error"] if vq else None,
            "bcos_error": bcos["mean_relative_output_error_after"] if bcos else None}


def fp_ppl(testbed: str) -> float | None:
    results = Path(f"runs/{testbed}/plus/{run_name('fp16', 0)}/eval/results.json")
    if not results.exists():
        return None
    (entry,) = json.loads(results.read_text())["entries"].values()
    return entry["ppl"]


def _mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table_lines(testbed: str, arms: list[str], seeds: list[int]) -> list[str]:
    """The markdown table of one test-bed: per arm the mean and spread (sample standard deviation) over
    seeds of ppl - FP, with the means of bits and errors, and that mean loss as a multiple of the
    `kbvq-w2` arm's over the same seeds (the issue's measure: the plus recipe should be at most 0.6x);
    arms not yet run show as missing. `runs` counts the finished runs (a gptq arm has one for every seed)."""
    fp = fp_ppl(testbed)
    lines = [f"{testbed} (recipes of {family_of(testbed)}), 2 bits, k-means seeds {','.join(map(str, seeds))}; "
             f"FP test perplexity {fp:.2f}" if fp is not None else f"{testbed}: FP perplexity not measured yet", "",
             "| arm | runs | bits/weight | rel. output error (vq) | after BCOS | test ppl | ppl - FP (mean ± sd) "
             "| x kbvq-w2's loss |",
             "|---|---|---|---|---|---|---|---|"]

    def finished(arm: str) -> list[dict]:
        runs = sorted({run_name(arm, seed) for seed in seeds})
        return [m for m in (measured(Path(f"runs/{testbed}/plus/{name}")) for name in runs) if m]

    found_by_arm = {arm: finished(arm) for arm in dict.fromkeys([*arms, "kbvq-w2"])}  # each run read once
    paper = found_by_arm["kbvq-w2"] if fp is not None else []
    paper_loss = statistics.fmean([m["ppl"] - fp for m in paper]) if paper else None
    for arm in arms:
        found = found_by_arm[arm]
        if not found or fp is None:
            lines.append(f"| {arm} | 0 | | | | | not run | |")
            continue
        cells = [f"{arm}", str(len(found))]
        for key, fmt in (("bits", "{:.3f}"), ("vq_error", "{:.4f}"), ("bcos_error", "{:.4f}"), ("ppl", "{:.2f}")):
            values = [m[key] for m in found if m[key] is not None]
            cells.append(fmt.format(statistics.fmean(values)) if values else "-")
        mean, spread = _mean_spread([m["ppl"] - fp for m in found])
        cells.append(f"{mean:+.3f} ± {spread:.3f}" if len(found) > 1 else f"{mean:+.3f} (one run)")
        cells.append(f"{mean / paper_loss:.2f}x" if paper_loss else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines
