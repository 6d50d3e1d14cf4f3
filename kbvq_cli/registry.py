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
        StageEntry("klt-svd", "stages.klt_svd.config:KltSvdSettings", "stages.klt_svd.stage:run", ("calibrate",)),
        StageEntry("vq", "stages.vq.config:VqSettings", "stages.vq.stage:run", ("klt-svd",)),
        StageEntry("bcos", "stages.bcos.config:BcosSettings", "stages.bcos.stage:run", ("calibrate", "vq")),
        StageEntry("pack", "stages.pack.config:PackSettings", "stages.pack.stage:run", ("klt-svd", "vq", "bcos")),
        StageEntry("eval", "stages.eval.config:EvalSettings", "stages.eval.stage:run", ("pack",)),
    )
}

STAGE_ORDER = tuple(STAGES)
