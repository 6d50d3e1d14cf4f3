"""A pack's model card, `README.md`: what model, which method and settings, the measured bits, the eval
results recorded so far, and the two lines that load it. Written by `kbvq pack` and refreshed by
`kbvq eval` (with its results); like every file of the pack it is recorded in the manifest.
"""

from __future__ import annotations

import json

from kbvq_cli.atomic import atomic_write_bytes
from kbvq_cli.stage_dir import StageDir

CARD = "README.md"
SOURCE_KEY = "source_model"  # in the pack manifest's `state`: the model the run quantized, as the recipe named it


def _method(quantization: dict) -> str:
    if quantization.get("format") == "scalar":
        return (f"{str(quantization.get('method', 'gptq')).upper()} {quantization['bits']}-bit scalar codes, "
                f"groups of {quantization.get('group_size')}")
    return (f"KBVQ-MoE vector quantization: {quantization['bits']} bits per weight, vectors of "
            f"{quantization['vector_length']} ({quantization['codebook_size']}-entry codebooks, "
            f"{quantization['index_bits']}-bit indices), shared basis {quantization.get('rank')}, "
            f"KLT {quantization.get('klt')}, BCOS {quantization.get('bcos')}"
            + ("; a bit budget chose other code sizes for some layers' projections (`code_sizes`)"
               if quantization.get("code_sizes") else ""))


def _size_lines(storage: dict) -> list[str]:
    if not storage:
        return ["not recorded"]
    ratio = storage["bytes_on_disk"] / max(storage["original_bytes"], 1)
    return [f"- bits per expert weight: {storage['bits_per_expert_weight']:.4f} measured from the stored tensors "
            f"({storage['formula_bits_per_expert_weight']:.4f} by the storage formula)",
            f"- bits per weight, whole model: {storage['bits_per_weight']:.4f}",
            f"- shards: {storage['bytes_on_disk']:,} bytes, {ratio:.1%} of the original's "
            f"{storage['original_bytes']:,}"]


def card_text(name: str, config: dict, storage: dict, eval_rows, source: str | None) -> str:
    """The card of the pack in directory `name`. eval_rows: (what was measured, value) pairs."""
    quantization = config.get("quantization_config", {})
    architecture = (config.get("architectures") or [config.get("model_type")])[0]
    rows = [f"| {label} | {value} |" for label, value in eval_rows]
    evaluation = (["| measure | value |", "|---|---|", *rows] if rows else
                  ["Not evaluated yet: `kbvq eval --run RUN` measures it and updates this card."])
    settings = json.dumps(quantization, indent=2, sort_keys=True)
    lines = [
        f"# {source or architecture} (kbvq, {quantization.get('bits')}-bit experts)",
        "",
        f"{architecture} ({config.get('model_type')}, {config.get('num_hidden_layers')} layers) with its experts "
        f"quantized by kbvq: {_method(quantization)}. Everything outside the experts is as in the original "
        f"unless `kbvq nonexpert` quantized it.",
        "",
        "## Load it",
        "",
        "```python",
        "import kbvq_cli, transformers  # kbvq_cli registers the kbvq quantization method with transformers",
        f'model = transformers.AutoModelForCausalLM.from_pretrained("{name}", dtype="auto")',
        "```",
        "",
        "`kbvq_cli.load_quantized(path, device=..., dtype=...)` does the same. `KBVQ_KERNELS` chooses the kernels "
        "(auto, cpu, torch, triton, reference). Loading checks every file against `manifest.json`.",
        "",
        "## Size",
        "",
        *_size_lines(storage),
        "",
        "## Evaluation",
        "",
        *evaluation,
        "",
        "## Settings (`quantization_config`)",
        "",
        "```json",
        settings,
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(stage_dir: StageDir, eval_rows=(), name: str | None = None) -> None:
    """Write `README.md` into a finished pack and record it in the manifest. `name`: the directory the card
    tells users to load (default the pack's own; a copy being staged passes where it will end up)."""
    config = json.loads((stage_dir.path / "config.json").read_text())
    storage = stage_dir.manifest.get("summary", {}).get("storage", {})
    source = stage_dir.manifest.get("state", {}).get(SOURCE_KEY)
    text = card_text(name or str(stage_dir.path), config, storage, list(eval_rows), source)
    atomic_write_bytes(stage_dir.path / CARD, text.encode("utf-8"))
    stage_dir.record_files([CARD])
