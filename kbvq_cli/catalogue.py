"""The recipes that rebuild the paper's tables: models x variants, and which variant fills which row.

`recipes/<model>/<variant>.yaml` are written from this table (`python -m kbvq_cli.catalogue --write`,
run from the repository's root; checked by a test), so every model has the same variants with the same
settings; they ship inside the package, where `recipe_path` finds them (kbvq_cli/package_data.py). All
variants of one model share one calibration (`runs/<model>/calibration`), the expensive pass; each
variant's other stages live in `runs/<model>/<variant>`.

A variant is a method (kbvq, gptq, fp16) plus stage settings: plain VQ is kbvq with `rank: 0` and no
BCOS; IDRE-only drops BCOS; BCOS-only drops the shared part; the others are named after the paper's
ablations. Light module: no torch (used by `--dry-run`-time tools and the Makefile).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from kbvq_cli.presets import PRESETS


@dataclass(frozen=True)
class Model:
    name: str  # the id the paper data file uses
    source: str  # hub id or local directory
    description: str
    calibrate: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)
    klt_svd: dict = field(default_factory=dict)  # model-wide klt-svd settings (e.g. an absolute rank)


@dataclass(frozen=True)
class Variant:
    name: str
    method: str  # kbvq | gptq | fp16
    bits: int | None
    description: str
    stages: dict = field(default_factory=dict)


def _testbed_eval(directory: str, seqlen: int) -> dict:
    # The paper's zero-shot tasks need the hub: the test-bed is scored by perplexity on its own test split.
    return {"ppl_data": f"{directory}/test.txt", "seqlen": seqlen, "tasks": "none"}


MODELS: dict[str, Model] = {m.name: m for m in (
    Model("qwen15-moe", "Qwen/Qwen1.5-MoE-A2.7B", "Qwen1.5-MoE-A2.7B"),
    Model("qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B", "Qwen3-30B-A3B"),
    Model("mixtral-8x7b", "mistralai/Mixtral-8x7B-v0.1", "Mixtral-8x7B"),
    Model("deepseek-v2-lite", "deepseek-ai/DeepSeek-V2-Lite", "DeepSeek-V2-Lite"),
    Model("testbed", "testbed", "the trained test-bed (make testbed)",
          calibrate={"data": "testbed/calib.txt", "samples": 64, "seqlen": 256},
          eval=_testbed_eval("testbed", 256)),
    Model("testbed-mini", "testbed-mini", "the mini test-bed (make testbed-mini)",
          calibrate={"data": "testbed-mini/calib.txt", "samples": 32, "seqlen": 128},
          eval=_testbed_eval("testbed-mini", 128),
          # min(oc, ic)/128 is below 1 on a model this small (docs/method.md §2): an absolute rank instead.
          klt_svd={"rank": 4}),
)}


def _kbvq(bits: int, klt_svd: dict | None = None, bcos: dict | None = None) -> dict:
    stages = {"vq": {"bits": bits}}
    if klt_svd:
        stages["klt-svd"] = klt_svd
    if bcos:
        stages["bcos"] = bcos
    return stages


# Variants that are presets take the preset's definition (kbvq_cli/presets.py): one record for both.
PRESET_VARIANTS = {"rtn-w2": "rtn-w2", "gptq-w2": "gptq-w2g128", "vq-w2": "vq-w2", "kbvq-w2": "kbvq-w2",
                   "kbvq-w3": "kbvq-w3", "kbvq-w2-plus": "kbvq-w2-plus", "kbvq-w3-plus": "kbvq-w3-plus"}


def _variant(name: str, method: str, bits: int, description: str, stages: dict) -> Variant:
    """The variant `name`: the preset of that name's stages where there is one, else `stages`."""
    if name in PRESET_VARIANTS:
        preset = PRESETS[PRESET_VARIANTS[name]]
        return Variant(name, preset.method, bits, description, preset.stage_settings())
    return Variant(name, method, bits, description, stages)


