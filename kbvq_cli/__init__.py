"""kbvq: KBVQ-MoE quantization of Mixture-of-Experts models, one resumable stage at a time.

Importing this package must stay cheap (no torch, no transformers): `kbvq --help` depends on it.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from kbvq_cli import load_quantized` without importing torch at package import time.
    if name == "load_quantized":
        from kbvq_cli.packed.loader import load_quantized

        return load_quantized
    raise AttributeError(name)
