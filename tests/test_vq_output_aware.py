"""Output-aware VQ (stages/vq/output_aware.py) against float64 references on small tensors, and in the stage."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from kbvq_cli.errors import KbvqError
from kbvq_cli.settings import parse_settings
from stages.vq.backends import make_backend
from stages.vq.config import VqSettings
from stages.vq.core import vq_quantize
from stages.vq.output_aware import (damped, group_metrics, least_squares_codebook, metric_assign, metric_update,
                                    normal_equations, output_aware_codes, output_error_of, weighted_kmeans)

DIM, K = 2, 8


def _problem(seed=0, oc=12, ic=8, correlated=True):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(oc, ic, generator=g, dtype=torch.float64)
    mix = torch.randn(ic, ic, generator=g, dtype=torch.float64) if correlated else torch.eye(ic, dtype=torch.float64)
    x = torch.randn(200, ic, generator=g, dtype=torch.float64) @ mix
    second = x.T @ x / 200
    codebook = torch.randn(K, DIM, generator=g, dtype=torch.float64)
    return weight, second, codebook


def _selection(indices, k, dim):
    """S_o [ic, K d] per row: S_o[g d + j, a d + j] = 1 where indices[o, g] = a (the float64 reference)."""
    oc, groups = indices.shape
    s = np.zeros((oc, groups * dim, k * dim))
    for o in range(oc):
        for g in range(groups):
            for j in range(dim):
                s[o, g * dim + j, int(indices[o, g]) * dim + j] = 1
    return s


def test_group_metrics_are_the_diagonal_blocks():
    _, second, _ = _problem()
    blocks = group_metrics(second, DIM)
    for g in range(4):
        assert torch.equal(blocks[g], second[g * DIM:(g + 1) * DIM, g * DIM:(g + 1) * DIM])
    assert torch.allclose(damped(second, 0.1).diagonal() - second.diagonal(),
                          torch.full((8,), 0.1 * float(second.diagonal().mean()), dtype=torch.float64))


def test_metric_assign_is_the_nearest_codeword_in_each_group_s_metric():
    weight, second, codebook = _problem(1)
    metrics = group_metrics(second, DIM)
    found = metric_assign(weight, codebook, metrics, chunk=3)
    w, c, m = weight.numpy(), codebook.numpy(), metrics.numpy()
    for o in range(12):
        for g in range(4):
            diff = w[o, g * DIM:(g + 1) * DIM][None] - c
            assert found[o, g] == np.argmin(np.einsum("ck,kl,cl->c", diff, m[g], diff))


def test_metric_update_is_the_exact_minimiser_and_weighted_kmeans_never_gets_worse():
    weight, second, codebook = _problem(2)
    metrics = group_metrics(second, DIM)
    indices = metric_assign(weight, codebook, metrics)
    updated = metric_update(weight, codebook, indices, metrics).numpy()
    w, m = weight.numpy().reshape(12, 4, DIM), metrics.numpy()
    for a in range(K):
        members = [(o, g) for o in range(12) for g in range(4) if indices[o, g] == a]
        if not members:
            assert np.array_equal(updated[a], codebook[a].numpy())
            continue
        lhs = sum(m[g] for _, g in members)
        rhs = sum(m[g] @ w[o, g] for o, g in members)
        assert np.allclose(updated[a], np.linalg.solve(lhs, rhs), rtol=1e-10, atol=1e-12)

    def block_error(cb, idx):
        diff = w - cb.numpy()[idx.numpy()]
        return np.einsum("ogk,gkl,ogl->", diff, m, diff)

    start = block_error(codebook, indices)
    fitted, fitted_indices = weighted_kmeans(weight, codebook, metrics, iters=20)
    assert block_error(fitted, fitted_indices) < start


def test_normal_equations_are_those_of_the_selection_matrices():
    weight, second, codebook = _problem(3)
    indices = metric_assign(weight, codebook, group_metrics(second, DIM))
    m, r = normal_equations(weight, indices, second, K)
    s, c, w = _selection(indices, K, DIM), second.numpy(), weight.numpy()
    assert np.allclose(m.numpy(), sum(s[o].T @ c @ s[o] for o in range(12)), rtol=1e-12, atol=1e-12)
    assert np.allclose(r.numpy(), sum(s[o].T @ c @ w[o] for o in range(12)), rtol=1e-12, atol=1e-12)


def test_least_squares_codebook_minimises_the_output_error_for_fixed_codes():
    weight, second, codebook = _problem(4)
    c = damped(second, 0.01)
    indices = metric_assign(weight, codebook, group_metrics(c, DIM))
    indices[indices == 5] = 6  # codeword 5 unused: it must keep its value
    refined = least_squares_codebook(weight, codebook, indices, c)
    assert torch.equal(refined[5], codebook[5])
    best = output_error_of(weight, refined, indices, c)
    assert best < output_error_of(weight, codebook, indices, c)
    g = torch.Generator().manual_seed(9)
    for _ in range(5):  # any nudge of the used codewords costs more
        nudged = refined + 1e-3 * torch.randn(K, DIM, generator=g, dtype=torch.float64)
        assert output_error_of(weight, nudged, indices, c) > best


def _settings(**changes):
    return replace(VqSettings(bits=2, dim=DIM, iters=30), **changes)


@pytest.mark.parametrize("changes", [dict(objective="output"), dict(refine_iters=3),
                                     dict(objective="output", refine_iters=3),
                                     dict(objective="output", refine_iters=3, error_feedback=True)])
def test_output_aware_codes_lower_the_output_error_of_k_means_and_repeat_exactly(changes):
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(32, 16, generator=g)
    x = torch.randn(400, 16, generator=g) @ torch.randn(16, 16, generator=g)
    second = x.T @ x / 400
    settings = _settings(**changes)
    plain = vq_quantize(weight, 2, DIM, 30, 42, make_backend("faiss"))
    c = damped(second, settings.damp)
    before = output_error_of(weight, plain.codebook.half(), plain.indices, c)
    codebook, indices = output_aware_codes(weight, plain.codebook.half(), plain.indices, second, settings)
    assert codebook.dtype == torch.float16 and indices.shape == (32, 8)
    assert output_error_of(weight, codebook, indices, c) < before
    again = output_aware_codes(weight, plain.codebook.half(), plain.indices, second, settings)
    assert torch.equal(again[0], codebook) and torch.equal(again[1], indices)


def test_settings_default_to_the_paper_and_refinement_is_bounded():
    assert VqSettings().objective == "weight" and VqSettings().refine_iters == 0
    with pytest.raises(KbvqError, match="refine_iters needs at most 4096"):
        parse_settings(VqSettings, {"bits": 3, "refine_iters": 1}, "vq")
    with pytest.raises(KbvqError, match="objective must be one of weight, output"):
        parse_settings(VqSettings, {"objective": "outputs"}, "vq")


def test_the_stage_s_output_aware_options_lower_its_output_error_and_old_runs_stay_valid(
        tiny_model_dir, calib_text, tmp_path):
    import json

    from cli_util import invoke, run_cli
    from kbvq_cli.hashing import hash_json
    from kbvq_cli.stage_dir import StageDir

    errors = {}
    for name, flags in (("plain", ()), ("output", ("--objective", "output", "--refine-iters", 2))):
        run = tmp_path / name
        invoke("calibrate", "--model", tiny_model_dir("qwen3_moe"), "--data", calib_text, "--samples", 8,
               "--seqlen", 64, "--run", run)
        invoke("klt-svd", "--rank", 0, "--run", run)
        invoke("vq", "--iters", 5, *flags, "--run", run)
        errors[name] = StageDir.open_finished(run, "vq").manifest["summary"]["mean_relative_output_error"]
    assert errors["output"] < errors["plain"]
    # a vq made before these settings existed (its config without them) is still complete at their defaults
    path = tmp_path / "plain" / "vq" / "manifest.json"
    manifest = json.loads(path.read_text())
    for key in ("objective", "refine_iters"):
        del manifest["config"][key]
    manifest["config_hash"] = hash_json(manifest["config"])
    path.write_text(json.dumps(manifest))
    assert "already complete" in invoke("vq", "--iters", 5, "--run", tmp_path / "plain").output
    result = run_cli("vq", "--iters", 5, "--objective", "output", "--run", tmp_path / "plain")
    assert result.exit_code == 2 and "objective" in result.output
