"""Session fixtures: tiny random models of every architecture and calibration text, built offline; the
built mini test-bed, where there is one."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny_models import CONFIGS, build_tiny_model, write_text  # noqa: E402

ARCHITECTURES = tuple(CONFIGS)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KBVQ_CACHE", str(tmp_path_factory.getbasetemp() / "kbvq-cache"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A function returning the directory of a tiny model of the given architecture (built once)."""
    built: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in built:
            built[model_type] = build_tiny_model(model_type, tmp_path_factory.mktemp(model_type))
        return built[model_type]

    return get


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory) -> Path:
    return write_text(tmp_path_factory.mktemp("data") / "calib.txt", n_sentences=800, seed=1)


@pytest.fixture(scope="session")
def testbed_mini() -> Path:
    """The repository's built mini test-bed. Building it takes about two minutes (`make testbed-mini`), so
    outside CI a test that needs it is skipped when it is absent; CI builds it first and fails without it."""
    directory = REPO / "testbed-mini"
    if not (directory / "testbed.json").exists() and os.environ.get("CI") != "true":
        pytest.skip("build the mini test-bed first: make testbed-mini")
    return directory


@pytest.fixture(scope="session")
def testbed_mini_short(testbed_mini, tmp_path_factory) -> Path:
    """The mini test-bed with its test split cut to its first tenth: the same model and calibration text,
    for the tests that run whole recipes and check how results flow, not the perplexity itself (scoring
    the whole split is about 6 s a recipe). Everything but `test.txt` is a link to the built test-bed."""
    directory = tmp_path_factory.mktemp("testbed-short") / "testbed-mini"
    directory.mkdir()
    for path in testbed_mini.iterdir():
        if path.name != "test.txt":
            (directory / path.name).symlink_to(path)
    lines = (testbed_mini / "test.txt").read_text().splitlines(keepends=True)
    (directory / "test.txt").write_text("".join(lines[: max(1, len(lines) // 10)]))
    return directory
