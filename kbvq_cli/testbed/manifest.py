"""The test-bed manifest (`testbed.json`): what was built from what, and the key that says "up to date".

The build key hashes everything that decides the output's bytes and is known before building: the
whole variant record, the torch thread count, the source of the modules that turn corpus into weights, and the versions of
torch, transformers and tokenizers. A directory is up to date when its manifest has the same key and
every file it lists still has the recorded sha256. The corpus archives are not in the key (they are
pinned or cached, and checking them would mean downloading them); their versions and hashes are
recorded for the reader.
"""

from __future__ import annotations

import json
import platform
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from kbvq_cli.hashing import hash_json, sha256_bytes, sha256_file
from kbvq_cli.testbed.model import Variant
from kbvq_cli.testbed.train import training_autocast

MANIFEST_NAME = "testbed.json"
FORMAT_VERSION = 1
# The modules whose code shapes the corpus, tokenizer and weights; edits to build or manifest code
# (which only move bytes around or describe them) do not force a rebuild.
WEIGHT_MODULES = ("clean.py", "corpus.py", "sources.py", "tokenizer.py", "model.py", "train.py")
LIBRARIES = ("torch", "transformers", "tokenizers")


def code_sha256(extra: tuple[str, ...] = ()) -> str:
    """sha256 over the source of WEIGHT_MODULES and then `extra` (a variant's own modules), in that order.
    Modules only some variants use are hashed into those variants' keys alone, so adding one does not
    force the others to rebuild."""
    package = resources.files("kbvq_cli.testbed")  # the same bytes in a wheel as in the source tree
    return sha256_bytes(b"".join(package.joinpath(name).read_bytes() for name in (*WEIGHT_MODULES, *extra)))


def library_versions() -> dict[str, str]:
    return {name: metadata.version(name) for name in LIBRARIES}


def build_key(variant, threads: int) -> str:
    """Hash of everything known up front that decides the output bytes (see the module docstring)."""
    return hash_json({
        "format": FORMAT_VERSION,
        "variant": variant.to_json(),
        "threads": threads,
        "autocast": training_autocast(),  # decided by the CPU, not the variant
        "code": code_sha256(getattr(variant, "code_modules", ())),
        "libraries": library_versions(),
    })


def file_hashes(directory: Path) -> dict[str, str]:
    """{file name: sha256} of every file directly in `directory` except the manifest."""
    return {path.name: sha256_file(path) for path in sorted(directory.iterdir())
            if path.is_file() and path.name != MANIFEST_NAME}


def read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def is_up_to_date(directory: Path, key: str) -> bool:
    """True when `directory` holds a finished build with this key and unchanged files."""
    manifest = read_manifest(directory)
    if manifest is None or manifest.get("build_key") != key:
        return False
    recorded = manifest.get("files", {})
    return bool(recorded) and all(
        (directory / name).is_file() and sha256_file(directory / name) == digest for name, digest in recorded.items()
    )


def environment() -> dict[str, Any]:
    """Where it was built: reproducibility is bit-exact for the same libraries, CPU kind and thread count."""
    import torch

    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "training_autocast": training_autocast(),
        **library_versions(),
    }
