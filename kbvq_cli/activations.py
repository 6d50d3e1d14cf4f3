"""Committing a layer together with the activations that feed the next one (for layer-streamed stages).

Order: the layer's shard and the next activations are written first, then one manifest commit names
both, then the previous activations file is deleted. A kill at any point leaves a manifest that names
a consistent (layer done, activations for the next layer) pair, so the run resumes bit-identically.
"""

from __future__ import annotations

from kbvq_cli.stage_dir import StageDir


def commit_layer(stage_dir: StageDir, index: int, unit: tuple[str, dict, dict] | None, hidden, state: dict) -> None:
    """`unit` = (name, tensors, metadata) or None; `hidden` = the next layer's input, None after the last."""
    old = stage_dir.manifest["aux"].get("activations")
    aux = {}
    if hidden is not None:
        aux["activations"] = stage_dir.write_aux(f"activations_{index + 1:03d}", {"hidden": hidden})
    else:
        stage_dir.manifest["aux"].pop("activations", None)
    state = {"next_layer": index + 1, **state}
    if unit is not None:
        name, tensors, metadata = unit
        stage_dir.write_unit(name, tensors, metadata, aux=aux, state=state)
    else:
        stage_dir.commit_aux(aux, state=state)
    if old is not None and (not aux or old["file"] != aux["activations"].file):
        (stage_dir.path / old["file"]).unlink(missing_ok=True)


def resume_activations(stage_dir: StageDir, first_input):
    """(next layer, its input): from the committed checkpoint, or (0, first_input()) on a fresh run."""
    start = int(stage_dir.manifest["state"].get("next_layer", 0))
    return (start, stage_dir.read_aux("activations")["hidden"]) if start else (0, first_input())
