"""The upcycled test-bed (kbvq_cli/testbed/upcycle.py): the copy, and a tiny build from a synthetic corpus."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from kbvq_cli.testbed import build, corpus
from kbvq_cli.testbed.model import Variant, new_model
from kbvq_cli.testbed.upcycle import UPCYCLED, UpcycledVariant, upcycle

TINY = Variant(
    name="tiny", hidden_size=32, num_layers=2, num_heads=2, moe_intermediate_size=16,
    shared_expert_intermediate_size=32, vocab_size=300, seq_len=32, block_chars=200,
    steps=6, batch_size=8, peak_lr=5e-3, warmup_steps=2, eval_batch_size=4,
)
TINY_UPCYCLED = UpcycledVariant("upcycled-tiny", TINY, dense_steps=6, moe_steps=6, moe_peak_lr=3e-3,
                                moe_warmup_steps=2)


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_the_variants_upcycle_the_from_scratch_architectures():
    full, mini = UPCYCLED["upcycled"], UPCYCLED["upcycled-mini"]
    assert full.hidden_size == 256 and full.num_experts == 8 and full.steps == 1000  # the full one's budget
    assert mini.hidden_size == 128 and full.dense_variant().num_experts == 1
    assert full.moe_variant().seed != full.dense_variant().seed


def test_upcycling_copies_the_dense_mlp_into_every_expert_and_keeps_its_function():
    dense = new_model(TINY_UPCYCLED.dense_variant(), 0)
    moe = new_model(TINY_UPCYCLED.moe_variant(), 0)
    router = moe.model.layers[0].mlp.gate.weight.detach().clone()
    upcycle(dense, moe, TINY.experts_per_token)
    scale = TINY.num_experts / TINY.experts_per_token
    for index, layer in enumerate(moe.model.layers):
        experts, source = layer.mlp.experts, dense.model.layers[index].mlp.experts
        for e in range(TINY.num_experts):
            assert torch.equal(experts.gate_up_proj[e], source.gate_up_proj[0])
            assert torch.equal(experts.down_proj[e], source.down_proj[0] * scale)
    assert torch.equal(moe.model.layers[0].mlp.gate.weight, router)  # the router keeps its own initialisation
    assert torch.equal(moe.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    # With a router that favours no expert (p_e = 1/E exactly), top-k copies scaled by E/k are the dense MLP.
    with torch.no_grad():
        for layer in moe.model.layers:
            layer.mlp.gate.weight.zero_()
        ids = torch.arange(20)[None] % TINY.vocab_size
        torch.testing.assert_close(moe(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.fixture
def synthetic_build(monkeypatch):
    text = "\n\n".join(f"Paragraph {i}: the router sends token {i % 7} to expert {i % 8}." for i in range(600))
    splits = corpus.split_corpus([corpus.Document("s", "doc", text)], block_chars=300)
    variants = {"mini": dataclasses.replace(TINY, name="mini", steps=12), "upcycled-mini": TINY_UPCYCLED}
    monkeypatch.setattr(build, "get_variant", variants.__getitem__)
    monkeypatch.setattr(build, "prepare_splits", lambda variant: ({"documents": 1}, splits))
    return build.build_testbed


def test_an_upcycled_build_records_its_phases_and_redundancy_beside_the_from_scratch_one(synthetic_build, tmp_path):
    scratch = synthetic_build(tmp_path / "scratch", variant="mini")
    out = synthetic_build(tmp_path / "up", variant="upcycled-mini", compare=scratch)
    record = json.loads((out / "testbed.json").read_text())
    assert record["steps"] == 12 and set(record["training"]["phases"]) == {"dense", "moe"}
    assert record["val_perplexity"] > 1 and record["config"]["dense_steps"] == 6
    ours, theirs = record["redundancy"]["mean"], record["compare"]["redundancy"]
    assert record["compare"]["test_perplexity"] == json.loads((scratch / "testbed.json").read_text())["test_perplexity"]
    # copies of one MLP, trained apart for only a few steps, stay far more alike than experts trained apart
    assert ours["similarity"] > 0.9 > 0.3 > theirs["similarity"]
    assert ours["stacked_energy"]["1"] > theirs["stacked_energy"]["1"]
    again = synthetic_build(tmp_path / "again", variant="upcycled-mini", compare=scratch)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_compare_must_be_a_test_bed_and_is_checked_before_any_work(synthetic_build, tmp_path):
    from kbvq_cli.errors import KbvqError

    with pytest.raises(KbvqError, match="is not a built test-bed"):
        synthetic_build(tmp_path / "up", variant="upcycled-mini", compare=tmp_path)
    assert not (tmp_path / "up").exists()
