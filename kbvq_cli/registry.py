"""The one explicit table of stages: name -> settings class, runner, upstream stages.

Entries are import paths resolved on use, so `kbvq --help` and `--dry-run` stay free of torch. The
upstream stages declared here are the ones a stage's manifest hashes (`kbvq_cli.stage_run`) and the
order `kbvq run` follows (`pipeline_stages`); no stage keeps a copy.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class StageEntry:
    name: str
    settings: str  # "module:Class", a frozen dataclass (light import)
    runner: str  # "module:function", run(resolved, restart) -> summary dict
    # Stages whose output this one reads, by method where that differs (pack reads vq's or gptq's codes).
    upstream: tuple[str, ...] | dict[str, tuple[str, ...]]
    optional: tuple[str, ...] = ()  # read when they ran and produced units

    def settings_class(self):
        return _resolve(self.settings)

    def runner_function(self):
        return _resolve(self.runner)


def _resolve(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


STAGES: dict[str, StageEntry] = {
    entry.name: entry
    for entry in (
        StageEntry("calibrate", "stages.calibrate.config:CalibrateSettings", "stages.calibrate.stage:run", ()),
        StageEntry("gptq", "stages.gptq.config:GptqSettings", "stages.gptq.stage:run", ("calibrate",)),
        StageEntry("klt-svd", "stages.klt_svd.config:KltSvdSettings", "stages.klt_svd.stage:run", ("calibrate",)),
        StageEntry("vq", "stages.vq.config:VqSettings", "stages.vq.stage:run", ("calibrate", "klt-svd")),
        StageEntry("bcos", "stages.bcos.config:BcosSettings", "stages.bcos.stage:run", ("calibrate", "klt-svd", "vq")),
        StageEntry("nonexpert", "stages.nonexpert.config:NonExpertSettings", "stages.nonexpert.stage:run",
                   ("calibrate",)),
        StageEntry("pack", "stages.pack.config:PackSettings", "stages.pack.stage:run",
                   {"kbvq": ("klt-svd", "vq", "bcos"), "gptq": ("gptq",)}, optional=("nonexpert",)),
        StageEntry("eval", "stages.eval.config:EvalSettings", "stages.eval.stage:run",
                   {"kbvq": ("pack",), "gptq": ("pack",), "fp16": ()}),
    )
}


# A recipe's `method` picks the stages `kbvq run` runs. Ablations (plain VQ, IDRE-only, BCOS-only,
# SVD without KLT, rank sweeps, BCOS mean/variance) are kbvq recipes with other stage settings;
# RTN and GPTQ are the gptq stage's two methods; fp16 evaluates the original checkpoint.
METHODS: dict[str, tuple[str, ...]] = {
    "kbvq": ("calibrate", "klt-svd", "vq", "bcos", "nonexpert", "pack", "eval"),
    "gptq": ("calibrate", "gptq", "nonexpert", "pack", "eval"),
    "fp16": ("eval",),
}


def upstream_of(stage: str, method: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) upstream stages of `stage` in a run of `method`."""
    entry = STAGES[stage]
    required = entry.upstream.get(method, ()) if isinstance(entry.upstream, dict) else entry.upstream
    return required, entry.optional


def pipeline_stages(method: str) -> tuple[str, ...]:
    """The stages `kbvq run` runs for `method`, in order; each one's upstream stages come before it."""
    stages = METHODS[method]
    for position, stage in enumerate(stages):
        required, optional = upstream_of(stage, method)
        late = [name for name in (*required, *optional) if name in stages and stages.index(name) > position]
        missing = [name for name in required if name not in stages]
        if late or missing:
            raise AssertionError(f"method {method}: {stage} needs {late + missing} before it")
    return stages
