"""calibrate and vq under torchrun at world sizes 1 and N, side by side: seconds and the speed-up.

The model is bench_stages' random-weight Qwen1.5-MoE-architecture one (4 layers, hidden 128, 16 experts
of 64, a shared expert of 128) on 16 x 256 calibration tokens. Every measurement is a real `kbvq`
command: world size 1 as one process with all `--threads`, world size N under torchrun with
`--threads / N` threads per rank, so both use the same cores. The sizes alternate round after round
and each keeps its best round. Two figures per stage: the stage's own seconds (from its manifest,
rank 0's clock from open to finish, so it includes waiting at the sync points) and the command's wall
time (with the start of N Python processes and torch.distributed's rendezvous).

    python benchmarks/bench_distributed.py [--ranks 2] [--threads 2] [--rounds 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))


def kbvq(ranks: int, threads: int, *args: str) -> float:
    """Run `kbvq ARGS` on `ranks` processes of `threads` threads each; its wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if ranks == 1:
        command = [sys.executable, "-m", "kbvq_cli", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--standalone",
                   "-m", "kbvq_cli", "--", *args]
    began = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - began


def stage_seconds(run: Path, stage: str) -> float:
    return json.loads((run / stage / "manifest.json").read_text())["summary"]["seconds"]


def measure(args, model: Path, text: Path, work: Path) -> dict:
    """(stage, ranks) -> (best stage seconds, best wall seconds)."""
    sizes = (1, args.ranks)
    calibrate = ["calibrate", "--model", str(model), "--data", str(text), "--samples", "16", "--seqlen", "256",
                 "--device", args.device, "--restart"]
    best: dict = {}
    for _ in range(args.rounds):
        for ranks in sizes:
            threads = max(args.threads // ranks, 1)
            run = work / f"run-{ranks}"
            # vq reads klt-svd; klt-svd is made once per run directory, outside the timing
            wall = kbvq(ranks, threads, *calibrate, "--run", str(run))
            found = [("calibrate", stage_seconds(run, "calibrate"), wall)]
            if not (run / "klt-svd" / "manifest.json").exists():
                kbvq(1, args.threads, "klt-svd", "--run", str(run))
            wall = kbvq(ranks, threads, "vq", "--run", str(run), "--iters", str(args.iters), "--device", args.device,
                        "--restart")
            found.append(("vq", stage_seconds(run, "vq"), wall))
            for stage, seconds, wall in found:
                old = best.get((stage, ranks), (float("inf"), float("inf")))
                best[(stage, ranks)] = (min(old[0], seconds), min(old[1], wall))
    return best


def main() -> None:
    from bench_calibrate import build_model
    from tiny_models import write_text

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="threads in all (split over the ranks)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model-cache", default=str(ROOT / ".cache" / "bench-stages-model"))
    args = parser.parse_args()
    model = build_model(Path(args.model_cache) / "L4-H128", 4, 128)
    work = Path(tempfile.mkdtemp(prefix="kbvq-bench-distributed-"))
    try:
        text = write_text(work / "calib.txt", n_sentences=4000, seed=3)
        best = measure(args, model, text, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = args.ranks
    print(f"model: qwen2_moe, 4 layers, hidden 128, 16 experts of 64, shared expert 128; 16 x 256 tokens; "
          f"{args.device}; {args.threads} thread(s) in all; best of {args.rounds} alternating rounds")
    print(f"{'stage':<10} {'stage s @1':>10} {f'stage s @{n}':>10} {'speed-up':>9} "
          f"{'wall s @1':>10} {f'wall s @{n}':>10} {'speed-up':>9}")
    for stage in ("calibrate", "vq"):
        (s1, w1), (sn, wn) = best[(stage, 1)], best[(stage, n)]
        print(f"{stage:<10} {s1:>10.2f} {sn:>10.2f} {s1 / sn:>8.2f}x {w1:>10.2f} {wn:>10.2f} {w1 / wn:>8.2f}x")


if __name__ == "__main__":
    main()
