"""A byte-level BPE tokenizer (GPT-2 style) trained on the training split, as a PreTrainedTokenizerFast.

Byte-level means every string round-trips exactly, whatever its characters. The only special token is
`<|endoftext|>` (id 0), used as end-of-sequence and padding token; no BOS is prepended, so token
counts and perplexities are over the text alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerFast

END_OF_TEXT = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> "PreTrainedTokenizerFast":
    """Train byte-level BPE with `vocab_size` entries (256 bytes + merges + the special token) on `texts`.

    Deterministic for the same texts: the trainer breaks ties between equally frequent pairs by id.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT)


def encode_text(tokenizer: "PreTrainedTokenizerFast", text: str) -> "torch.Tensor":
    """Token ids of `text` as one string, no special tokens: int64 [n_tokens]. Used for val/test files."""
    import torch

    ids = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    return torch.tensor(ids, dtype=torch.int64)


def encode_blocks(tokenizer: "PreTrainedTokenizerFast", blocks: list[str], separator: str) -> "torch.Tensor":
    """Token ids of the blocks joined by `separator`, encoded block by block in parallel: int64 [n_tokens].

    Near-identical to encoding the joined string (only the tokens at the joins can differ) and much
    faster on a multi-megabyte training split.
    """
    import torch

    backend = tokenizer.backend_tokenizer
    separator_ids = backend.encode(separator, add_special_tokens=False).ids
    ids: list[int] = []
    for index, encoding in enumerate(backend.encode_batch(blocks, add_special_tokens=False)):
        if index:
            ids.extend(separator_ids)
        ids.extend(encoding.ids)
    return torch.tensor(ids, dtype=torch.int64)
