"""kbvq: KBVQ-MoE quantization of Mixture-of-Experts models, one resumable stage at a time.

Importing this package must stay cheap (no torch, no transformers): `kbvq --help` depends on it. It
registers the `kbvq` quantization method with transformers lazily (`kbvq_cli.packed.registration`), so
after `import kbvq_cli`, `AutoModelForCausalLM.from_pretrained(pack_dir)` loads a pack.
"""

__version__ = "0.1.0"

from kbvq_cli.packed.registration import install as _install_transformers_method  # noqa: E402

_install_transformers_method()


def __getattr__(name: str):
    # `from kbvq_cli import load_quantized` without importing torch at package import time.
    if name == "load_quantized":
        from kbvq_cli.packed.loader import load_quantized

        return load_quantized
    raise AttributeError(name)
