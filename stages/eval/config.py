"""Settings of `kbvq eval` (docs/method.md §6); defaults are the paper's protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kbvq_cli.settings import require

PAPER_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "lambada_openai", "lambada_standard", "piqa", "winogrande")
WIKITEXT2_TEST = "wikitext:wikitext-2-raw-v1@test"


@dataclass(frozen=True)
class EvalSettings:
    # What `kbvq eval --run RUN` (and `kbvq run`) evaluates: the run's packed model, or the original
    # checkpoint the run names (the FP16 row). `kbvq eval --model DIR` evaluates DIR either way.
    target: Literal["packed", "original"] = "packed"
    ppl_data: str = WIKITEXT2_TEST  # dataset id[:config][@split], or a local .txt/.jsonl/.parquet; "none" skips
    text_field: str = "text"
    seqlen: int = 4096  # non-overlapping windows of this many tokens
    max_tokens: int | None = None  # score only the first N tokens of the stream (quick checks)
    tasks: tuple[str, ...] = PAPER_TASKS  # lm-evaluation-harness task names; empty = none
    task_dir: str | None = None  # a directory of extra lm-eval task YAMLs (local tasks, offline)
    num_fewshot: int = 0
    limit: int | None = None  # lm-eval: at most this many documents per task (quick checks)
    batch_size: int = 1
    seed: int = 1234  # lm-eval's random, numpy and torch seeds
    device: str = "auto"

    RUNTIME_KEYS = ("device",)

    def check(self, where: str) -> None:
        require(self.seqlen >= 2, f"{where}.seqlen must be at least 2 (got {self.seqlen})")
        require(self.max_tokens is None or self.max_tokens >= 2, f"{where}.max_tokens must be at least 2")
        require(self.num_fewshot >= 0, f"{where}.num_fewshot must be >= 0")
        require(self.limit is None or self.limit >= 1, f"{where}.limit must be >= 1")
        require(self.batch_size >= 1, f"{where}.batch_size must be >= 1")

    @property
    def task_list(self) -> list[str]:
        return [task for task in self.tasks if task and task != "none"]
