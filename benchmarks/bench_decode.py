"""Decode and prefill speed and resident memory of packed models against their originals, on the CPU.

Two models, each built and quantized once and cached under `--work` (default `.cache/bench-decode/`):
  mini     the mini test-bed (`testbed-mini/`, `make testbed-mini`), quantized by `kbvq run` with its
           recipe recipes/testbed-mini/kbvq-w2.yaml;
  qwen15   a random-weight Qwen2-MoE with Qwen1.5-MoE-A2.7B's expert shapes (hidden 2048, 60 experts of
           1408, top-4, shared expert 5632, 16 heads), 2 layers, vocab 4096, saved in bf16, quantized by
           the CLI at 2 bits with few samples and Lloyd iterations (`--samples 4 --seqlen 128`,
           `vq --iters 2`, klt-svd's default rank). Speed does not depend on the codebooks' quality.

Per model, each of original bf16, original fp32 and the packed model (fp32 and bf16 compute) is
measured in a fresh subprocess, so its RSS is its own: decode tokens/s at batch 1 and 8 (greedy,
KV cache, the prompt's prefill subtracted), prefill tokens/s on 512 tokens (the mini's 128 positions
cap it there), tensor bytes resident (distinct storages) and RSS before loading and after decoding.
Ratios packed/original are printed side by side. Timings are best of `--repeats`.

    python benchmarks/bench_decode.py [--models mini,qwen15] [--new-tokens 32] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QWEN15_SHAPES = dict(hidden_size=2048, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                     intermediate_size=5632, num_experts=60, num_experts_per_tok=4, num_hidden_layers=2,
                     num_attention_heads=16, num_key_value_heads=16, vocab_size=4096, max_position_embeddings=4096)
VARIANTS = (("original", "bfloat16"), ("original", "float32"), ("packed", "float32"), ("packed", "bfloat16"))
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


# ------------------------------------------------------------------ one measurement (in a subprocess)
def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def best_seconds(run, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def decode_tokens_per_second(model, batch: int, new_tokens: int, repeats: int, vocab: int) -> float:
    """Greedy decoding with the KV cache: (N - 1) tokens per row over the time of generating N minus 1."""
    import torch

    prompt = torch.randint(0, vocab, (batch, 16), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones_like(prompt)

    def generate(count: int):
        return lambda: model.generate(prompt, attention_mask=mask, max_new_tokens=count, min_new_tokens=count,
                                      do_sample=False, use_cache=True, pad_token_id=0)

    long, short = best_seconds(generate(new_tokens), repeats), best_seconds(generate(1), repeats)
    return batch * (new_tokens - 1) / max(long - short, 1e-9)


def import_everything(kind: str, path: str) -> None:
    """Import what loading and generating will import (the model's modeling code, generation, kbvq's
    quantizer and compiled kernels), so the RSS measured before loading holds the code, not the model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import transformers.generation.utils  # noqa: F401

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(config)
    if kind == "packed":
        import kbvq_cli.packed.quantizer  # noqa: F401
        from kbvq_cli.kernels import cpu_backend

        cpu_backend.available()


