"""`kbvq report`: every figure is written, and the numbers in report.md equal those in the run's shards."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from cli_util import invoke
from kbvq_cli.errors import KbvqError
from kbvq_cli.stage_dir import StageDir
from kbvq_cli.units import layer_unit
from stages.bcos.core import input_moments
from kbvq_cli.packed.storage import projection_bits
from stages.report.build import choose_layers, default_layers, write_report
from stages.report.core import output_similarity, pooled_channel_stats

STARVED_BELOW = 100
FIGURES = ("spectrum_layer_000.png", "spectrum_layer_001.png", "similarity_layer_000.png",
           "similarity_layer_001.png", "drift_layer_000.png", "drift_layer_001.png", "storage.png", "expert_load.png")


@pytest.fixture(scope="module")
def runs(tiny_model_dir, calib_text, tmp_path_factory):
    """A KBVQ run and a plain-VQ run (same calibration) of a tiny Qwen1.5-MoE model, and their report."""
    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KBVQ_CACHE", str(root / "kbvq-cache"))
        model, run, plain = tiny_model_dir("qwen2_moe"), root / "kbvq", root / "plain"
        recipe = root / "recipe.yaml"  # a high threshold, so that some experts are starved and highlighted
        recipe.write_text(f"calibrate: {{min_expert_tokens: {STARVED_BELOW}}}\n")
        invoke("calibrate", "--model", model, "--data", calib_text, "--samples", 16, "--seqlen", 64, "--run", run,
               "--recipe", recipe)
        copy_stages(run, plain, ("calibrate",))
        invoke("klt-svd", "--run", run, "--rank", 2)
        invoke("vq", "--run", run, "--bits", 2, "--iters", 5)
        invoke("bcos", "--run", run)
        invoke("klt-svd", "--run", plain, "--rank", 0)
        invoke("vq", "--run", plain, "--bits", 2, "--iters", 5)
        invoke("bcos", "--run", plain, "--mode", "none")
        report = write_report(run, root / "out", compare_run=plain)
    return {"run": run, "plain": plain, "root": root, "report": report, "text": report.read_text()}


def copy_stages(source, target, stages) -> None:
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "recipe.yaml", target / "recipe.yaml")
    for stage in stages:
        shutil.copytree(source / stage, target / stage)


def table(text: str, header_start: str) -> list[list[str]]:
    """The body rows (cells stripped) of the markdown table whose header line starts with `header_start`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def section(text: str, number: int) -> str:
    start = text.index(f"## {number}.")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_every_figure_is_written_and_linked(runs):
    out = runs["report"].parent
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
        assert f"]({name})" in runs["text"], name
    assert "plain VQ" in section(runs["text"], 3)
    assert "Skipped" not in runs["text"].split("## 1.")[1]


def test_spectrum_numbers_equal_the_klt_svd_shards(runs):
    klt = StageDir.open_finished(runs["run"], "klt-svd")
    rows = {row[0]: row for row in table(runs["text"], "| layer | gate k")}
    for index in (0, 1):
        parts, tensors = klt.read_metadata(layer_unit(index))["parts"], klt.read_unit(layer_unit(index))
        row = rows[str(index)]
        for column, part in enumerate(("gate", "up", "down", "shared.down")):
            rank, rho_k = int(row[1 + 2 * column]), float(row[2 + 2 * column])
            assert rank == parts[part]["rank"] == 2
            assert row[2 + 2 * column] == f"{parts[part]['rho_k']:.6f}"
            assert rho_k == pytest.approx(float(tensors[f"{part}.rho"][rank - 1]), abs=2e-6)


