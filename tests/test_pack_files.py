"""A pack as a transformers checkpoint: `import kbvq_cli` then `from_pretrained` loads it; every file is in
its manifest and verified on load (an edited config is refused in one line); every message names a command
that exists and, run, repairs the pack; the model card says what the pack is and gains eval results."""

import json
import re
import shlex
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from kbvq_cli.app import app
from kbvq_cli.errors import KbvqError
from kbvq_cli.hashing import sha256_file

runner = CliRunner()


def invoke(*args, code=0):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


@pytest.fixture(scope="module")
def packed_run(tiny_model_dir, calib_text, tmp_path_factory):
    """A finished kbvq run of a tiny Qwen2-MoE (copied per test that changes it)."""
    run = tmp_path_factory.mktemp("packed") / "run"
    invoke("calibrate", "--model", tiny_model_dir("qwen2_moe"), "--data", calib_text, "--samples", 8,
           "--seqlen", 64, "--run", run)
    for stage, *options in (("klt-svd", "--rank", 2), ("vq", "--iters", 3), ("bcos",), ("pack",)):
        invoke(stage, "--run", run, *options)
    return run


@pytest.fixture
def run(packed_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(packed_run, copy)
    # The recipe names the calibration data and model by absolute path, so the copy is a working run.
    return copy


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([[3, 1, 4, 1, 5, 9]])).logits


def from_pretrained(path):
    import kbvq_cli  # noqa: F401
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def named_command(message: str) -> list[str]:
    """The `kbvq ...` command a message names, as arguments."""
    found = re.search(r"`kbvq ([^`]+)`", message)
    assert found, message
    return shlex.split(found.group(1))


def test_import_kbvq_cli_is_enough_for_from_pretrained(packed_run):
    """In a fresh interpreter: importing kbvq_cli loads neither torch nor transformers, and then the
    standard transformers call returns the original class with kbvq's expert modules."""
    code = (
        "import sys, kbvq_cli\n"
        "print('HEAVY', [m for m in ('torch', 'transformers') if m in sys.modules])\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(packed_run / 'pack')!r}, dtype='auto')\n"
        "print(type(model).__name__, type(model.model.layers[0].mlp.experts).__module__,\n"
        "      model.config.quantization_config.quant_method)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY []" in out
    assert "Qwen2MoeForCausalLM kbvq_cli.packed.modules kbvq" in out


def test_every_file_is_in_the_manifest_and_the_index_names_every_tensor(packed_run):
    from kbvq_cli.packed.integrity import recorded_files
    from kbvq_cli.packed.side_files import INDEX
    from kbvq_cli.stage_dir import StageDir, read_manifest

    pack = packed_run / "pack"
    recorded = recorded_files(StageDir(pack, read_manifest(pack)))
    on_disk = {p.name for p in pack.iterdir()} - {"manifest.json"}
    assert on_disk == set(recorded)
    assert {"config.json", "generation_config.json", "tokenizer.json", INDEX, "README.md"} <= on_disk
    assert all(sha256_file(pack / name) == record["sha256"] for name, record in recorded.items())
    index = json.loads((pack / INDEX).read_text())
    from safetensors import safe_open

    for shard in pack.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            assert all(index["weight_map"][name] == shard.name for name in handle.keys())


def test_the_model_card_says_what_the_pack_is(packed_run):
    pack = packed_run / "pack"
    card, config = (pack / "README.md").read_text(), json.loads((pack / "config.json").read_text())
    storage = json.loads((pack / "manifest.json").read_text())["summary"]["storage"]
    assert "Qwen2MoeForCausalLM" in card and "KBVQ-MoE" in card and "2 bits" in card
    assert f"{storage['bits_per_expert_weight']:.4f}" in card
    assert json.dumps(config["quantization_config"], indent=2, sort_keys=True) in card
    assert "import kbvq_cli, transformers" in card
    assert f'from_pretrained("{pack}"' in card
    assert "Not evaluated yet" in card


def test_an_edited_config_is_refused_and_the_named_command_restores_it(run):
    config_path = run / "pack" / "config.json"
    config = json.loads(config_path.read_text())
    config["rms_norm_eps"] = 1e-3
    config_path.write_text(json.dumps(config))
    with pytest.raises(KbvqError) as refused:
        from_pretrained(run / "pack")
    message = str(refused.value)
    assert "\n" not in message and "config.json" in message and "edited" in message
    assert named_command(message) == ["pack", "--run", str(run)]
    invoke(*named_command(message))
    assert json.loads(config_path.read_text())["rms_norm_eps"] != 1e-3
    assert logits(from_pretrained(run / "pack")).isfinite().all()


def test_eval_cli_refuses_an_edited_pack_in_one_line(run, calib_text):
    (run / "pack" / "tokenizer_config.json").write_text("{}")
    result = invoke("eval", "--run", run, "--ppl-data", calib_text, "--seqlen", 32, "--max-tokens", 64,
                    "--tasks", "none", code=2)
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "tokenizer_config.json" in errors[0], result.output


def test_a_copy_names_the_command_that_rewrites_it(run, tmp_path):
    """`kbvq pack --out DIR` copies; a corrupt shard in the copy names `kbvq pack --run RUN --out DIR`
    (never a command made from the directory's name), and that command repairs it."""
    from kbvq_cli.units import layer_unit

    out = tmp_path / "packload_truncate"
    invoke("pack", "--run", run, "--out", out)
    assert str(out) in (out / "README.md").read_text()
    expected = logits(from_pretrained(out))
    shard = out / f"{layer_unit(1)}.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(KbvqError) as refused:
        from_pretrained(out)
    message = str(refused.value)
    assert shard.name in message and "kbvq packload_truncate" not in message
    command = named_command(message)
    assert command == ["pack", "--run", str(run.resolve()), "--out", str(out)]
    invoke(*command)
    assert torch.equal(logits(from_pretrained(out)), expected)


def test_a_hand_copied_pack_and_a_stray_file(run, tmp_path):
    """A pack copied by hand under another name: its messages still name `kbvq pack`, with the run to fill
    in; a file the manifest does not name (here a model.safetensors transformers would load instead of the
    index) is refused."""
    copy = tmp_path / "packload_truncate"
    shutil.copytree(run / "pack", copy)
    (copy / "model.safetensors").write_bytes((copy / "model_rest.safetensors").read_bytes())
    with pytest.raises(KbvqError, match="model.safetensors in .* is not part of the pack") as refused:
        from_pretrained(copy)
    assert named_command(str(refused.value)) == ["pack", "--run", "RUN", "--out", str(copy)]
    assert "RUN: the run directory that made it" in str(refused.value)
    (copy / "model.safetensors").unlink()
    (copy / "README.md").write_text("edited")
    with pytest.raises(KbvqError, match="README.md in .* is corrupt or was edited"):
        from_pretrained(copy)


def test_eval_adds_its_results_to_the_model_card(run, calib_text):
    result = invoke("eval", "--run", run, "--ppl-data", calib_text, "--seqlen", 32, "--max-tokens", 200,
                    "--tasks", "none", "--json")
    measured = json.loads(result.output.strip().splitlines()[-1])
    card = (run / "pack" / "README.md").read_text()
    assert f"| perplexity ({calib_text}, seqlen 32) | {measured['ppl']:.4f} |" in card
    assert logits(from_pretrained(run / "pack")).isfinite().all()  # the manifest records the new card
    invoke("pack", "--run", run)  # a repack keeps the results on the card
    assert f"{measured['ppl']:.4f}" in (run / "pack" / "README.md").read_text()
