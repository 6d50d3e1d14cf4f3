"""The one explicit table of stages: name -> settings class, runner, upstream stages.

Entries are import paths resolved on use, so `kbvq --help` and `--dry-run` stay free of torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class StageEntry:
    name: str
    settings: str  # "module:Class", a frozen dataclass (light import)
    runner: str  # "module:function", run(context, settings) -> summary dict
    upstream: tuple[str, ...]

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
        StageEntry("vq", "stages.vq.config:VqSettings", "stages.vq.stage:run", ("klt-svd",)),
        StageEntry("bcos", "stages.bcos.config:BcosSettings", "stages.bcos.stage:run", ("calibrate", "vq")),
        StageEntry("nonexpert", "stages.nonexpert.config:NonExpertSettings", "stages.nonexpert.stage:run",
                   ("calibrate",)),
        StageEntry("pack", "stages.pack.config:PackSettings", "stages.pack.stage:run", ("vq|gptq",)),
        StageEntry("eval", "stages.eval.config:EvalSettings", "stages.eval.stage:run", ("pack",)),
    )
}

STAGE_ORDER = tuple(STAGES)

# A recipe's `method` picks the stages `kbvq run` runs. Ablations (plain VQ, IDRE-only, BCOS-only,
# SVD without KLT, rank sweeps, BCOS mean/variance) are kbvq recipes with other stage settings;
# RTN and GPTQ are the gptq stage's two methods; fp16 evaluates the original checkpoint.
METHODS: dict[str, tuple[str, ...]] = {
    "kbvq": ("calibrate", "klt-svd", "vq", "bcos", "nonexpert", "pack", "eval"),
    "gptq": ("calibrate", "gptq", "nonexpert", "pack", "eval"),
    "fp16": ("eval",),
}