def test_load_numbers_equal_the_calibration_shards(runs):
    calibrate = StageDir.open_finished(runs["run"], "calibrate")
    minimum = calibrate.manifest["config"]["min_expert_tokens"]
    summary = {row[0]: row for row in table(runs["text"], "| layer | assignments")}
    per_expert = table(runs["text"], "| expert | layer 0")
    assert minimum == STARVED_BELOW and calibrate.manifest["state"]["starved"], "the test needs starved experts"
    for column, index in enumerate((0, 1)):
        load = calibrate.read_unit(layer_unit(index))["router.load"].tolist()
        starved = [e for e, count in enumerate(load) if count < minimum]
        assert summary[str(index)][1:4] == [str(sum(load)), str(min(load)), str(max(load))]
        assert summary[str(index)][4] == (", ".join(map(str, starved)) or "none")
        assert [int(row[1 + column].strip("*")) for row in per_expert] == load
        assert [int(row[0]) for row in per_expert if row[1 + column].startswith("**")] == starved
        assert starved == calibrate.manifest["state"]["starved"].get(str(index), [])
        for expert in starved:  # named with its routed count beside the fallback that replaced its statistics
            assert f"expert {expert} ({load[expert]} tokens)" in runs["text"]
    assert "(starved_fallback all-tokens)" in runs["text"]
    csv = (runs["report"].parent / "expert_load.csv").read_text().splitlines()
    assert len(csv) == 1 + 2 * len(per_expert)


def expected_storage(run, model_dir) -> dict:
    """Bytes per part and bits, recomputed here from the shards' tensors and the model's weights."""
    from safetensors.torch import load_file

    vq, klt, bcos = (StageDir.open_finished(run, stage) for stage in ("vq", "klt-svd", "bcos"))
    bits, dim = vq.manifest["config"]["bits"], vq.manifest["config"]["dim"]
    klt_tensors = [klt.read_unit(name) for name in klt.unit_names()]
    vq_tensors = [vq.read_unit(name) for name in vq.unit_names()]
    parts = {
        "shared basis": sum(2 * t.numel() for ts in klt_tensors for k, t in ts.items() if k.endswith(".shared_basis")),
        "expert coefficients": sum(2 * t.numel() for ts in klt_tensors for k, t in ts.items() if "coeffs" in k),
        "VQ indices": sum(math.ceil(t.numel() * bits * dim / 8) for ts in vq_tensors
                          for k, t in ts.items() if k.endswith("indices")),
        "codebooks": sum(2 * t.numel() for ts in vq_tensors for k, t in ts.items() if k.endswith("codebook")),
        "BCOS scale/shift": sum(2 * t.numel() for name in bcos.unit_names() for t in bcos.read_unit(name).values()),
    }
    expert_weights = sum(t.numel() * dim for ts in vq_tensors for k, t in ts.items() if k.endswith("indices"))
    model_weights = sum(t.numel() for f in model_dir.glob("*.safetensors") for t in load_file(str(f)).values())
    parts["unquantized layers"] = 2 * (model_weights - expert_weights)
    return {"parts": parts, "expert_weights": expert_weights, "model_weights": model_weights, "bits": bits,
            "dim": dim, "klt": klt}


def test_storage_numbers_equal_the_shards(runs, tiny_model_dir):
    expected = expected_storage(runs["run"], tiny_model_dir("qwen2_moe"))
    rows = {row[0].split(" (")[0]: row for row in table(runs["text"], "| part | bytes")}
    for label, size in expected["parts"].items():
        assert int(rows[label][1]) == size, label
    quantized = sum(expected["parts"].values()) - expected["parts"]["unquantized layers"]
    per_expert = 8 * quantized / expected["expert_weights"]
    whole = 8 * sum(expected["parts"].values()) / expected["model_weights"]
    assert rows["**expert weights"][2] == f"{per_expert:.4f}"
    assert rows["**whole model**"][1] == str(sum(expected["parts"].values()))
    assert rows["**whole model**"][3] == f"{whole:.4f}"
    text = section(runs["text"], 4)
    assert f"model parameters: {expected['model_weights']}" in text
    formula_bits = formula_weights = 0
    for name in expected["klt"].unit_names():
        parts = expected["klt"].read_metadata(name)["parts"]
        for projection, (oc, ic) in (("gate", (32, 64)), ("up", (32, 64)), ("down", (64, 32))):
            counted = projection_bits(8, oc, ic, parts[projection]["rank"], expected["bits"], expected["dim"])
            formula_bits, formula_weights = formula_bits + counted.total, formula_weights + counted.weights
    assert f"§5 formula: {formula_bits / formula_weights:.4f}, over the routed experts" in text
    assert f"routed experts alone: {formula_bits / formula_weights:.4f}" in text  # measured == formula