def measure(kind: str, path: str, dtype_name: str, args) -> dict:
    import torch

    import kbvq_cli  # noqa: F401  registers the kbvq quantization method
    from transformers import AutoModelForCausalLM

    from kbvq_cli.kernels import resolve_backend
    from kbvq_cli.packed.resident import quantized_resident_bytes, resident_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, dtype_name)
    import_everything(kind, path)
    rss_before = rss_bytes()
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    load_seconds = time.perf_counter() - started
    tensor_bytes, quantized_bytes = resident_bytes(model), quantized_resident_bytes(model)
    vocab = model.config.vocab_size
    prefill = min(args.prefill, model.config.max_position_embeddings)
    ids = torch.randint(0, vocab, (1, prefill), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(input_ids=ids[:, :8])  # warm-up: allocator primed, kernels' first call
        prefill_seconds = best_seconds(lambda: model(input_ids=ids, logits_to_keep=1), args.repeats)
        decode = {batch: decode_tokens_per_second(model, batch, args.new_tokens, args.repeats, vocab)
                  for batch in (1, 8)}
    return {"kind": kind, "dtype": dtype_name, "threads": torch.get_num_threads(), "load_s": load_seconds,
            "prefill_tokens": prefill, "prefill_tok_s": prefill / prefill_seconds,
            "decode_b1_tok_s": decode[1], "decode_b8_tok_s": decode[8],
            "tensor_bytes": tensor_bytes, "quantized_bytes": quantized_bytes, "rss_before": rss_before, "rss_after": rss_bytes(),
            "backend": resolve_backend(ids.float()) if kind == "packed" else "-"}


def measure_in_subprocess(kind: str, path: Path, dtype: str, args) -> dict:
    command = [sys.executable, __file__, "--measure", kind, str(path), dtype, "--new-tokens", str(args.new_tokens),
               "--repeats", str(args.repeats), "--prefill", str(args.prefill)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


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
                      "tensor MiB", "RSS before load MiB", "RSS after decoding MiB", "load s")))
    for row in rows:
        print(" | ".join([row["kind"], row["dtype"], row["backend"], f"{row['decode_b1_tok_s']:.2f}",
                          f"{row['decode_b8_tok_s']:.2f}", f"{row['prefill_tok_s']:.1f} ({row['prefill_tokens']})",
                          mib(row["tensor_bytes"]), mib(row["rss_before"]), mib(row["rss_after"]),
                          f"{row['load_s']:.1f}"]))
    originals = [row for row in rows if row["kind"] == "original"]
    best = {key: max(row[key] for row in originals) for key in ("decode_b1_tok_s", "decode_b8_tok_s", "prefill_tok_s")}
    for row in (row for row in rows if row["kind"] == "packed"):
        growth = row["rss_after"] - row["rss_before"]
        print(f"packed {row['dtype']}, against the faster original (bf16 or fp32) and the pack:")
        print(f"  decode b1 {row['decode_b1_tok_s'] / best['decode_b1_tok_s']:.2f}x (target >= 1.2)   "
              f"decode b8 {row['decode_b8_tok_s'] / best['decode_b8_tok_s']:.2f}x   "
              f"prefill {row['prefill_tok_s'] / best['prefill_tok_s']:.2f}x (target >= 0.67: at most 1.5x slower)")
        print(f"  resident tensor bytes / pack tensor bytes {row['tensor_bytes'] / stored:.3f} (target <= 1.05; the "
              f"unquantized tensors take the compute dtype), quantized parts resident / stored "
              f"{row['quantized_bytes'] / stored_quantized:.3f}")
        print(f"  RSS growth (after decoding - before loading) / pack tensor bytes {growth / stored:.3f}, / resident "
              f"tensor bytes {growth / row['tensor_bytes']:.3f} (target <= 1.3); RSS after decoding / original's: "
              + ", ".join(f"{o['dtype']} {row['rss_after'] / o['rss_after']:.2f}x" for o in originals))


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
    parser.add_argument("--measure", nargs=3, metavar=("KIND", "PATH", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, args)))
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    import torch

    print(f"bench-decode: CPU, {args.threads or torch.get_num_threads()} threads; each model measured in its own "
          "process; the qwen15-shape model has random weights and codebooks made with 2 Lloyd iterations: its "
          "speed and memory are real, its outputs meaningless (speed does not depend on the codebooks' quality)")
    for name in args.models.split(","):
        original, pack = PREPARE[name](work)
        rows = [measure_in_subprocess(kind, original if kind == "original" else pack, dtype, args)
                for kind, dtype in VARIANTS]
        print_model(name, original, pack, rows)
    print_memory(work)


if __name__ == "__main__":
    main()
