"""One perplexity (kbvq_cli.perplexity): windows drop the short tail, the NLL equals a float64 computation
by hand, and the numbers the test-bed build records are the ones `kbvq eval` measures on the same text."""

import math
import shutil

import pytest
import torch

from cli_util import invoke, last_json
from kbvq_cli.errors import KbvqError
from kbvq_cli.perplexity import perplexity, token_stream, windows
from tiny_models import synthetic_text

SEQLEN = 32


def test_windows_are_non_overlapping_and_drop_the_short_tail():
    ids = torch.arange(75)
    assert torch.equal(windows(ids, SEQLEN), torch.arange(64).view(2, SEQLEN))
    assert windows(torch.arange(64), SEQLEN).shape == (2, SEQLEN)  # no tail: nothing dropped
    with pytest.raises(KbvqError, match="31 tokens, fewer than one window of 32"):
        windows(torch.arange(31), SEQLEN)


def test_perplexity_is_the_mean_nll_of_every_window_in_any_batching(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir("qwen3_moe"))).eval()
    ids = torch.randint(0, 320, (5 * SEQLEN + 7,), generator=torch.Generator().manual_seed(0))
    nll = 0.0
    with torch.no_grad():
        for window in ids[: 5 * SEQLEN].view(5, SEQLEN):
            log_probs = model(input_ids=window[None]).logits[0, :-1].double().log_softmax(-1)
            nll -= float(log_probs.gather(1, window[1:, None]).sum())
    for batch_size in (1, 2, 5):
        measured = perplexity(model, ids, SEQLEN, batch_size=batch_size)
        assert (measured.windows, measured.tokens_scored) == (5, 5 * (SEQLEN - 1))
        assert measured.mean_nll == pytest.approx(nll / (5 * (SEQLEN - 1)), rel=1e-6)
        assert measured.ppl == pytest.approx(math.exp(nll / (5 * (SEQLEN - 1))), rel=1e-6)


def test_the_test_bed_records_what_kbvq_eval_measures(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from kbvq_cli.testbed.build import evaluate_saved

    # A test-bed directory: a tiny Qwen1.5-MoE-architecture model (the test-bed's) plus its text splits.
    model_dir = tmp_path / "testbed"
    shutil.copytree(tiny_model_dir("qwen2_moe"), model_dir)
    for split, seed in (("val", 5), ("test", 6)):
        (model_dir / f"{split}.txt").write_text(synthetic_text(60, seed))
    tokens = token_stream([(model_dir / "test.txt").read_text()], AutoTokenizer.from_pretrained(str(model_dir)))
    assert tokens.numel() % SEQLEN, "the text should leave a tail shorter than a window"

    recorded = evaluate_saved(model_dir, SEQLEN, batch_size=4)["test"]
    measured = last_json(invoke("eval", "--model", model_dir, "--run", tmp_path / "run", "--ppl-data",
                                model_dir / "test.txt", "--seqlen", SEQLEN, "--tasks", "none", "--json"))
    assert recorded["tokens_scored"] == measured["tokens_scored"] == tokens.numel() // SEQLEN * (SEQLEN - 1)
    assert recorded["perplexity"] == pytest.approx(measured["ppl"], abs=1e-4)  # recorded to 4 decimals
