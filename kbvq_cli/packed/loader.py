"""Load a packed kbvq model as a transformers model of its original class, with the standard call:

    import kbvq_cli
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("runs/qwen15-moe-w2/pack", dtype="auto", device_map="cuda")

or `kbvq_cli.load_quantized(path, device=..., dtype=...)`, the same call for a pack or the run holding
it. Either way every file of the pack is verified against its manifest before use, and the experts run
on `kbvq_cli.kernels` (backend from `KBVQ_KERNELS`). See `kbvq_cli.packed.quantizer`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kbvq_cli.packed.integrity import open_pack


def load_quantized(path: str | Path, device: str = "cpu", dtype: torch.dtype | str | None = None):
    """A pack (or `RUN`, meaning `RUN/pack`) as a transformers model in eval mode on `device`.

    `dtype` is the compute dtype of the unquantized weights and activations (default: the original
    checkpoint's); the quantized parts keep their stored 16 bits.
    """
    import kbvq_cli.packed.quantizer  # noqa: F401  registers kbvq with transformers (if the hook has not yet)
    from transformers import AutoModelForCausalLM

    stage_dir = open_pack(path)  # kbvq's own one-line errors for what is not a finished pack
    # device_map (which needs accelerate) only off the CPU, where it saves a copy through host memory.
    placement = {} if str(device) == "cpu" else {"device_map": str(device)}
    model = AutoModelForCausalLM.from_pretrained(str(stage_dir.path), dtype=dtype or "auto", **placement)
    return model.eval()
