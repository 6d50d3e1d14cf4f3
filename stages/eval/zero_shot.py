"""Zero-shot accuracy through lm-evaluation-harness, handed the in-memory model (`HFLM(pretrained=model)`)."""

from __future__ import annotations

import json

from kbvq_cli.errors import KbvqError

METRICS = ("acc", "acc_norm", "perplexity")


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise KbvqError(f"zero-shot tasks need lm-evaluation-harness ({error.name} is missing); "
                        f"pip install 'kbvq[eval]', or pass --tasks none") from None
    return lm_eval, HFLM, TaskManager


def zero_shot(model, tokenizer, tasks: list[str], settings, device: str) -> dict[str, dict]:
    """{task: {"metrics": {acc, acc_norm, ... and their stderr}, "samples": n, "config": task config}}."""
    lm_eval, HFLM, TaskManager = _lm_eval()
    manager = TaskManager(include_path=settings.task_dir) if settings.task_dir else TaskManager()
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise KbvqError(f"unknown lm-eval task(s) {', '.join(unknown)}; check the names, or give a directory of "
                        f"task YAMLs with --task-dir")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size, device=device)
    seed = settings.seed
    output = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, num_fewshot=settings.num_fewshot, limit=settings.limit, task_manager=manager,
        log_samples=False, bootstrap_iters=1000, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed)
    if output is None:
        raise KbvqError("lm-evaluation-harness returned no results")
    results = {}
    for task in tasks:
        raw = output["results"].get(task, {})
        metrics = {key.split(",")[0]: value for key, value in raw.items()
                   if key.split(",")[0].removesuffix("_stderr") in METRICS and isinstance(value, (int, float))}
        config = json.loads(json.dumps(output.get("configs", {}).get(task, {}), default=str))
        samples = output.get("n-samples", {}).get(task, {})
        results[task] = {"metrics": metrics, "samples": samples, "config": config}
    return results


def accuracy(entry: dict) -> float | None:
    """The accuracy a table shows for a task (`acc`, as in the paper's tables)."""
    return entry["metrics"].get("acc")
