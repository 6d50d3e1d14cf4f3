"""Layer-streamed stages (calibrate, bcos --propagate): committing a layer with the activations that feed
the next one, and planning which layers to run when a stage resumes or repairs itself.

Commit order: the layer's shard and the next activations are written first, then one manifest commit
names both, then the previous activations file is deleted. A kill at any point leaves a manifest that
names a consistent (layer done, activations for the next layer) pair, so the run resumes bit-identically.

Only the latest activations are kept (one is the size of the whole calibration set's hidden states), so
a layer shard lost *before* that checkpoint, or a lost checkpoint, cannot resume from it. The input of
any layer can always be recomputed from the stored tokens, though: `plan_layers` then starts from the
embeddings and reruns the layers before it forward only (same code, same batches, so the same bits),
and says how many layers that is.

Under torchrun (calibrate's data parallel, `kbvq_cli.data_parallel`) each rank holds and checkpoints
its own blocks of sequences; rank 0 commits every rank's file, and a rerun of any world size reads its
blocks from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from kbvq_cli.console import info, warn
from kbvq_cli.data_parallel import Blocks, read_blocks
from kbvq_cli.distributed import all_gather_object, world
from kbvq_cli.stage_dir import FileRecord, StageDir


def commit_layer(stage_dir: StageDir, index: int, unit: tuple[str, dict, dict] | None, hidden, state: dict,
                 blocks: Blocks | None = None) -> None:
    """`unit` = (name, tensors, metadata) or None; `hidden` = the next layer's input (this rank's blocks
    of it, `blocks`), None when no later layer runs. Under torchrun every rank writes its own activations
    file and rank 0 commits them all with the unit."""
    here = world()
    written = {}
    if hidden is not None:
        key, suffix = ("activations", "") if here.leader else (f"activations.rank-{here.rank:03d}", f".rank-{here.rank:03d}")
        tensors = {"hidden": hidden}
        if blocks is not None:
            tensors["blocks"] = torch.tensor(blocks.mine(), dtype=torch.int64)
        written[key] = stage_dir.write_aux(f"activations_{index + 1:03d}{suffix}", tensors).to_json()
    records = all_gather_object(written)
    if not here.leader:
        return
    old = {key: stage_dir.manifest["aux"].pop(key) for key in list(stage_dir.manifest["aux"]) if _is_activations(key)}
    aux = {key: FileRecord(**record) for found in records for key, record in found.items()}
    state = {"next_layer": index + 1, **state}
    if unit is not None:
        name, tensors, metadata = unit
        stage_dir.write_unit(name, tensors, metadata, aux=aux, state=state)
    else:
        stage_dir.commit_aux(aux, state=state)
    kept = {record.file for record in aux.values()}
    for record in old.values():
        if record["file"] not in kept:
            (stage_dir.path / record["file"]).unlink(missing_ok=True)


def _is_activations(key: str) -> bool:
    return key == "activations" or key.startswith("activations.")


@dataclass(frozen=True)
class LayerPlan:
    """The layers to run on this invocation: `range(start, stop)`, of which those in `todo` make their
    unit and the others only carry the activations forward; `hidden` is the input of layer `start`."""

    start: int
    stop: int
    todo: frozenset[int]
    hidden: Any

    def is_last(self, index: int) -> bool:
        """No layer after `index` runs, so its output is not needed."""
        return index + 1 == self.stop


def plan_layers(stage_dir: StageDir, todo: list[int], first_input: Callable[[], Any],
                blocks: Blocks | None = None) -> LayerPlan | None:
    """Where to start so that every layer in `todo` (those whose unit is missing) is made. None if none is.

    From the committed activations checkpoint when it is the input of a layer at or before the first
    missing one (this rank's `blocks` of it, from the files of whatever world size wrote it); otherwise
    from `first_input()` (the embeddings of the stored tokens), with a warning. Every rank decides alike.
    """
    if not todo:
        return None
    first, stop = min(todo), max(todo) + 1
    checkpoint = int(stage_dir.manifest["state"].get("next_layer", 0))
    hidden = None
    if "activations" in stage_dir.manifest["aux"] and 0 < checkpoint <= first:
        files = [stage_dir.read_aux(key) for key in sorted(stage_dir.manifest["aux"]) if _is_activations(key)]
        hidden = files[0]["hidden"] if blocks is None else read_blocks(files, blocks)
    if all(all_gather_object(hidden is not None)):
        info(f"{stage_dir.stage}: resuming at layer {checkpoint}")
        return LayerPlan(checkpoint, stop, frozenset(todo), hidden)
    if first > 0:
        warn(f"{stage_dir.stage}: layer {first} needs its input and no activations checkpoint at or before it "
             f"survives (only the latest is kept); recomputing it from the stored tokens: layers 0-{first - 1} "
             f"({first} layer(s)) run again, forward only")
    return LayerPlan(0, stop, frozenset(todo), first_input())
