"""The files of a pack beside its shards, each recorded in the manifest with its sha256:

- `config.json`: the original config plus the `quantization_config` (`quant_method: kbvq`) that makes
  transformers build `kbvq_cli.packed.quantizer.KbvqHfQuantizer`;
- the tokenizer, generation config and chat template, copied from the original;
- `model.safetensors.index.json`: every tensor name -> its shard, which is how `from_pretrained` finds
  the shards (they keep kbvq's own names and per-unit metadata);
- `README.md`: the model card (`kbvq_cli.packed.model_card`).
"""

from __future__ import annotations

import json
from pathlib import Path

from kbvq_cli.atomic import atomic_write_bytes, atomic_write_json
from kbvq_cli.model_files import safetensors_header
from kbvq_cli.packed.model_card import CARD, write_model_card
from kbvq_cli.stage_dir import StageDir

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                "vocab.json", "merges.txt", "vocab.txt", "generation_config.json", "chat_template.jinja")


def weight_index(stage_dir: StageDir) -> dict:
    """`model.safetensors.index.json` of a pack: metadata.total_size (tensor bytes) and weight_map."""
    weight_map, total = {}, 0
    for unit in stage_dir.unit_names():
        file = stage_dir.manifest["units"][unit]["file"]
        for name, entry in safetensors_header(stage_dir.path / file).items():
            weight_map[name] = file
            total += entry["data_offsets"][1] - entry["data_offsets"][0]
    return {"metadata": {"total_size": total, "format": "kbvq"}, "weight_map": dict(sorted(weight_map.items()))}


def write_config_and_tokenizer(stage_dir: StageDir, source_dir: Path, quantization: dict) -> list[str]:
    """config.json with the quantization_config, and the original's tokenizer and generation files; the
    names written. Copies go through a temporary file, so a killed run never leaves half a file, and a file
    that already holds the same bytes is left alone."""
    config = json.loads((source_dir / CONFIG).read_text())
    config["quantization_config"] = quantization
    atomic_write_json(stage_dir.path / CONFIG, config)
    written = [CONFIG]
    for name in COPIED_FILES:
        if (source_dir / name).exists():
            atomic_write_bytes(stage_dir.path / name, (source_dir / name).read_bytes())
            written.append(name)
    return written


def write_index(stage_dir: StageDir) -> str:
    atomic_write_json(stage_dir.path / INDEX, weight_index(stage_dir))
    return INDEX


def write_side_files(stage_dir: StageDir, source_dir: Path, quantization: dict, eval_rows=()) -> None:
    """Write every side file of a finished pack and record them in its manifest (the commit point).

    Rewriting them all is cheap and is also how `kbvq pack` restores an edited or missing one.
    """
    names = [*write_config_and_tokenizer(stage_dir, source_dir, quantization), write_index(stage_dir)]
    stale = set(stage_dir.manifest.get("files", {})) - set(names) - {CARD}
    for name in stale:  # a file the original no longer has
        (stage_dir.path / name).unlink(missing_ok=True)
        del stage_dir.manifest["files"][name]
    stage_dir.record_files(names)
    write_model_card(stage_dir, eval_rows)
