"""Local data that is not usable text is refused in one line naming the file, before the run is created."""

import json

import pytest
from typer.testing import CliRunner

from kbvq_cli.app import app
from kbvq_cli.data import load_documents

runner = CliRunner()

PNG_HEADER = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"


def calibrate(model, data, run, *extra):
    return runner.invoke(app, ["calibrate", "--model", str(model), "--data", str(data), "--run", str(run),
                               "--samples", "2", "--seqlen", "16", "--device", "cpu", *map(str, extra)])


def only_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def bad_files(tmp_path):
    """(file, the exact message) for each kind of bad data file."""
    cases = []

    def case(name, content, message):
        path = tmp_path / name
        path.write_bytes(content)
        cases.append((path, message.format(path=path)))

    case("png.jsonl", b'{"text": "a"}\n' + PNG_HEADER,
         "error: data file {path} is not UTF-8 text (byte 0x89 at offset 14 cannot be decoded); "
         "convert it to UTF-8 or give another file")
    case("latin1.txt", "caf\xe9 au lait".encode("latin-1"),
         "error: data file {path} is not UTF-8 text (byte 0xe9 at offset 3 cannot be decoded); "
         "convert it to UTF-8 or give another file")
    case("png.parquet", PNG_HEADER * 4,
         "error: data file {path} is not a Parquet file (it does not begin and end with the Parquet marker "
         "PAR1); give a .parquet file, or rename it after its real format")
    case("torn.parquet", b"PAR1" + bytes(range(64)) + b"PAR1",
         "error: data file {path} is a damaged Parquet file (Parquet file size is 72 bytes, smaller than the "
         "size reported by footer's (1061043516bytes)); write it again")
    case("zeros.txt", bytes(4096) + b"a few words",
         "error: data file {path} is not text: 100% of its characters are control characters or undecodable; "
         "give a text file")
    case("empty.txt", b"", "error: data file {path} is empty; give a file with text")
    case("empty.parquet", b"", "error: data file {path} is empty; give a file with text")
    case("blank.jsonl", b"\n\n  \n",
         "error: data file {path} is empty (it holds no text, only whitespace); give a file with text")
    case("fields.jsonl", b'{"text": "one"}\n{"content": "two", "id": 2}\n',
         "error: {path}:2 has no 'text' field (its fields: 'content', 'id'); name the text field with --text-field")
    case("array.jsonl", b'["text"]\n',
         "error: {path}:1 is a JSON list, not an object with a 'text' field; a .jsonl file holds one JSON "
         "object per line")
    return cases


def test_each_bad_file_is_one_line_and_creates_no_run(tiny_model_dir, tmp_path):
    model = tiny_model_dir("qwen3_moe")
    for path, message in bad_files(tmp_path):
        run = tmp_path / f"run-{path.name}"
        assert only_line(calibrate(model, path, run)) == message
        assert not run.exists(), path.name


def test_parquet_without_the_text_column_names_the_option(tiny_model_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": ["some text here"], "id": [1]}), path)
    assert only_line(calibrate(tiny_model_dir("qwen3_moe"), path, tmp_path / "run")) == (
        f"error: {path} has no column 'text'; columns: body, id; name the text column with --text-field")
    assert load_documents(str(path), text_field="body") == ["some text here"]


def test_text_field_option_reads_another_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"content": f"document {i}"}) for i in range(3)) + "\n")
    assert load_documents(str(path), text_field="content") == ["document 0", "document 1", "document 2"]


def test_a_bad_file_in_a_directory_is_named(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("Some real text, a sentence or two.")
    (tmp_path / "data" / "b.txt").write_bytes(b"")
    with pytest.raises(Exception, match=r"data file .*b\.txt is empty"):
        load_documents(str(tmp_path / "data"))


def test_eval_ppl_data_gets_the_same_messages(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    result = runner.invoke(app, ["eval", "--model", str(tiny_model_dir("qwen3_moe")), "--ppl-data", str(empty),
                                 "--tasks", "none", "--seqlen", "16", "--device", "cpu", "--run", str(tmp_path / "r")])
    # eval loads the model before the text, and transformers prints its loading bar: the error is the last line
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.output.strip().splitlines()[-1] == f"error: data file {empty} is empty; give a file with text"


def test_real_text_with_unicode_passes(tmp_path):
    path = tmp_path / "poem.txt"
    path.write_text("Ein Gedicht — naïve café, 東京, tabs\tand\r\nnewlines.\n", encoding="utf-8")
    assert load_documents(str(path)) == [path.read_text(encoding="utf-8")]  # CRLF read as LF, as before
