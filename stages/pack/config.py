"""Settings of `kbvq pack`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class PackSettings:
    # How weights the recipe does not quantize (embeddings, attention, router, norms) are stored:
    # "original" keeps the checkpoint's dtype; float16/bfloat16 convert (the paper counts them at 16 bits).
    unquantized_dtype: Literal["original", "float16", "bfloat16"] = "original"

    def check(self, where: str) -> None:
        pass
