"""One run, one lineage: a stage builds only on upstream stages made from what it reads itself.

Each manifest records the stage's inputs: the model fingerprint, the hashes of the upstream manifests
it read, and so on. Before a stage writes anything, `check_lineage` compares what this command would
read with what each upstream stage recorded: the same model, and the same version of every stage
both of them read. Without it a run could hold the calibration of one model and the codes of another
(a recipe pointed elsewhere, then `--restart` of a later stage), and nothing downstream would notice:
the tensor shapes of two MoE models often agree.
"""

from __future__ import annotations

from pathlib import Path

from kbvq_cli.errors import KbvqError
from kbvq_cli.provenance import ROOT_STAGE, model_sides, value_changes
from kbvq_cli.stage_dir import MANIFEST, StageDir, read_manifest

# Where a stage ran, not what it was made from: a stage on the GPU may follow one on the CPU.
PER_STAGE_INPUTS = frozenset({"compute"})


def check_lineage(run_dir: Path, inputs: dict, labels: dict, upstream: dict[str, StageDir]) -> None:
    """Refuse (KbvqError) unless every upstream stage recorded the same inputs as `inputs` where both
    record one (the model), and read the same version of every stage that both read."""
    for name, stage_dir in upstream.items():
        recorded = stage_dir.manifest.get("inputs", {})
        for key in sorted(set(inputs) & set(recorded) - PER_STAGE_INPUTS - {"upstream"}):
            if inputs[key] != recorded[key]:
                raise KbvqError(_mismatch(Path(run_dir), name, stage_dir, key, inputs[key], labels))
        ours, theirs = inputs.get("upstream", {}), recorded.get("upstream", {})
        for shared in sorted(set(ours) & set(theirs)):
            if ours[shared] != theirs[shared]:
                raise KbvqError(
                    f"{name} in {run_dir} was made from an earlier {shared} ({shared} has been redone since); "
                    f"redo {name} first: `kbvq {name} --run {run_dir} --restart`")


def _mismatch(run_dir: Path, name: str, stage_dir: StageDir, key: str, value, labels: dict) -> str:
    recorded = stage_dir.manifest["inputs"][key]
    if key != "model":
        changes = "; ".join(value_changes(recorded, value, key)[:3])
        return (f"{name} in {run_dir} was made from other inputs than this command names ({changes}); "
                f"redo {name} first (`kbvq {name} --run {run_dir} --restart`), or use another --run")
    root = _root_manifest(run_dir, name, stage_dir)
    if root is not None and root.get("inputs", {}).get("model") != value:
        # The run itself is of another model: redoing the one stage would only be refused in turn.
        before, after = model_sides(root["inputs"]["model"], root.get("labels", {}).get("model"),
                                    value, labels.get("model"))
        return f"{run_dir} was calibrated on {before}; this command names {after}; use another --run"
    before, after = model_sides(recorded, stage_dir.manifest.get("labels", {}).get("model"), value, labels.get("model"))
    return (f"{name} in {run_dir} was made from {before}; this command names {after}; "
            f"redo {name} first (`kbvq {name} --run {run_dir} --restart`), or use another --run")


def _root_manifest(run_dir: Path, name: str, stage_dir: StageDir) -> dict | None:
    if name == ROOT_STAGE:
        return stage_dir.manifest
    path = run_dir / ROOT_STAGE
    return read_manifest(path) if (path / MANIFEST).exists() else None
