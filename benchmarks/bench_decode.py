"""Decode speed and size of a packed model against its original, on the CPU (or --device cuda).

Greedy decoding of `--new-tokens` tokens after a short prompt, batch 1, KV cache on, best of
`--repeats` runs, for the original checkpoint and for the packed model loaded with
`kbvq_cli.load_quantized`; plus bytes on disk and bits per weight from the pack's record.

    python benchmarks/bench_decode.py [--run runs/testbed-mini/kbvq-w2] [--new-tokens 64] [--repeats 3]

The run is made with `kbvq run --recipe recipes/testbed-mini/kbvq-w2.yaml` when it does not exist.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def tokens_per_second(model, prompt: torch.Tensor, new_tokens: int, repeats: int) -> float:
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            started = time.perf_counter()
            out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            best = min(best, time.perf_counter() - started)
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return new_tokens / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(ROOT / "runs" / "testbed-mini" / "kbvq-w2"))
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "testbed-mini" / "kbvq-w2.yaml"))
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.run)
    if not (run / "pack" / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "kbvq_cli.app", "run", "--recipe", args.recipe, "--run", str(run)],
                       check=True, cwd=ROOT)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kbvq_cli import load_quantized
    from kbvq_cli.recipe import load_recipe

    model_dir = load_recipe(run / "recipe.yaml").model
    tokenizer = AutoTokenizer.from_pretrained(str(run / "pack"))
    prompt = tokenizer("The king said that the", return_tensors="pt")["input_ids"].to(args.device)
    original = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").to(args.device).eval()
    packed = load_quantized(run / "pack", device=args.device)
    storage = json.loads((run / "pack" / "manifest.json").read_text())["summary"]["storage"]
    figures = {
        "model": model_dir, "device": args.device, "threads": torch.get_num_threads(),
        "original_tokens_per_s": round(tokens_per_second(original, prompt, args.new_tokens, args.repeats), 1),
        "packed_tokens_per_s": round(tokens_per_second(packed, prompt, args.new_tokens, args.repeats), 1),
        "original_bytes": storage["original_bytes"], "packed_bytes": storage["bytes_on_disk"],
        "bits_per_expert_weight": round(storage["bits_per_expert_weight"], 4),
        "formula_bits_per_expert_weight": round(storage["formula_bits_per_expert_weight"], 4),
        "bits_per_weight_whole_model": round(storage["bits_per_weight"], 4),
    }
    for key, value in figures.items():
        print(f"{key:32s} {value}")


if __name__ == "__main__":
    main()