def _variants() -> list[Variant]:
    found = [Variant("fp16", "fp16", None, "the original checkpoint (FP16 row)", {"eval": {"target": "original"}})]
    for bits in (2, 3):
        found += [
            _variant(f"rtn-w{bits}", "gptq", bits, f"RTN, {bits}-bit, per output channel, asymmetric",
                     {"gptq": {"method": "rtn", "bits": bits, "group_size": 0}}),
            _variant(f"gptq-w{bits}", "gptq", bits, f"GPTQ, {bits}-bit in groups of 128 ({bits}.25 bits)",
                     {"gptq": {"method": "gptq", "bits": bits, "group_size": 128}}),
            _variant(f"vq-w{bits}", "kbvq", bits, f"plain VQ, {bits}-bit (no IDRE, no BCOS)",
                     _kbvq(bits, {"rank": 0}, {"mode": "none"})),
            _variant(f"kbvq-w{bits}", "kbvq", bits, f"KBVQ-MoE, {bits}-bit (IDRE + BCOS)", _kbvq(bits)),
            _variant(f"kbvq-w{bits}-plus", "kbvq", bits, f"kbvq's best {bits}-bit recipe (preset kbvq-w{bits}-plus)", {}),
            Variant(f"idre-only-w{bits}", "kbvq", bits, f"IDRE only, {bits}-bit", _kbvq(bits, bcos={"mode": "none"})),
            Variant(f"bcos-only-w{bits}", "kbvq", bits, f"BCOS only, {bits}-bit", _kbvq(bits, {"rank": 0})),
            Variant(f"svd-no-klt-w{bits}", "kbvq", bits, f"SVD without KLT, {bits}-bit", _kbvq(bits, {"klt": False})),
        ]
    for ratio, label in ((1 / 256, "1-256"), (1 / 64, "1-64"), (1 / 48, "1-48"), (1 / 32, "1-32")):
        found.append(Variant(f"rank-{label}-w2", "kbvq", 2, f"KBVQ-MoE, 2-bit, rank {label.replace('-', '/')} "
                             f"of min(oc, ic)", _kbvq(2, {"rank_ratio": ratio})))
    gptvq = {"bits": 2, "error_feedback": True}
    for name, klt_svd, bcos, label in (("gptvq-w2", {"rank": 0}, {"mode": "none"}, "GPTVQ-style"),
                                       ("gptvq-idre-w2", None, {"mode": "none"}, "GPTVQ-style + IDRE"),
                                       ("gptvq-bcos-w2", {"rank": 0}, None, "GPTVQ-style + BCOS"),
                                       ("gptvq-kbvq-w2", None, None, "GPTVQ-style + IDRE + BCOS")):
        stages = _kbvq(2, klt_svd, bcos)
        stages["vq"] = dict(gptvq)
        found.append(Variant(name, "kbvq", 2, f"{label} VQ (error feedback), 2-bit", stages))
    for mode in ("mean", "var"):
        found.append(Variant(f"bcos-{mode}-w2", "kbvq", 2, f"KBVQ-MoE, 2-bit, BCOS {mode} correction only",
                             _kbvq(2, bcos={"mode": mode})))
    return found


VARIANTS: dict[str, Variant] = {v.name: v for v in _variants()}


@dataclass(frozen=True)
class Row:
    bits: float  # the row's bit label as the paper prints it
    method: str  # the paper data file's method id
    variant: str  # the recipe that measures it


def _rows(*rows: tuple) -> tuple[Row, ...]:
    return tuple(Row(*row) for row in rows)


