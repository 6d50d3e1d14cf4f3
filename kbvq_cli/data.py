"""Text sources and the seeded choice of calibration sequences.

A data spec is a local `.txt`, `.jsonl` or `.parquet` file, a directory of them, or a Hugging Face
dataset id written `ID[:CONFIG][@SPLIT]` (default split `train`), e.g.
`togethercomputer/RedPajama-Data-1T-Sample` or `wikitext:wikitext-2-raw-v1@test`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kbvq_cli.errors import KbvqError
from kbvq_cli.local_data import read_local

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
PAPER_CALIBRATION_DATA = "togethercomputer/RedPajama-Data-1T-Sample"


@dataclass(frozen=True)
class HubSpec:
    dataset: str
    config: str | None
    split: str


def parse_hub_spec(spec: str, default_split: str = "train") -> HubSpec:
    rest, _, split = spec.partition("@")
    dataset, _, config = rest.partition(":")
    return HubSpec(dataset, config or None, split or default_split)


def local_files(spec: str) -> list[Path] | None:
    """The local files a spec names, or None if it is not a local path."""
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise KbvqError(f"data file {path} must be one of {', '.join(LOCAL_SUFFIXES)}")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES and p.is_file())
        if not files:
            raise KbvqError(f"data directory {path} holds no {', '.join(LOCAL_SUFFIXES)} files")
        return files
    if spec.startswith((".", "/", "~")) or path.suffix in LOCAL_SUFFIXES:
        raise KbvqError(f"data path {spec} does not exist")
    return None


def load_documents(spec: str, text_field: str = "text", default_split: str = "train",
                   option: str = "--data") -> list[str]:
    """All documents of a data spec, in a fixed order."""
    files = local_files(spec)
    if files is not None:
        return [doc for file in files for doc in read_local(file, text_field)]
    hub = parse_hub_spec(spec, default_split)
    try:
        import datasets

        dataset = datasets.load_dataset(hub.dataset, hub.config, split=hub.split)
    except Exception as error:  # datasets raises many types; all mean "could not load"
        reason = str(error).splitlines()[0][:160] if str(error) else type(error).__name__
        raise KbvqError(f"could not load dataset {spec!r} ({reason}); pass a local .txt/.jsonl/.parquet "
                        f"file or directory with {option}") from None
    if text_field not in dataset.column_names:
        raise KbvqError(f"dataset {spec} has no column {text_field!r}; columns: {', '.join(dataset.column_names)}; "
                        f"name the text column with --text-field")
    return [str(text) for text in dataset[text_field]]


def data_fingerprint(spec: str) -> dict:
    """What identifies the source: file hashes for local data, id/config/split for hub data."""
    from kbvq_cli.hashing import sha256_file

    files = local_files(spec)
    if files is not None:
        return {"local": {str(file): sha256_file(file) for file in files}}
    hub = parse_hub_spec(spec)
    return {"hub": {"dataset": hub.dataset, "config": hub.config, "split": hub.split}}


def sample_sequences(documents: list[str], tokenizer, samples: int, seqlen: int, seed: int):
    """`samples` non-overlapping windows of `seqlen` tokens, chosen with `seed`. Returns int64 [samples, seqlen].

    Documents are visited in a seeded order and tokenized until twice the needed tokens are in hand
    (so a huge corpus is not tokenized whole), joined by the EOS token; the stream is cut into
    windows and a seeded subset of them is kept, in stream order.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(documents), generator=generator).tolist()
    needed = samples * seqlen
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for index in order:
        stream.extend(tokenizer(documents[index], add_special_tokens=False)["input_ids"] + separator)
        if len(stream) >= 2 * needed:
            break
    windows = len(stream) // seqlen
    if windows < samples:
        raise KbvqError(f"the calibration data has {len(stream)} tokens, fewer than samples x seqlen = "
                        f"{samples} x {seqlen}; lower --samples or --seqlen, or give more text with --data")
    chosen = torch.randperm(windows, generator=generator)[:samples].sort().values
    tokens = torch.tensor(stream[: windows * seqlen], dtype=torch.int64).view(windows, seqlen)
    return tokens[chosen].contiguous()
