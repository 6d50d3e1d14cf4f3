"""Seconds per layer of every method stage (calibrate, klt-svd, vq at 2 and 3 bits, bcos) on one model.

Default: a random-weight Qwen1.5-MoE-architecture model, 4 layers, hidden 128, 16 experts of 64,
a shared expert of 128 (the size of the largest test model), on 16 x 256 calibration tokens, on the CPU. Each stage runs as a real
`kbvq` subprocess; the figures are the stages' own timings from their manifests.

    python benchmarks/bench_stages.py [--layers 4] [--hidden 128] [--iters 100]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def kbvq(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "kbvq_cli.app", *args], check=True, stderr=subprocess.DEVNULL)


def main() -> None:
    from bench_calibrate import build_model
    from tiny_models import write_text

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--model-cache", default=str(ROOT / ".cache" / "bench-stages-model"))
    args = parser.parse_args()
    model = build_model(Path(args.model_cache) / f"L{args.layers}-H{args.hidden}", args.layers, args.hidden)
    work = Path(tempfile.mkdtemp(prefix="kbvq-bench-stages-"))
    rows = []
    try:
        text = write_text(work / "calib.txt", n_sentences=4000, seed=3)
        run = str(work / "run")
        kbvq("calibrate", "--model", str(model), "--data", str(text), "--samples", "16", "--seqlen", "256",
             "--device", "cpu", "--run", run)
        kbvq("klt-svd", "--run", run)
        for bits in ("2", "3"):
            shutil.rmtree(work / "run" / "vq", ignore_errors=True)
            shutil.rmtree(work / "run" / "bcos", ignore_errors=True)
            kbvq("vq", "--run", run, "--bits", bits, "--iters", str(args.iters), "--restart")
            kbvq("bcos", "--run", run)
            for stage in ("calibrate", "klt-svd", "vq", "bcos"):
                summary = json.loads((work / "run" / stage / "manifest.json").read_text())["summary"]
                rows.append((bits, stage, summary["seconds"] / args.layers, summary))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"model: qwen2_moe, {args.layers} layers, hidden {args.hidden}, 16 experts of {args.hidden // 2}, "
          f"shared expert {args.hidden}; 16 x 256 tokens; cpu; vq {args.iters} iterations")
    print(f"{'bits':>4} {'stage':<10} {'s/layer':>8}")
    for bits, stage, per_layer, _ in rows:
        print(f"{bits:>4} {stage:<10} {per_layer:>8.2f}")


if __name__ == "__main__":
    main()
