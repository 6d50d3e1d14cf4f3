"""The measurements of bench_decode.py, each run in a fresh process (`python benchmarks/decode_measure.py ...`),
printing one JSON line.

    speed ORIGINAL PACK   every variant (original bf16/fp32, packed fp32/bf16) loaded in this one process and
                          timed in shuffled interleaved rounds, best of `--repeats` per workload: a load spike
                          on a shared machine then hits all variants alike instead of one of them
    memory KIND PATH DTYPE  one model alone: RSS before loading (after importing what loading and generating
                          import), tensor bytes resident, RSS after running every workload once

Workloads: prefill of `--prefill` tokens (one forward, logits of the last position only), and greedy
decoding with the KV cache at batch 1 and 8: `--new-tokens` tokens after a 16-token prompt, the time of
generating one token (the prompt's prefill) subtracted.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

VARIANTS = (("original", "bfloat16"), ("original", "float32"), ("packed", "float32"), ("packed", "bfloat16"))
PROMPT = 16


def rss_bytes() -> dict[str, int]:
    """VmRSS and its anonymous and file-backed parts (mapped checkpoint pages count in the latter)."""
    fields = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file"}
    found = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split()[0] if line.strip() else ""
        if key in fields:
            found[fields[key]] = int(line.split()[1]) * 1024
    return found


def import_everything(kind: str, path: str) -> None:
    """Import the model's modeling code, generation, and kbvq's quantizer and compiled kernels, so an RSS
    taken afterwards holds the code and not the model."""
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


def load(path: str, dtype_name: str):
    import kbvq_cli  # noqa: F401  registers the kbvq quantization method
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype_name)).eval()


def workloads(model, args) -> dict:
    """name -> a callable running it once; decode comes as a (long, short) pair per batch size."""
    vocab, positions = model.config.vocab_size, model.config.max_position_embeddings
    generator = torch.Generator().manual_seed(0)
    prefill = torch.randint(0, vocab, (1, min(args.prefill, positions)), generator=generator)
    found = {"prefill": lambda: model(input_ids=prefill, logits_to_keep=1)}
    for batch in (1, 8):
        prompt = torch.randint(0, vocab, (batch, PROMPT), generator=generator)
        for name, count in (("long", args.new_tokens), ("short", 1)):
            found[f"b{batch}_{name}"] = (lambda prompt=prompt, count=count: model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=count, min_new_tokens=count,
                do_sample=False, use_cache=True, pad_token_id=0))
    return found


def figures(best: dict, prefill_tokens: int, new_tokens: int) -> dict:
    """Tokens per second from the best seconds of each workload."""
    decode = {batch: batch * (new_tokens - 1) / max(best[f"b{batch}_long"] - best[f"b{batch}_short"], 1e-9)
              for batch in (1, 8)}
    return {"prefill_tokens": prefill_tokens, "prefill_tok_s": prefill_tokens / best["prefill"],
            "decode_b1_tok_s": decode[1], "decode_b8_tok_s": decode[8]}


def speed(original: str, pack: str, args) -> list[dict]:
    from kbvq_cli.kernels import resolve_backend

    models = [(kind, dtype, load(original if kind == "original" else pack, dtype)) for kind, dtype in VARIANTS]
    runs = [(index, name, run) for index, (_, _, model) in enumerate(models)
            for name, run in workloads(model, args).items()]
    best, shuffler = {}, random.Random(0)
    with torch.inference_mode():
        for _, _, model in models:  # warm-up: the kernels' first call, the allocator
            model(input_ids=torch.zeros(1, 8, dtype=torch.long))
        for _ in range(args.repeats):
            shuffler.shuffle(runs)
            for index, name, run in runs:
                started = time.perf_counter()
                run()
                seconds = time.perf_counter() - started
                best[index, name] = min(best.get((index, name), float("inf")), seconds)
    rows = []
    for index, (kind, dtype, model) in enumerate(models):
        prefill_tokens = min(args.prefill, model.config.max_position_embeddings)
        rows.append({"kind": kind, "dtype": dtype, "threads": torch.get_num_threads(),
                     "backend": resolve_backend(torch.zeros(1, 1)) if kind == "packed" else "-",
                     **figures({name: best[index, name] for (i, name) in best if i == index}, prefill_tokens,
                               args.new_tokens)})
    return rows


def memory(kind: str, path: str, dtype: str, args) -> dict:
    from kbvq_cli.packed.resident import quantized_resident_bytes, resident_bytes

    import_everything(kind, path)
    rss_before = rss_bytes()
    started = time.perf_counter()
    model = load(path, dtype)
    load_seconds = time.perf_counter() - started
    tensor_bytes, quantized_bytes = resident_bytes(model), quantized_resident_bytes(model)
    with torch.inference_mode():
        for run in workloads(model, args).values():
            run()
    return {"kind": kind, "dtype": dtype, "load_s": load_seconds, "tensor_bytes": tensor_bytes,
            "quantized_bytes": quantized_bytes, "rss_before": rss_before, "rss_after": rss_bytes()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("speed", "memory"))
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = speed(*args.paths, args) if args.what == "speed" else memory(*args.paths, args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