def test_drift_rows_show_bcos_removing_the_drift(runs):
    rows = table(runs["text"], "| layer | variant")
    by_variant = {(row[0], row[1]): [float(v) for v in row[2:]] for row in rows}
    assert {variant for _, variant in by_variant} == {"plain VQ", "KBVQ before BCOS", "KBVQ + BCOS"}
    for index in ("0", "1"):
        before, after = by_variant[(index, "KBVQ before BCOS")], by_variant[(index, "KBVQ + BCOS")]
        assert after[1] < 0.1 * before[1] and after[2] < 0.1 * before[2]


def test_similarity_equals_a_token_level_computation():
    torch.manual_seed(0)
    tokens, weights = torch.randn(500, 12, dtype=torch.float64) + 0.3, torch.randn(5, 7, 12, dtype=torch.float64)
    weights[1] = 0.9 * weights[0] + 0.1 * weights[1]
    outputs = torch.einsum("ti,eoi->eto", tokens, weights).flatten(1)  # [E, T * oc]
    unit = outputs / outputs.norm(dim=1, keepdim=True)
    similarity = output_similarity(weights, tokens.T @ tokens / (len(tokens) - 1))
    torch.testing.assert_close(similarity, unit @ unit.T, rtol=0, atol=1e-10)
    assert similarity[0, 1] > 0.9


