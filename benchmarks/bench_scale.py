"""Every stage at the paper models' real dimensions: seconds per layer, peak RSS, directory bytes, bits.

For each of Qwen1.5-MoE-A2.7B, Qwen3-30B-A3B, Mixtral-8x7B and DeepSeek-V2-Lite, a random-weight bf16
checkpoint with the model's real shapes (tests/paper_models.py: one MoE layer; DeepSeek-V2-Lite also its
dense first layer; vocab cut to 4096) is built once and cached under `--work` (default
`.cache/bench-scale/`). Then `kbvq calibrate, klt-svd, vq, bcos, pack` run on it through the CLI, each
stage in a subprocess of its own (8 x 256 tokens, 2 bits, `--iters 2`: minutes, not hours; speed and
memory do not depend on the codebooks' quality), and the bench prints per stage: wall seconds, seconds
per layer, the child's peak RSS (`os.wait4`), the stage directory's bytes; then pack's measured bits per
expert weight beside the docs/method.md §5 formula, and a projection of a whole paper-settings run on
one A6000 (benchmarks/scale_projection.py states its assumptions).

    python benchmarks/bench_scale.py [--models qwen15-moe,mixtral-8x7b] [--stages calibrate] [--work DIR] [--fresh]
    python benchmarks/bench_scale.py --models mixtral-8x7b --stages bcos --reuse

Runs are redone each time (`--fresh` also rebuilds the checkpoints), unless `--reuse` keeps the cached
run's stages before the first of `--stages`. Not part of CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from paper_models import PAPER_MODELS  # noqa: E402
from scale_projection import print_projection  # noqa: E402

BENCH_VOCAB = 4096
SAMPLES, SEQLEN, BITS, ITERS = 8, 256, 2, 2
STAGES = ("calibrate", "klt-svd", "vq", "bcos", "pack")


def bench_layers(name: str) -> int:
    """Decoder layers of the bench checkpoint: one MoE layer, after the dense ones the model starts with."""
    return 1 + (PAPER_MODELS[name][1].get("first_k_dense_replace") or 0)


def build_checkpoint(name: str, directory: Path) -> Path:
    """The random bf16 checkpoint of `name`'s real shapes, built once (tests/tiny_models.py's builder)."""
    if (directory / "config.json").exists():
        return directory
    import torch
    from tiny_models import build_tiny_model

    model_type, shapes = PAPER_MODELS[name]
    staging = directory.with_name(directory.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    print(f"  building {name} ({bench_layers(name)} layer(s), real shapes, bf16) in {directory}", flush=True)
    build_tiny_model(model_type, staging, dtype=torch.bfloat16,
                     **{**shapes, "num_hidden_layers": bench_layers(name), "vocab_size": BENCH_VOCAB})
    staging.rename(directory)
    return directory


def stage_command(stage: str, model: Path, run: Path, text: Path) -> list[str]:
    common = ["--run", str(run)]
    if stage == "calibrate":
        return ["calibrate", "--model", str(model), "--data", str(text), "--samples", str(SAMPLES),
                "--seqlen", str(SEQLEN), "--device", "cpu", *common]
    if stage == "vq":
        return ["vq", "--bits", str(BITS), "--iters", str(ITERS), "--device", "cpu", *common]
    if stage in ("klt-svd", "bcos"):
        return [stage, "--device", "cpu", *common]
    return [stage, *common]


def run_measured(args: list[str], log: Path) -> dict:
    """One kbvq command in a child process: its wall seconds and peak RSS (the child's own, from wait4)."""
    started = time.perf_counter()
    with log.open("w") as out:
        child = subprocess.Popen([sys.executable, "-m", "kbvq_cli.app", *args], cwd=ROOT, stdout=out,
                                 stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"kbvq {' '.join(args)} failed (log {log}):\n{log.read_text()[-3000:]}")
    return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss": usage.ru_maxrss * 1024}


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_model(name: str, work: Path, stages=STAGES, reuse: bool = False) -> dict:
    """`stages` of one model, on a fresh run, or (`reuse`) on the cached run's finished earlier stages:
    then only `stages` and the ones after them are removed and redone (e.g. bcos alone, not Mixtral's
    25 minutes of calibrate, klt-svd and vq)."""
    from tiny_models import write_text

    model = build_checkpoint(name, work / name / "model")
    text = work / "calib.txt"
    if not text.exists():
        write_text(text, n_sentences=4000, seed=5)
    run = work / name / "run"
    if reuse:
        for stage in STAGES[min(STAGES.index(s) for s in stages):]:
            shutil.rmtree(run / stage, ignore_errors=True)
    else:
        shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True, exist_ok=True)
    rows = {}
    for stage in stages:
        print(f"  {name}: kbvq {stage}", flush=True)
        row = run_measured(stage_command(stage, model, run, text), run / f"{stage}.log")
        row["bytes"] = directory_bytes(run / stage)
        rows[stage] = row
    pack = run / "pack" / "manifest.json"
    storage = json.loads(pack.read_text())["summary"]["storage"] if pack.exists() else None
    return {"name": name, "model_bytes": directory_bytes(model), "layers": bench_layers(name), "stages": rows,
            "storage": storage}


def gb(count: float) -> str:
    return f"{count / 1e9:.2f}"


def print_result(result: dict) -> None:
    layers = result["layers"]
    print(f"\n{result['name']}: {layers} layer(s), checkpoint {gb(result['model_bytes'])} GB (bf16, vocab {BENCH_VOCAB})")
    print(f"{'stage':<10} {'wall s':>8} {'s/layer':>8} {'CPU s':>8} {'peak RSS GB':>12} {'dir GB':>8} {'dir/model':>9}")
    for stage, row in result["stages"].items():
        per_layer = row["seconds"] / (layers if stage in ("calibrate", "pack") else 1)  # the others: MoE layers only
        print(f"{stage:<10} {row['seconds']:>8.1f} {per_layer:>8.1f} {row['cpu_seconds']:>8.1f} "
              f"{gb(row['peak_rss']):>12} {gb(row['bytes']):>8} {row['bytes'] / result['model_bytes']:>9.2f}")
    storage = result["storage"]
    if storage is None:
        return
    print(f"bits per expert weight: measured {storage['bits_per_expert_weight']:.4f}, formula "
          f"{storage['formula_bits_per_expert_weight']:.4f} (docs/method.md §5)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(PAPER_MODELS))
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-scale")
    parser.add_argument("--fresh", action="store_true", help="rebuild the cached checkpoints too")
    parser.add_argument("--stages", default=",".join(STAGES), help="the first stages only, e.g. calibrate")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the cached run's stages before --stages (e.g. --stages bcos --reuse)")
    args = parser.parse_args()
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in PAPER_MODELS]
    if unknown:
        sys.exit(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(PAPER_MODELS)}")
    if args.fresh:
        for name in names:
            shutil.rmtree(args.work / name, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    import torch

    print(f"bench-scale: {SAMPLES} x {SEQLEN} tokens, {BITS} bits, vq --iters {ITERS}, CPU, "
          f"{torch.get_num_threads()} torch threads", flush=True)
    started = time.perf_counter()
    results = []
    for name in names:
        results.append(bench_model(name, args.work, [s for s in STAGES if s in args.stages.split(",")], args.reuse))
        print_result(results[-1])
        (args.work / "results.json").write_text(json.dumps(results, indent=1))  # what is done so far
    print(f"\nbench-scale: {len(names)} model(s) in {time.perf_counter() - started:.0f} s")
    if args.stages == ",".join(STAGES):
        print_projection(names)


if __name__ == "__main__":
    main()
