"""kbvq eval: perplexity equals a direct computation, results are reused, lm-eval runs end to end on a
local task and its accuracy equals the one computed by hand from the model's log-likelihoods."""

import json
import math
from pathlib import Path

import pytest
import torch

from cli_util import invoke, last_json

TASK_DIR = Path(__file__).parent / "data" / "lm_eval_tasks"


def direct_perplexity(model, tokenizer, text: str, seqlen: int) -> float:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - seqlen + 1, seqlen):
            window = torch.tensor(ids[start:start + seqlen])
            logits = model(input_ids=window[None]).logits[0].double()
            nll += float(torch.nn.functional.cross_entropy(logits[:-1], window[1:], reduction="sum"))
            count += seqlen - 1
    return math.exp(nll / count)


def test_perplexity_of_the_original_equals_a_direct_computation(tiny_model_dir, calib_text, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, run = tiny_model_dir("qwen2_moe"), tmp_path / "fp"
    args = ("eval", "--model", model_dir, "--run", run, "--ppl-data", calib_text, "--seqlen", 32,
            "--max-tokens", 400, "--tasks", "none", "--json")
    measured = last_json(invoke(*args))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    text = tokenizer.decode(tokenizer(calib_text.read_text(), add_special_tokens=False)["input_ids"][:400])
    expected = direct_perplexity(model, tokenizer, text, 32)
    assert measured["ppl"] == pytest.approx(expected, rel=1e-5)
    assert measured["tokens_scored"] == 12 * 31
    before = (run / "eval" / "results.json").read_text()
    again = invoke(*args)
    assert "reusing" in again.output and (run / "eval" / "results.json").read_text() == before
    changed = last_json(invoke(*args[:-5], "--seqlen", 64, "--tasks", "none", "--json"))
    assert changed["ppl"] != measured["ppl"]
    assert len(json.loads((run / "eval" / "results.json").read_text())["entries"]) == 2


def test_packed_run_perplexity(tiny_model_dir, calib_text, tmp_path):
    from kbvq_cli import load_quantized

    run = tmp_path / "run"
    invoke("calibrate", "--model", tiny_model_dir("qwen3_moe"), "--data", calib_text, "--samples", 8,
           "--seqlen", 64, "--run", run)
    invoke("eval", "--run", run, "--tasks", "none", code=2)  # nothing packed yet: a one-line error
    for stage, *options in (("klt-svd", "--rank", 2), ("vq", "--iters", 3), ("bcos",), ("pack",)):
        invoke(stage, "--run", run, *options)
    measured = last_json(invoke("eval", "--run", run, "--ppl-data", calib_text, "--seqlen", 64, "--max-tokens", 300,
                                "--tasks", "none", "--json"))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(run / "pack"))
    ids = tokenizer(calib_text.read_text(), add_special_tokens=False)["input_ids"][:300]
    expected = direct_perplexity(load_quantized(run / "pack"), tokenizer, tokenizer.decode(ids), 64)
    assert measured["ppl"] == pytest.approx(expected, rel=1e-5)


def hand_accuracy(model, tokenizer, documents: list[dict]) -> float:
    """lm-eval's multiple-choice protocol: the choice with the largest summed log-likelihood of
    " " + choice after the question wins."""
    correct = 0
    for doc in documents:
        scores = []
        for choice in doc["choices"]:
            context = tokenizer(doc["question"], add_special_tokens=False)["input_ids"]
            whole = tokenizer(doc["question"] + " " + choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(float(logits[i - 1, whole[i]]) for i in range(len(context), len(whole))))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
    return correct / len(documents)


def test_lm_eval_runs_a_local_task_end_to_end(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny_model_dir("qwen2_moe")
    monkeypatch.chdir(TASK_DIR)  # the task YAML names its JSON-lines file relative to its folder
    result = invoke("eval", "--model", model_dir, "--run", tmp_path / "run", "--ppl-data", "none",
                    "--task-dir", TASK_DIR, "--tasks", "kbvq_tiny_choice", "--device", "cpu", "--json")
    measured = last_json(result)
    documents = [json.loads(line) for line in (TASK_DIR / "kbvq_tiny_choice.jsonl").read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    expected = hand_accuracy(model, AutoTokenizer.from_pretrained(str(model_dir)), documents)
    assert measured["tasks"]["kbvq_tiny_choice"]["acc"] == pytest.approx(expected)
    assert measured["avg_acc"] == pytest.approx(expected)
    stored = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())["entries"]
    entry = next(iter(stored.values()))
    assert entry["config"]["task"] == "kbvq_tiny_choice" and entry["versions"]["lm_eval"]
    assert entry["settings"]["seed"] == 1234 and entry["settings"]["num_fewshot"] == 0


def test_eval_refusals(tiny_model_dir, tmp_path):
    assert "needs --run" in invoke("eval", code=2).output
    result = invoke("eval", "--model", tiny_model_dir("qwen2_moe"), "--run", tmp_path / "r", "--ppl-data", "none",
                    "--tasks", "no_such_task", "--device", "cpu", code=2)
    assert "unknown lm-eval task" in result.output