def test_pooled_channel_stats_equal_the_pooled_tokens():
    torch.manual_seed(1)
    weights = [torch.randn(6, 10, dtype=torch.float64) for _ in range(3)]
    inputs = [torch.randn(n, 10, dtype=torch.float64) * 2 + e for e, n in enumerate((40, 0, 90))]
    corrections = [(torch.randn(6, dtype=torch.float64) * 0.1, torch.randn(6, dtype=torch.float64)) for _ in range(3)]
    moments = [input_moments(x.sum(0), x.T @ x, len(x)) for x in inputs]
    stats = pooled_channel_stats(weights, moments, corrections)
    outputs = torch.cat([(1 + s) * (x @ w.T) + b for w, x, (s, b) in zip(weights, inputs, corrections)])
    torch.testing.assert_close(stats.mean, outputs.mean(0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stats.variance, outputs.var(0, unbiased=False), rtol=1e-10, atol=1e-10)


def test_missing_stages_are_named(runs, tmp_path):
    only_calibrate = tmp_path / "calibrated"
    copy_stages(runs["run"], only_calibrate, ("calibrate",))
    with pytest.raises(KbvqError, match="kbvq klt-svd --run"):
        write_report(only_calibrate)
    with pytest.raises(KbvqError, match="does not exist"):
        write_report(tmp_path / "nowhere")
    decomposed = tmp_path / "decomposed"
    copy_stages(runs["run"], decomposed, ("calibrate", "klt-svd"))
    text = write_report(decomposed, layers=[1]).read_text()
    assert (decomposed / "report" / "spectrum_layer_001.png").exists()
    assert not (decomposed / "report" / "drift_layer_001.png").exists()
    assert "Skipped: stage vq has not been run" in section(text, 3)
    assert "Skipped: stage vq has not been run" in section(text, 4)
    manifest = json.loads((decomposed / "klt-svd" / "manifest.json").read_text())
    (decomposed / "klt-svd" / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(KbvqError, match="unfinished; rerun `kbvq klt-svd"):
        write_report(decomposed)


def test_without_bcos_the_uncorrected_curves_are_drawn(runs, tmp_path):
    quantized = tmp_path / "quantized"
    copy_stages(runs["run"], quantized, ("calibrate", "klt-svd", "vq"))
    text = write_report(quantized, layers=[0]).read_text()
    assert (quantized / "report" / "drift_layer_000.png").exists()
    assert "Skipped: stage bcos has not been run" in section(text, 3)
    assert {row[1] for row in table(text, "| layer | variant")} == {"KBVQ before BCOS"}
    rows = {row[0].split(" (")[0]: row for row in table(text, "| part | bytes")}
    assert rows["BCOS scale/shift"][1] == "0"


def test_pack_storage_is_used_when_pack_recorded_it(runs, tmp_path):
    packed = tmp_path / "packed"
    copy_stages(runs["run"], packed, ("calibrate", "klt-svd", "vq", "bcos"))
    storage = {"parts": {"shared_basis": 11, "expert_coeffs": 22, "indices": 33, "codebooks": 44, "scale_shift": 55,
                         "unquantized": 66, "group_scales": 0},
               "expert_weights": 1000, "model_weights": 2000, "bytes_on_disk": 777, "original_bytes": 4000, "bits_per_expert_weight": 1.5, "bits_per_weight": 0.924,
               "formula_bits_per_expert_weight": 1.25}
    (packed / "pack").mkdir()
    manifest = {"stage": "pack", "config_hash": "x", "inputs_hash": "y", "units": {}, "complete": True,
                "summary": {"storage": storage}}
    (packed / "pack" / "manifest.json").write_text(json.dumps(manifest))
    text = section(write_report(packed, tmp_path / "out", layers=[0]).read_text(), 4)
    rows = {row[0].split(" (")[0]: row for row in table(text, "| part | bytes")}
    assert [int(rows[label][1]) for label in ("shared basis", "expert coefficients", "VQ indices", "codebooks",
                                              "BCOS scale/shift", "unquantized layers")] == [11, 22, 33, 44, 55, 66]
    assert "group scales" not in text  # pack's RTN/GPTQ part, empty for a KBVQ run
    assert "777 bytes on disk" in text and "§5 formula: 1.2500" in text and "1.5000 measured" in text


def test_layers_are_checked(runs, tmp_path):
    assert default_layers(list(range(10))) == [0, 5, 9]
    assert default_layers([3]) == [3]
    assert choose_layers([0, 1], None) == [0, 1]
    with pytest.raises(KbvqError, match="choose MoE layers"):
        write_report(runs["run"], tmp_path / "out", layers=[7])


def test_compare_run_of_another_model_is_refused(runs, tmp_path):
    other = tmp_path / "other"
    copy_stages(runs["plain"], other, ("calibrate", "klt-svd", "vq"))
    manifest = json.loads((other / "klt-svd" / "manifest.json").read_text())
    manifest["inputs"]["model"] = {"files": {"model.safetensors": "0" * 64}}
    (other / "klt-svd" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(KbvqError, match="other model files"):
        write_report(runs["run"], tmp_path / "out", layers=[0], compare_run=other)


def test_cli_report_after_a_real_pack(runs, tmp_path):
    """`kbvq report` through the CLI on a run packed by `kbvq pack`: the storage section shows pack's bytes."""
    packed = tmp_path / "packed"
    copy_stages(runs["run"], packed, ("calibrate", "klt-svd", "vq", "bcos"))
    invoke("pack", "--run", packed)
    invoke("report", "--run", packed, "--layers", "0,1", "--out", tmp_path / "out")
    storage = json.loads((packed / "pack" / "manifest.json").read_text())["summary"]["storage"]
    text = section((tmp_path / "out" / "report.md").read_text(), 4)
    rows = {row[0].split(" (")[0]: row for row in table(text, "| part | bytes")}
    assert int(rows["VQ indices"][1]) == storage["parts"]["indices"]
    assert int(rows["codebooks"][1]) == storage["parts"]["codebooks"]
    assert f"{storage['bytes_on_disk']} bytes on disk" in text
    assert "--layers takes" in invoke("report", "--run", packed, "--layers", "x", code=2).output
