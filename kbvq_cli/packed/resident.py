"""What a loaded model holds, against what its pack holds: the accounting behind "resident = pack".

`resident_bytes` counts the storages behind a module's parameters and buffers once each (the 8-bit
codes are a view of the loaded bytes, a stacked shared expert borrows the routed basis); `pack_bytes`
counts the tensors of a pack's shards. The two differ by the codes' widening (12-bit codes held as
int16: 4/3 of their stored bytes) and by nothing else.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kbvq_cli.model_files import safetensors_header


def resident_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind `module`'s parameters and buffers (views counted once)."""
    storages = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor is None or tensor.is_meta:
            continue
        storage = tensor.untyped_storage()
        storages[(tensor.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def pack_bytes(pack_dir: str | Path) -> int:
    """Bytes of the tensors in a pack's shards (their headers' data sizes; the files add a header each)."""
    total = 0
    for shard in sorted(Path(pack_dir).glob("*.safetensors")):
        total += sum(entry["data_offsets"][1] - entry["data_offsets"][0]
                     for entry in safetensors_header(shard).values())
    return total
