"""Logits of packed tiny models of all five architectures, to check that a refactor changes no number.

    python benchmarks/logits_snapshot.py --out BEFORE_DIR      # on the old commit
    python benchmarks/logits_snapshot.py --compare BEFORE_DIR  # on the new one: max relative difference

Each architecture runs the KBVQ pipeline (calibrate, klt-svd, vq, bcos, nonexpert, pack) and the GPTQ
one through the CLI on a tiny random model, then loads the pack and takes logits on a fixed input.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from kbvq_cli import load_quantized  # noqa: E402
from kbvq_cli.app import app  # noqa: E402
from tiny_models import CONFIGS, build_tiny_model, write_text  # noqa: E402


def invoke(*args) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exit_code != 0:
        raise SystemExit(f"kbvq {' '.join(map(str, args))} failed: {result.output}")


def snapshot(arch: str, work: Path) -> dict[str, torch.Tensor]:
    model = build_tiny_model(arch, work / "model")
    text = write_text(work / "calib.txt", n_sentences=800, seed=1)
    ids = torch.arange(3, 43).reshape(2, 20)
    logits = {}
    for method in ("kbvq", "gptq"):
        run = work / method
        recipe = work / f"{method}.yaml"
        recipe.write_text(f"method: {method}\n")
        invoke("calibrate", "--model", model, "--data", text, "--samples", 8, "--seqlen", 64, "--run", run,
               "--recipe", recipe)
        if method == "kbvq":
            invoke("klt-svd", "--run", run, "--rank", 4)
            invoke("vq", "--run", run, "--bits", 2, "--iters", 10)
            invoke("bcos", "--run", run)
        else:
            invoke("gptq", "--run", run, "--bits", 2, "--group-size", 16)
        invoke("pack", "--run", run)
        packed = load_quantized(run / "pack")
        with torch.no_grad():
            logits[method] = packed(ids).logits.float()
    return logits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--compare")
    args = parser.parse_args()
    worst = 0.0
    for arch in CONFIGS:
        with tempfile.TemporaryDirectory() as work:
            logits = snapshot(arch, Path(work))
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            torch.save(logits, Path(args.out) / f"{arch}.pt")
        if args.compare:
            before = torch.load(Path(args.compare) / f"{arch}.pt")
            for method, value in logits.items():
                diff = float((value - before[method]).abs().max() / before[method].abs().max())
                worst = max(worst, diff)
                print(f"{arch:12s} {method:5s} max relative logit difference {diff:.2e}")
    if args.compare:
        print(f"worst {worst:.2e} ({'within' if worst <= 1e-5 else 'OVER'} 1e-5)")


if __name__ == "__main__":
    main()
