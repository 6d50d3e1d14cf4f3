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


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one storage counted once)."""
    storages = {}
    for tensor in tensors:
        if tensor is None or tensor.is_meta:
            continue
        storage = tensor.untyped_storage()
        storages[(tensor.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def resident_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind `module`'s parameters and buffers."""
    return storage_bytes([*module.parameters(), *module.buffers()])


def quantized_resident_bytes(model: torch.nn.Module) -> int:
    """Bytes the runtime modules hold for the quantized parts (codes, codebooks, bases, coefficients,
    scales and shifts, RTN/GPTQ scales and zeros): what `pack_quantized_bytes` counts in the pack."""
    from kbvq_cli.packed.modules import ScalarProjection, VqProjection

    return storage_bytes([buffer for module in model.modules() if isinstance(module, (VqProjection, ScalarProjection))
                          for buffer in module.buffers(recurse=False)])


def pack_quantized_bytes(storage: dict) -> int:
    """The quantized parts' bytes of a pack, from its recorded storage (`summary.storage` of the manifest)."""
    return sum(count for part, count in storage["parts"].items() if part != "unquantized")


def pack_bytes(pack_dir: str | Path) -> int:
    """Bytes of the tensors in a pack's shards (their headers' data sizes; the files add a header each)."""
    total = 0
    for shard in sorted(Path(pack_dir).glob("*.safetensors")):
        total += sum(entry["data_offsets"][1] - entry["data_offsets"][0]
                     for entry in safetensors_header(shard).values())
    return total
