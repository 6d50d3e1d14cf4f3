"""The `kbvq` command line: one thin command per stage, plus `run` (all stages of a recipe) and `testbed`.

Commands parse options and hand them to the stage; nothing heavy is imported at module level, so
`kbvq --help` stays fast and free of torch and transformers.
"""

from __future__ import annotations

from typing import Any, Optional

import typer
from typing_extensions import Annotated

from kbvq_cli.cli_errors import print_error, usage_message, user_errors
from kbvq_cli.errors import KbvqError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="KBVQ-MoE: compress Mixture-of-Experts models to 2-3 bits per weight, one resumable stage at a time.\n\n"
    "Stages: calibrate -> klt-svd -> vq -> bcos -> pack -> eval (baselines: calibrate -> gptq -> pack -> eval). Each writes RUN/<stage>/ "
    "(safetensors shards + manifest.json); rerunning a stage resumes it.",
)

RunOption = Annotated[Optional[str], typer.Option("--run", help="Run directory (default runs/<model name>).")]
RecipeOption = Annotated[Optional[str], typer.Option("--recipe", help="Recipe YAML; command-line options override it.")]
RestartOption = Annotated[bool, typer.Option("--restart", help="Discard this stage's existing output and redo it.")]
DeviceOption = Annotated[Optional[str], typer.Option("--device", help="auto (CUDA when present), cpu, cuda, cuda:N.")]
ThreadsOption = Annotated[bool, typer.Option(
    "--allow-thread-change", help="Resume work begun with another torch thread count (the result may then "
    "differ in the last bits from an uninterrupted run).")]


def run_stage(stage: str, *, run, recipe, model=None, restart=False, allow_thread_change=False,
              overrides: dict[str, Any]) -> None:
    with user_errors():
        from kbvq_cli.recipe import resolve_stage
        from kbvq_cli.registry import STAGES
        from kbvq_cli.run_lock import stage_lock

        resolved = resolve_stage(stage, run=run, recipe_path=recipe, model=model, overrides=overrides,
                                 allow_thread_change=allow_thread_change)
        with stage_lock(resolved.run_dir, stage):
            STAGES[stage].runner_function()(resolved, restart=restart)


@app.command()
def calibrate(
    model: Annotated[Optional[str], typer.Option("--model", help="Hugging Face id or local model directory.")] = None,
    run: RunOption = None,
    recipe: RecipeOption = None,
    data: Annotated[Optional[str], typer.Option(
        "--data", help="Dataset id[:config][@split], or a local .txt/.jsonl/.parquet file or directory.")] = None,
    samples: Annotated[Optional[int], typer.Option("--samples", help="Number of sequences (paper: 256).")] = None,
    seqlen: Annotated[Optional[int], typer.Option("--seqlen", help="Tokens per sequence (paper: 4096).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of the sequence choice (paper: 42).")] = None,
    device: DeviceOption = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Sequences per forward pass.")] = None,
    text_field: Annotated[Optional[str], typer.Option("--text-field", help="Text column of the data.")] = None,
    routing: Annotated[Optional[str], typer.Option("--routing", help="model (each expert's routed tokens, the "
                       "paper) or all (every expert's statistics over every token).")] = None,
    starved_fallback: Annotated[Optional[str], typer.Option(
        "--starved-fallback", help="all-tokens (default: an expert routed < min_expert_tokens tokens gets all "
        "tokens' statistics) or none.")] = None,
    moments: Annotated[Optional[str], typer.Option(
        "--moments", help="Second-moment storage: compact (default; 16-bit per-expert) or exact.")] = None,
    restart: RestartOption = False,
    allow_thread_change: ThreadsOption = False,
) -> None:
    """Record the calibration statistics of docs/method.md §1, layer by layer, streaming the model."""
    overrides = dict(data=data, samples=samples, seqlen=seqlen, seed=seed, device=device,
                     batch_size=batch_size, text_field=text_field, routing=routing, moments=moments,
                     starved_fallback=starved_fallback)
    run_stage("calibrate", run=run, recipe=recipe, model=model, restart=restart,
              allow_thread_change=allow_thread_change, overrides=overrides)


