"""Read a local `.txt`, `.jsonl` or `.parquet` data file into documents, refusing what is not text.

Every problem is one KbvqError naming the file and what is wrong with it: a file that is empty, is not
UTF-8, is not Parquet, lacks the text field, or decodes to bytes that are mostly not printable (a binary
file renamed `.txt` decodes as UTF-8 when it happens to hold no byte above 0x7f, e.g. a run of zeros).
Calibrating on such bytes would give statistics of nothing the model will ever see, silently.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from kbvq_cli.errors import KbvqError

# C0 controls other than tab, newline, vertical tab, form feed and carriage return; DEL; C1 controls; and
# U+FFFD (what a lossy decoder leaves). Real text in any language has almost none of these.
_NOT_PRINTABLE = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\ufffd]")
MAX_NOT_PRINTABLE = 0.1  # fraction of the characters; above it the file is not text
FIELD_OPTION = "--text-field"  # calibrate's and eval's option naming the text field
PARQUET_MAGIC = b"PAR1"  # the first and last four bytes of every Parquet file


def read_local(file: Path, text_field: str) -> list[str]:
    """The documents of one local data file, in file order (`text_field`: the JSONL field or Parquet column)."""
    if file.stat().st_size == 0:
        raise KbvqError(f"data file {file} is empty; give a file with text")
    if file.suffix == ".parquet":
        documents = _read_parquet(file, text_field)
    elif file.suffix == ".jsonl":
        documents = _read_jsonl(_decode(file), file, text_field)
    else:
        documents = [_decode(file)]
    if not any(document.strip() for document in documents):
        raise KbvqError(f"data file {file} is empty (it holds no text, only whitespace); give a file with text")
    _refuse_binary(file, documents)
    return documents


def _decode(file: Path) -> str:
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise KbvqError(f"data file {file} is not UTF-8 text (byte 0x{data[error.start]:02x} at offset "
                        f"{error.start} cannot be decoded); convert it to UTF-8 or give another file") from None
    # newlines as `Path.read_text` gives them (universal newlines), so the tokens of a CRLF file, and the
    # runs calibrated on it, stay what they were before this check existed
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_jsonl(text: str, file: Path, text_field: str) -> list[str]:
    documents = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise KbvqError(f"{file}:{number} is not valid JSON ({error.msg} at column {error.colno}); "
                            f"a .jsonl file holds one JSON object per line") from None
        if not isinstance(record, dict):
            raise KbvqError(f"{file}:{number} is a JSON {type(record).__name__}, not an object with a "
                            f"{text_field!r} field; a .jsonl file holds one JSON object per line")
        if text_field not in record:
            fields = ", ".join(map(repr, list(record)[:8])) or "none"
            raise KbvqError(f"{file}:{number} has no {text_field!r} field (its fields: {fields}); "
                            f"name the text field with {FIELD_OPTION}")
        if not isinstance(record[text_field], str):
            raise KbvqError(f"{file}:{number}: field {text_field!r} holds a JSON "
                            f"{type(record[text_field]).__name__}, not text; name the text field with {FIELD_OPTION}")
        documents.append(record[text_field])
    return documents


def _read_parquet(file: Path, text_field: str) -> list[str]:
    import pyarrow
    import pyarrow.parquet as pq

    with open(file, "rb") as handle:
        head = handle.read(len(PARQUET_MAGIC))
        handle.seek(max(file.stat().st_size - len(PARQUET_MAGIC), 0))
        tail = handle.read()
    if head != PARQUET_MAGIC or tail != PARQUET_MAGIC:
        raise KbvqError(f"data file {file} is not a Parquet file (it does not begin and end with the "
                        f"Parquet marker PAR1); give a .parquet file, or rename it after its real format")
    try:
        table = pq.read_table(file)
    except (pyarrow.ArrowException, OSError) as error:  # the marker is there but the contents are damaged
        reason = str(error).splitlines()[0].rpartition(": ")[2][:120] or type(error).__name__
        raise KbvqError(f"data file {file} is a damaged Parquet file ({reason}); write it again") from None
    if text_field not in table.column_names:
        raise KbvqError(f"{file} has no column {text_field!r}; columns: {', '.join(table.column_names)}; "
                        f"name the text column with {FIELD_OPTION}")
    return [str(value) for value in table.column(text_field).to_pylist() if value is not None]


def _refuse_binary(file: Path, documents: list[str]) -> None:
    characters = sum(len(document) for document in documents)
    control = sum(len(_NOT_PRINTABLE.findall(document)) for document in documents)
    if control > MAX_NOT_PRINTABLE * characters:
        raise KbvqError(f"data file {file} is not text: {100 * control / characters:.0f}% of its characters are "
                        f"control characters or undecodable; give a text file")
