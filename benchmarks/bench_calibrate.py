"""Benchmark `kbvq calibrate`: peak RSS against the model's size on disk, and seconds per layer.

Builds (once) a random-weight Qwen1.5-MoE-architecture model of 12 layers saved in bf16, runs a real
`kbvq calibrate` subprocess on it, and prints its peak resident memory from the kernel's accounting.
Streaming should keep the peak near one decoder layer plus activations, well below the model's size.

    python benchmarks/bench_calibrate.py [--layers 12] [--hidden 1536] [--samples 16] [--seqlen 512]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def build_model(directory: Path, layers: int, hidden: int) -> Path:
    import torch
    from tiny_models import build_tiny_model

    if (directory / "config.json").exists():
        return directory
    return build_tiny_model(
        "qwen2_moe", directory, dtype=torch.bfloat16, num_hidden_layers=layers, hidden_size=hidden,
        moe_intermediate_size=hidden // 2, shared_expert_intermediate_size=hidden, intermediate_size=hidden * 2,
        num_experts=16, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128, vocab_size=8192,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--model-cache", default=str(ROOT / ".cache" / "bench-calibrate-model"))
    args = parser.parse_args()

    from tiny_models import write_text

    model = build_model(Path(args.model_cache) / f"L{args.layers}-H{args.hidden}", args.layers, args.hidden)
    model_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    work = Path(tempfile.mkdtemp(prefix="kbvq-bench-"))
    try:
        text = write_text(work / "calib.txt", n_sentences=8000, seed=3)
        command = [sys.executable, "-m", "kbvq_cli.app", "calibrate", "--model", str(model), "--data", str(text),
                   "--samples", str(args.samples), "--seqlen", str(args.seqlen), "--device", "cpu",
                   "--run", str(work / "run")]
        started = time.time()
        subprocess.run(command, check=True, stderr=subprocess.DEVNULL)
        wall = time.time() - started
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        summary = json.loads((work / "run" / "calibrate" / "manifest.json").read_text())["summary"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    activations = args.samples * args.seqlen * args.hidden * 4
    print(f"model: qwen2_moe, {args.layers} layers, hidden {args.hidden}, 16 experts, bf16 on disk")
    print(f"model size on disk        {model_bytes / 2**20:9.1f} MiB")
    print(f"activations (fp32, one copy) {activations / 2**20:6.1f} MiB  ({args.samples} x {args.seqlen} tokens)")
    print(f"peak RSS of kbvq calibrate {peak / 2**20:9.1f} MiB")
    print(f"peak RSS / model size      {peak / model_bytes:9.3f}")
    print(f"seconds per layer          {summary['seconds_per_layer']:9.3f}   (wall {wall:.1f} s incl. start-up)")


if __name__ == "__main__":
    main()