@app.command("klt-svd")
def klt_svd(
    run: RunOption = None,
    recipe: RecipeOption = None,
    rank_ratio: Annotated[Optional[float], typer.Option("--rank-ratio", help="Rank as a fraction of min(oc, ic) (default 1/128).")] = None,
    rank: Annotated[Optional[int], typer.Option("--rank", help="Absolute rank; 0 = no shared part (plain VQ).")] = None,
    energy: Annotated[Optional[float], typer.Option("--energy", help="Smallest rank with rho_k >= this fraction.")] = None,
    target_bits: Annotated[Optional[float], typer.Option("--target-bits", help="Ranks per layer and projection "
                           "for at most this many bits per expert weight (at the run's vq bits and dim).")] = None,
    code_sizes: Annotated[Optional[str], typer.Option("--code-sizes", help="With --target-bits: VQ code sizes "
                          "BITSxDIM, comma-separated (e.g. 2x2,3x2), the budget may give a layer's projection besides "
                          "vq's own.")] = None,
    no_klt: Annotated[bool, typer.Option("--no-klt", help="SVD without KLT (ablation).")] = False,
    damp: Annotated[Optional[float], typer.Option("--damp", help="KLT damping lambda (default 0.01).")] = None,
    down: Annotated[Optional[str], typer.Option("--down", help="down projection: pooled, output or off.")] = None,
    device: DeviceOption = None,
    restart: RestartOption = False,
    allow_thread_change: ThreadsOption = False,
) -> None:
    """IDRE: KLT-guided SVD of each layer's stacked experts into a shared basis and per-expert coefficients."""
    overrides = dict(rank_ratio=rank_ratio, rank=rank, energy=energy, target_bits=target_bits,
                     code_sizes=code_sizes, klt=False if no_klt else None,
                     damp=damp, down=down, device=device)
    run_stage("klt-svd", run=run, recipe=recipe, restart=restart,
              allow_thread_change=allow_thread_change, overrides=overrides)


