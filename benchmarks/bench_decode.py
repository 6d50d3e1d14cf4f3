"""Decode and prefill speed and resident memory of packed models against their originals, on the CPU.

Two models, each built and quantized once and cached under `--work` (default `.cache/bench-decode/`):
  mini     the mini test-bed (`testbed-mini/`, `make testbed-mini`), quantized by `kbvq run` with its
           recipe recipes/testbed-mini/kbvq-w2.yaml;
  qwen15   a random-weight Qwen2-MoE with Qwen1.5-MoE-A2.7B's expert shapes (hidden 2048, 60 experts of
           1408, top-4, shared expert 5632, 16 heads), 2 layers, vocab 4096, saved in bf16, quantized by
           the CLI at 2 bits with few samples and Lloyd iterations (`--samples 4 --seqlen 128`,
           `vq --iters 2`, klt-svd's default rank). Speed does not depend on the codebooks' quality.

Per model, the variants original bf16, original fp32 and packed (fp32 and bf16 compute) are timed in one
process, in shuffled interleaved rounds (best of `--repeats` per workload), so a load spike on a shared
machine hits them alike: decode tokens/s at batch 1 and 8 (greedy, KV cache, the prompt's prefill
subtracted), prefill tokens/s on 512 tokens (the mini's 128 positions cap it there). Each variant's memory
is then measured in a fresh process of its own: tensor bytes resident (distinct storages), RSS before
loading and after running the same workloads. Ratios packed/original are printed side by side, and the
resident against stored bytes of the mini test-bed's 2-bit, 3-bit, GPTQ and RTN packs.
(benchmarks/decode_measure.py holds the measurements.)

    python benchmarks/bench_decode.py [--models mini,qwen15] [--new-tokens 32] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QWEN15_SHAPES = dict(hidden_size=2048, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                     intermediate_size=5632, num_experts=60, num_experts_per_tok=4, num_hidden_layers=2,
                     num_attention_heads=16, num_key_value_heads=16, vocab_size=4096, max_position_embeddings=4096)
MEMORY_RECIPES = ("kbvq-w2", "kbvq-w3", "gptq-w2", "rtn-w3")  # the mini test-bed's packs, resident against stored


# ------------------------------------------------------------------ preparing the models (cached)
def kbvq(*args) -> None:
    """One kbvq command, quiet unless it fails."""
    print(f"  (cached for later runs) kbvq {' '.join(map(str, args))}", flush=True)
    done = subprocess.run([sys.executable, "-m", "kbvq_cli.app", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True)
    if done.returncode != 0:
        sys.exit(f"kbvq {' '.join(map(str, args))} failed:\n{(done.stdout + done.stderr)[-3000:]}")


def prepare_mini(work: Path, recipe: str = "kbvq-w2") -> tuple[Path, Path]:
    model, run = ROOT / "testbed-mini", work / f"mini-{recipe}"
    if not (model / "config.json").exists():
        sys.exit("testbed-mini/ is missing: run `make testbed-mini` (or `kbvq testbed --out testbed-mini --variant mini`)")
    if not (run / "pack" / "manifest.json").exists():
        kbvq("run", "--recipe", ROOT / "recipes" / "testbed-mini" / f"{recipe}.yaml", "--run", run)
    return model, run / "pack"


def prepare_qwen15(work: Path) -> tuple[Path, Path]:
    model, run = work / "qwen15-shape", work / "qwen15-shape-kbvq-w2"
    if not (model / "config.json").exists():
        import torch

        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import build_tiny_model

        build_tiny_model("qwen2_moe", model, dtype=torch.bfloat16, **QWEN15_SHAPES)
    if not (run / "pack" / "manifest.json").exists():
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import write_text

        text = write_text(work / "calib.txt", n_sentences=2000, seed=5)
        kbvq("calibrate", "--model", model, "--data", text, "--samples", 4, "--seqlen", 128, "--device", "cpu",
             "--run", run)
        kbvq("klt-svd", "--run", run)
        kbvq("vq", "--run", run, "--bits", 2, "--iters", 2)
        kbvq("bcos", "--run", run)
        kbvq("pack", "--run", run)
    return model, run / "pack"


PREPARE = {"mini": prepare_mini, "qwen15": prepare_qwen15}


# ------------------------------------------------------------------ measuring (fresh processes)
def measure_in_subprocess(*arguments, args) -> dict | list:
    command = [sys.executable, str(ROOT / "benchmarks" / "decode_measure.py"), *map(str, arguments),
               "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--prefill", str(args.prefill)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_model(original: Path, pack: Path, args) -> list[dict]:
    """Speed of all variants in one process (interleaved), memory of each in its own."""
    rows = measure_in_subprocess("speed", original, pack, args=args)
    for row in rows:
        path = original if row["kind"] == "original" else pack
        row.update(measure_in_subprocess("memory", row["kind"], path, row["dtype"], args=args))
    return rows


# ------------------------------------------------------------------ the report
def mib(count: float) -> str:
    return f"{count / 2**20:,.1f}"


def print_model(name: str, original: Path, pack: Path, rows: list[dict]) -> None:
    from kbvq_cli.packed.resident import pack_bytes, pack_quantized_bytes

    storage = json.loads((pack / "manifest.json").read_text())["summary"]["storage"]
    stored, stored_quantized = pack_bytes(pack), pack_quantized_bytes(storage)
    print(f"\n== {name}: {original} -> {pack}")
    print(f"pack: {stored:,} tensor bytes ({mib(stored)} MiB; quantized parts {mib(stored_quantized)} MiB), "
          f"{storage['bytes_on_disk']:,} bytes of shards; original {storage['original_bytes']:,} bytes; "
          f"{storage['bits_per_expert_weight']:.4f} bits per expert weight "
          f"(formula {storage['formula_bits_per_expert_weight']:.4f})")
    print(" | ".join(("model", "dtype", "backend", "decode b1 tok/s", "decode b8 tok/s", "prefill tok/s (tokens)",
                      "tensor MiB", "RSS before load MiB", "RSS after decoding MiB (anon + file)", "load s")))
    for row in rows:
        before, after = row["rss_before"], row["rss_after"]
        print(" | ".join([row["kind"], row["dtype"], row["backend"], f"{row['decode_b1_tok_s']:.2f}",
                          f"{row['decode_b8_tok_s']:.2f}", f"{row['prefill_tok_s']:.1f} ({row['prefill_tokens']})",
                          mib(row["tensor_bytes"]), mib(before["rss"]),
                          f"{mib(after['rss'])} ({mib(after['anon'])} + {mib(after['file'])})", f"{row['load_s']:.1f}"]))
    originals = [row for row in rows if row["kind"] == "original"]
    best = {key: max(row[key] for row in originals) for key in ("decode_b1_tok_s", "decode_b8_tok_s", "prefill_tok_s")}
    packed = [row for row in rows if row["kind"] == "packed"]
    print("each at its faster dtype, packed / original: " + ", ".join(
        f"{label} {max(row[key] for row in packed) / best[key]:.2f}x" for label, key in (
            ("decode b1", "decode_b1_tok_s"), ("decode b8", "decode_b8_tok_s"), ("prefill", "prefill_tok_s"))))
    for row in packed:
        growth = row["rss_after"]["rss"] - row["rss_before"]["rss"]
        print(f"packed {row['dtype']}, against the faster original (bf16 or fp32) and the pack:")
        print(f"  decode b1 {row['decode_b1_tok_s'] / best['decode_b1_tok_s']:.2f}x (target >= 1.2)   "
              f"decode b8 {row['decode_b8_tok_s'] / best['decode_b8_tok_s']:.2f}x   "
              f"prefill {row['prefill_tok_s'] / best['prefill_tok_s']:.2f}x (target >= 0.67: at most 1.5x slower)")
        print(f"  resident tensor bytes / pack tensor bytes {row['tensor_bytes'] / stored:.3f} (target <= 1.05; the "
              f"unquantized tensors take the compute dtype), quantized parts resident / stored "
              f"{row['quantized_bytes'] / stored_quantized:.3f}")
        print(f"  RSS growth (after decoding - before loading) / pack tensor bytes {growth / stored:.3f}, / resident "
              f"tensor bytes {growth / row['tensor_bytes']:.3f} (target <= 1.3); RSS after decoding / original's: "
              + ", ".join(f"{o['dtype']} {row['rss_after']['rss'] / o['rss_after']['rss']:.2f}x" for o in originals))


def print_memory(work: Path) -> None:
    """Resident against stored bytes of the mini test-bed's packs at 2 and 3 bits and RTN/GPTQ, each loaded
    in its own dtype (in this process: tensor bytes only, no RSS)."""
    import kbvq_cli  # noqa: F401
    from kbvq_cli import load_quantized
    from kbvq_cli.packed.resident import pack_bytes, pack_quantized_bytes, quantized_resident_bytes, resident_bytes

    print("\n== resident / stored bytes, packs loaded in their own dtype (mini test-bed; 12-bit codes are held as "
          "int16, RTN/GPTQ codes stay bit-packed)")
    print("pack | bits per expert weight | pack tensor bytes | resident | ratio | quantized parts stored | "
          "resident | ratio")
    for recipe in MEMORY_RECIPES:
        _, pack = prepare_mini(work, recipe)
        storage = json.loads((pack / "manifest.json").read_text())["summary"]["storage"]
        model = load_quantized(pack)
        stored, resident = pack_bytes(pack), resident_bytes(model)
        stored_q, resident_q = pack_quantized_bytes(storage), quantized_resident_bytes(model)
        print(f"{recipe} | {storage['bits_per_expert_weight']:.4f} | {stored:,} | {resident:,} | {resident / stored:.3f} | "
              f"{stored_q:,} | {resident_q:,} | {resident_q / stored_q:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mini,qwen15", help="comma-separated: mini, qwen15")
    parser.add_argument("--work", default=str(ROOT / ".cache" / "bench-decode"))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    import torch

    print(f"bench-decode: CPU, {args.threads or torch.get_num_threads()} threads; speed of all variants interleaved in "
          "one process, memory of each in a fresh one; the qwen15-shape model has random weights and codebooks made with 2 Lloyd iterations: its "
          "speed and memory are real, its outputs meaningless (speed does not depend on the codebooks' quality)")
    for name in args.models.split(","):
        original, pack = PREPARE[name](work)
        print_model(name, original, pack, measure_model(original, pack, args))
    print_memory(work)


if __name__ == "__main__":
    main()
