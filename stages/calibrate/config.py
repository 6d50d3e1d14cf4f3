"""Settings of `kbvq calibrate`; defaults are the paper's (RedPajama sample, 256 x 4096 tokens, seed 42)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kbvq_cli.data import PAPER_CALIBRATION_DATA
from kbvq_cli.settings import require


@dataclass(frozen=True)
class CalibrateSettings:
    data: str = PAPER_CALIBRATION_DATA  # hub id [:config][@split], or a local .txt/.jsonl/.parquet file or dir
    text_field: str = "text"
    samples: int = 256
    seqlen: int = 4096
    seed: int = 42
    batch_size: int = 1  # sequences per forward pass
    device: str = "auto"  # auto | cpu | cuda | cuda:N  (not hashed: where it runs, not what it computes)
    # Per-expert second moments are what BCOS's closed form and GPTQ on experts need; they dominate
    # the stage's disk use (Qwen3-30B-A3B: ~100 GB in float32). Turn off when neither is used.
    expert_second_moments: bool = True
    moments_dtype: Literal["float32", "float64"] = "float32"
    # How second moments are stored (stages/calibrate/reader.py): `compact` packs the symmetric upper
    # triangles and stores the per-expert ones as 16-bit correlations (about a quarter of the bytes,
    # BCOS and GPTQ within ~1e-4 of `exact`, the dense layout of earlier versions).
    moments: Literal["exact", "compact"] = "compact"
    min_expert_tokens: int = 16  # an expert routed fewer tokens than this is reported as starved
    # model: each expert's statistics over the tokens the model's own top-k routes to it (the paper).
    # all: every expert's over every token (no expert starves); the layer still computes its routed
    # output, so later layers see the real distribution, and router.load stays the routed counts.
    routing: Literal["model", "all"] = "model"
    # An expert the model's routing starves (fewer than min_expert_tokens tokens) gets, under `all-tokens`,
    # the statistics `routing: all` would give it, over every token of its layer, for that expert alone;
    # `none` leaves its few tokens' statistics, which later stages then leave uncorrected. On by default:
    # a quantizer that silently skips the experts a calibration set misses is the field's most common
    # complaint, and on a model where none starves (the test-beds) it changes nothing.
    starved_fallback: Literal["all-tokens", "none"] = "all-tokens"

    RUNTIME_KEYS = ("device",)

    def check(self, where: str) -> None:
        require(self.samples >= 1, f"{where}.samples must be at least 1 (got {self.samples})")
        require(self.seqlen >= 2, f"{where}.seqlen must be at least 2 (got {self.seqlen})")
        require(self.batch_size >= 1, f"{where}.batch_size must be at least 1 (got {self.batch_size})")
        require(self.min_expert_tokens >= 0, f"{where}.min_expert_tokens must be >= 0")
        require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
                f"{where}.device must be auto, cpu, cuda or cuda:N (got {self.device!r})")