# Which variant measures each row of the paper's tables. Rows of methods kbvq does not implement
# (MoEQuant, VPTQ) stay in the printed table with the paper's number only. The GPTVQ rows are kbvq's
# own GPTQ-style error-feedback VQ (vq: {error_feedback: true}), not the GPTVQ authors' code.
TABLE_ROWS: dict[str, tuple[Row, ...]] = {
    "1": _rows((16, "fp16", "fp16"), *[(b, m, f"{m}-w{b}") for b in (2, 3) for m in ("rtn", "gptq", "vq", "kbvq")]),
    "2": _rows((16, "fp16", "fp16"), *[(b, paper, f"{variant}-w{b}") for b in (3, 2) for paper, variant in
                                      (("none", "vq"), ("idre-only", "idre-only"), ("bcos-only", "bcos-only"),
                                       ("kbvq", "kbvq"))]),
    "3": _rows((2, "svd-no-klt", "svd-no-klt-w2"), (2, "klt-svd", "kbvq-w2"),
               (3, "svd-no-klt", "svd-no-klt-w3"), (3, "klt-svd", "kbvq-w3")),
    "4": _rows((2.01, "rank-0", "bcos-only-w2"), (2.08, "rank-1/128", "kbvq-w2"), (2.11, "rank-1/64", "rank-1-64-w2"),
               (2.20, "rank-1/32", "rank-1-32-w2")),
    "5": _rows((2, "gptvq", "gptvq-w2"), (2, "gptvq+idre", "gptvq-idre-w2"), (2, "gptvq+bcos", "gptvq-bcos-w2"),
               (2, "gptvq+kbvq", "gptvq-kbvq-w2")),
    "7": _rows((2.05, "rank-1/256", "rank-1-256-w2"), (2.08, "rank-1/128", "kbvq-w2"),
               (2.11, "rank-1/64", "rank-1-64-w2"), (2.15, "rank-1/48", "rank-1-48-w2"),
               (2.2, "rank-1/32", "rank-1-32-w2")),
    "8": _rows((16, "fp16", "fp16"), (2, "rtn", "rtn-w2"), (2.25, "gptq", "gptq-w2"), (2.08, "vq", "vq-w2"),
               (2.08, "kbvq", "kbvq-w2")),
    "14": _rows((2, "svd-no-klt", "svd-no-klt-w2"), (2, "kbvq", "kbvq-w2")),
    "15": _rows((2, "idre-only", "idre-only-w2"), (2, "bcos-mean", "bcos-mean-w2"), (2, "bcos-var", "bcos-var-w2"),
                (2, "kbvq", "kbvq-w2")),
}


def recipe_path(model: str, variant: str) -> Path:
    """The shipped recipe of `variant` on `model` (its paths are relative to the working directory)."""
    from kbvq_cli.package_data import recipes_dir

    return recipes_dir() / model / f"{variant}.yaml"


def run_dir(model: str, variant: str) -> str:
    return f"runs/{model}/{variant}"


def recipe_data(model: Model, variant: Variant) -> dict:
    data = {"description": f"{variant.description} on {model.description}", "model": model.source,
            "run": run_dir(model.name, variant.name), "method": variant.method}
    if variant.method != "fp16":
        data["calibration"] = f"runs/{model.name}/calibration"
        data["calibrate"] = dict(model.calibrate)
    stages = {name: dict(settings) for name, settings in variant.stages.items()}
    if variant.method == "kbvq" and model.klt_svd:
        chosen = stages.setdefault("klt-svd", {})
        if not {"rank", "rank_ratio", "energy"} & set(chosen):
            chosen.update(model.klt_svd)
    stages["eval"] = {**model.eval, **stages.get("eval", {})}
    for name in ("calibrate", "gptq", "klt-svd", "vq", "bcos", "pack", "eval"):
        if name in stages:
            data[name] = stages[name]
    return {key: value for key, value in data.items() if value != {}}


def recipe_text(model: Model, variant: Variant) -> str:
    import yaml

    header = ("# Written by `python -m kbvq_cli.catalogue --write` from kbvq_cli/catalogue.py; edit that, "
              "not this file.\n")
    return header + yaml.safe_dump(recipe_data(model, variant), sort_keys=False)


def write_recipes(directory: Path, check: bool = False) -> list[Path]:
    """Write every model's recipes under `directory` (or, with check, list those that differ from the catalogue)."""
    stale = []
    for model in MODELS.values():
        for variant in VARIANTS.values():
            path, text = directory / model.name / f"{variant.name}.yaml", recipe_text(model, variant)
            if not path.exists() or path.read_text() != text:
                stale.append(path)
                if not check:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(text)
    return stale


def main(argv: list[str]) -> int:
    # A developer tool: it writes the repository's recipes/, which the working directory must be the root
    # of. Not the installed package's copy, which a wheel install holds in site-packages.
    check, directory = "--check" in argv, Path("recipes")
    if not (directory.is_dir() and Path("kbvq_cli", "catalogue.py").is_file()):
        print(f"error: run python -m kbvq_cli.catalogue from the kbvq repository's root (no ./recipes and "
              f"./kbvq_cli in {Path.cwd()})", file=sys.stderr)
        return 2
    stale = write_recipes(directory, check=check)
    if check and stale:
        print(f"{len(stale)} recipe(s) differ from kbvq_cli/catalogue.py; run python -m kbvq_cli.catalogue --write")
        return 1
    print(f"{'checked' if check else 'wrote'} recipes for {len(MODELS)} models x {len(VARIANTS)} variants")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
