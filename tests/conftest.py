"""Session fixtures: tiny random models of every architecture, and calibration text, built offline."""

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