@app.command()
def vq(
    run: RunOption = None,
    recipe: RecipeOption = None,
    bits: Annotated[Optional[int], typer.Option("--bits", help="Bits per weight: 2 or 3 (4 with --dim 2).")] = None,
    dim: Annotated[Optional[int], typer.Option("--dim", help="Sub-vector length d (default 4).")] = None,
    iters: Annotated[Optional[int], typer.Option("--iters", help="Lloyd iterations (default 100).")] = None,
    backend: Annotated[Optional[str], typer.Option("--backend", help="auto (torch on CUDA, faiss on the CPU), faiss (CPU) or torch (CPU/CUDA).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="k-means++ seed (default 42).")] = None,
    error_feedback: Annotated[Optional[bool], typer.Option(
        "--error-feedback/--no-error-feedback", help="GPTQ-style error feedback in the assignment (GPTVQ, Table 5).")] = None,
    objective: Annotated[Optional[str], typer.Option("--objective", help="weight (k-means, the paper) or output "
                         "(then Lloyd weighted by the input moments).")] = None,
    refine_iters: Annotated[Optional[int], typer.Option("--refine-iters", help="Least-squares codebook rounds under C.")] = None,
    device: DeviceOption = None,
    restart: RestartOption = False,
    allow_thread_change: ThreadsOption = False,
) -> None:
    """Vector-quantize each expert's specific part with its own k-means codebook."""
    overrides = dict(bits=bits, dim=dim, iters=iters, backend=backend, seed=seed, device=device,
                     error_feedback=error_feedback, objective=objective, refine_iters=refine_iters)
    run_stage("vq", run=run, recipe=recipe, restart=restart,
              allow_thread_change=allow_thread_change, overrides=overrides)


@app.command()
def bcos(
    run: RunOption = None,
    recipe: RecipeOption = None,
    mode: Annotated[Optional[str], typer.Option("--mode", help="full, mean, var or none.")] = None,
    propagate: Annotated[Optional[bool], typer.Option("--propagate/--no-propagate", help="Use the quantized model's own inputs.")] = None,
    device: DeviceOption = None,
    restart: RestartOption = False,
    allow_thread_change: ThreadsOption = False,
) -> None:
    """BCOS: per-channel scale and shift restoring each expert's output mean and variance."""
    overrides = dict(mode=mode, propagate=propagate, device=device)
    run_stage("bcos", run=run, recipe=recipe, restart=restart,
              allow_thread_change=allow_thread_change, overrides=overrides)


@app.command()
def gptq(
    run: RunOption = None,
    recipe: RecipeOption = None,
    method: Annotated[Optional[str], typer.Option("--method", help="gptq (default) or rtn (round to nearest).")] = None,
    bits: Annotated[Optional[int], typer.Option("--bits", help="Bits per weight: 2, 3, 4 or 8 (default 2).")] = None,
    group_size: Annotated[Optional[int], typer.Option(
        "--group-size", help="Input columns per scale and zero (default 128; 0 = per output channel).")] = None,
    act_order: Annotated[Optional[bool], typer.Option(
        "--act-order/--no-act-order", help="GPTQ: quantize columns by descending Hessian diagonal.")] = None,
    damp: Annotated[Optional[float], typer.Option("--damp", help="Hessian damping, fraction of mean(diag H) (default 0.01).")] = None,
    device: DeviceOption = None,
    restart: RestartOption = False,
    allow_thread_change: ThreadsOption = False,
) -> None:
    """Baselines (Table 1): RTN or GPTQ scalar quantization of every expert matrix, from calibrate alone."""
    overrides = dict(method=method, bits=bits, group_size=group_size, act_order=act_order, damp=damp, device=device)
    run_stage("gptq", run=run, recipe=recipe, restart=restart,
              allow_thread_change=allow_thread_change, overrides=overrides)


@app.command()
def nonexpert(
    run: RunOption = None,
    recipe: RecipeOption = None,
    method: Annotated[Optional[str], typer.Option(
        "--method", help="none (default: keep them as in the checkpoint, as the paper does), rtn or gptq.")] = None,
    modules: Annotated[Optional[str], typer.Option(
        "--modules", help="Comma-separated module prefixes inside a layer (default self_attn; add mlp for dense MLPs).")] = None,
    bits: Annotated[Optional[int], typer.Option("--bits", help="Bits per weight: 2, 3, 4 (default) or 8.")] = None,
    group_size: Annotated[Optional[int], typer.Option("--group-size", help="Columns per scale/zero (default 128).")] = None,
    device: DeviceOption = None,
    restart: RestartOption = False,
    allow_thread_change: ThreadsOption = False,
) -> None:
    """Quantize (or, by default, keep) the linear layers outside the experts: attention, dense MLPs."""
    overrides = dict(method=method, modules=modules, bits=bits, group_size=group_size, device=device)
    run_stage("nonexpert", run=run, recipe=recipe, restart=restart,
              allow_thread_change=allow_thread_change, overrides=overrides)


@app.command()
def pack(
    run: RunOption = None,
    recipe: RecipeOption = None,
    out: Annotated[Optional[str], typer.Option("--out", help="Also copy the packed model to this directory.")] = None,
    dense: Annotated[bool, typer.Option("--dense", help="Export a plain dense checkpoint of the original "
                                        "architecture instead (default RUN/dense, or --out).")] = False,
    unquantized_dtype: Annotated[Optional[str], typer.Option(
        "--unquantized-dtype", help="original, float16 or bfloat16: how weights left unquantized are stored.")] = None,
    restart: RestartOption = False,
    allow_thread_change: ThreadsOption = False,
) -> None:
    """Write a compact, loadable quantized model directory (RUN/pack) and report its bits per weight."""
    with user_errors():
        from kbvq_cli.recipe import resolve_stage
        from kbvq_cli.run_lock import run_lock

        resolved = resolve_stage("pack", run=run, recipe_path=recipe, model=None,
                                 overrides=dict(unquantized_dtype=unquantized_dtype),
                                 allow_thread_change=allow_thread_change)
        with run_lock(resolved.run_dir):
            if dense:
                from stages.pack.dense import export_dense

                export_dense(resolved, out)
                return
            from stages.pack.stage import run as run_pack

            run_pack(resolved, restart=restart, out=out)


@app.command("eval")
def evaluate(
    run: RunOption = None,
    recipe: RecipeOption = None,
    model: Annotated[Optional[str], typer.Option(
        "--model", help="Evaluate this model directory (original or packed) instead of RUN/pack.")] = None,
    ppl_data: Annotated[Optional[str], typer.Option(
        "--ppl-data", help="Perplexity text: dataset id[:config][@split] or a local file (default WikiText-2 test); none skips.")] = None,
    text_field: Annotated[Optional[str], typer.Option("--text-field", help="Text column of --ppl-data.")] = None,
    seqlen: Annotated[Optional[int], typer.Option("--seqlen", help="Perplexity window (default 4096).")] = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="Score only the first N tokens.")] = None,
    tasks: Annotated[Optional[str], typer.Option(
        "--tasks", help="Comma-separated lm-eval tasks (default the paper's seven), or none.")] = None,
    task_dir: Annotated[Optional[str], typer.Option("--task-dir", help="Directory of extra lm-eval task YAMLs.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="At most N documents per task (quick checks).")] = None,
    num_fewshot: Annotated[Optional[int], typer.Option("--num-fewshot", help="Few-shot examples (paper: 0).")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="lm-eval batch size.")] = None,
    device: DeviceOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as one JSON object on the last line.")] = False,
    restart: RestartOption = False,
) -> None:
    """Perplexity (docs/method.md §6) and zero-shot accuracy (lm-eval) of RUN/pack or of --model DIR."""
    with user_errors():
        from pathlib import Path

        from kbvq_cli.distributed import rank_zero_alone
        from kbvq_cli.recipe import model_short_name, resolve_stage
        from kbvq_cli.run_lock import run_lock
        from stages.eval.stage import run as run_eval

        if not rank_zero_alone("eval"):
            return
        if run is None and recipe is None and model is None:
            raise KbvqError("`kbvq eval` needs --run RUN (its packed model) or --model DIR")
        if run is None and recipe is None:
            run = str(Path("runs") / f"eval-{model_short_name(model)}")
        overrides = dict(ppl_data=ppl_data, text_field=text_field, seqlen=seqlen, max_tokens=max_tokens, tasks=tasks,
                         task_dir=task_dir, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size, device=device)
        resolved = resolve_stage("eval", run=run, recipe_path=recipe, model=None, overrides=overrides)
        with run_lock(resolved.run_dir):  # eval writes RUN/eval/results.json
            run_eval(resolved, restart=restart, model_dir=model, as_json=as_json)


@app.command("run")
def run_all(
    recipe: RecipeOption = None,
    preset: Annotated[Optional[str], typer.Option("--preset", help="A preset instead of a recipe: kbvq-w2, kbvq-w3, "
                      "vq-w2, gptq-w2g128, rtn-w2, kbvq-w2-plus, kbvq-w3-plus (with --model).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="With --preset: hub id or model directory.")] = None,
    run: RunOption = None,
    data: Annotated[Optional[str], typer.Option("--data", help="With --preset: calibration data.")] = None,
    samples: Annotated[Optional[int], typer.Option("--samples", help="With --preset: calibration sequences.")] = None,
    seqlen: Annotated[Optional[int], typer.Option(
        "--seqlen", help="With --preset: tokens per calibration sequence and perplexity window.")] = None,
    ppl_data: Annotated[Optional[str], typer.Option("--ppl-data", help="With --preset: perplexity text.")] = None,
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="With --preset: zero-shot tasks, or none.")] = None,
    target_bits: Annotated[Optional[float], typer.Option("--target-bits", help="With a kbvq --preset: klt-svd's "
                           "ranks for at most this many bits per expert weight.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate the recipe and print the plan; run nothing.")] = False,
    allow_thread_change: ThreadsOption = False,
) -> None:
    """Run every stage of a recipe (or of a preset on --model; the packed model lands in RUN/pack) in order,
    resuming whatever is already done."""
    with user_errors():
        from kbvq_cli.pipeline import run_command

        run_command(recipe, preset, model, run, dict(data=data, samples=samples, seqlen=seqlen, ppl_data=ppl_data,
                    tasks=tasks, target_bits=target_bits), dry_run=dry_run, allow_thread_change=allow_thread_change)


@app.command()
def report(
    run: Annotated[str, typer.Option("--run", help="Run directory (calibrate and klt-svd finished).")],
    out: Annotated[Optional[str], typer.Option("--out", help="Output directory (default RUN/report).")] = None,
    layers: Annotated[Optional[str], typer.Option(
        "--layers", help="Comma-separated MoE layers to draw (default first, middle, last).")] = None,
    compare: Annotated[Optional[str], typer.Option(
        "--compare", help="A plain-VQ run of the same model, drawn beside this one in the drift figure.")] = None,
) -> None:
    """Figures and tables of a run (spectrum, expert similarity, channel drift, storage, expert load) in report.md."""
    # No run lock: report reads only finished, hash-checked stages and writes only RUN/report (atomic
    # renames), so it may run while another command writes the run (kbvq_cli/run_lock.py).
    with user_errors():
        from pathlib import Path

        from kbvq_cli.console import info
        from stages.report.build import write_report

        chosen = None
        if layers:
            try:
                chosen = [int(part) for part in layers.split(",") if part.strip()]
            except ValueError:
                raise KbvqError(f"--layers takes comma-separated layer numbers (got {layers!r})") from None
        path = write_report(Path(run), Path(out) if out else None, chosen, Path(compare) if compare else None)
        info(f"report: {path}")


@app.command()
def table(
    number: Annotated[str, typer.Argument(help="Paper table: 1, 2, 3, 4, 5, 7, 8, 14, 15, or plus.")],
    model: Annotated[str, typer.Option("--model", help="qwen15-moe, qwen3-30b-a3b, mixtral-8x7b, deepseek-v2-lite, "
                                       "testbed or testbed-mini.")] = "testbed-mini",
    run_missing: Annotated[bool, typer.Option("--run/--no-run", help="Run the recipes whose results are missing.")] = True,
    markdown: Annotated[Optional[str], typer.Option("--markdown", help="Also write the table as markdown here.")] = None,
    testbeds: Annotated[Optional[list[str]], typer.Option("--testbed", help="table plus: a test-bed directory "
                        "(repeatable; default testbed-mini).")] = None,
    seeds: Annotated[str, typer.Option("--seeds", help="table plus: k-means seeds.")] = "0,1,2",
    arms: Annotated[Optional[str], typer.Option("--arms", help="table plus: comma-separated arms.")] = None,
) -> None:
    """Rebuild a paper table: run its recipes (recipes/MODEL/*.yaml, resuming) and print ours beside the paper's.
    `kbvq table plus --testbed DIR ... --seeds 0,1,2`: the ablation of kbvq's own recipe (kbvq_cli/plus_ablation.py)."""
    with user_errors():
        from pathlib import Path

        from kbvq_cli.tables import print_plus_table, print_table, run_table

        if number == "plus":
            print_plus_table(testbeds or ["testbed-mini"], arms, seeds, run_missing, Path(markdown) if markdown else None)
            return
        measured = run_table(number, model, run_missing=run_missing)
        print_table(number, model, measured, Path(markdown) if markdown else None)


@app.command()
def testbed(
    out: Annotated[str, typer.Option("--out", help="Output directory.")] = "testbed",
    variant: Annotated[str, typer.Option("--variant", help="full (about half an hour on 2 cores), mini, upcycled (a dense "
                       "model's MLP copied into every expert, then trained as an MoE) or upcycled-mini.")] = "full",
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if up to date.")] = False,
    compare: Annotated[Optional[str], typer.Option(
        "--compare", help="A built test-bed whose perplexities and redundancy to record beside this one's.")] = None,
) -> None:
    """Build the small trained MoE test-bed model and its text splits, offline from package registries."""
    with user_errors():
        from pathlib import Path

        from kbvq_cli.testbed.build import build_testbed

        build_testbed(Path(out), variant=variant, force=force, compare=Path(compare) if compare else None)


def main() -> None:
    """The `kbvq` entry point. click's usage errors (a mistyped value, an unknown option, a missing
    argument) become one line, `error: ...`, exit status 2, like every other error of kbvq, instead of
    click's three-line usage block; `--help` and every other exit stay as click makes them."""
    import shlex
    import sys

    from kbvq_cli import run_lock

    run_lock.COMMAND_LINE = shlex.join(["kbvq", *sys.argv[1:]])  # what a second writer of the run is told
    # typer >= 0.2x runs on its own copy of click (typer._click), older typer on click itself: take the
    # class from typer's public BadParameter, whichever click that is.
    usage_error = next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "UsageError")
    try:
        status = app(standalone_mode=False)
    except usage_error as error:
        if type(error).__name__ == "NoArgsIsHelpError":  # plain `kbvq`: the help page, as before
            error.show()
            sys.exit(error.exit_code)
        print_error(usage_message(error))
        sys.exit(2)
    except typer.Abort:  # EOF while click itself was reading input
        typer.echo("Aborted!", err=True)
        sys.exit(1)
    sys.exit(status if isinstance(status, int) else 0)  # typer.Exit(n) comes back as n


if __name__ == "__main__":
    main()
