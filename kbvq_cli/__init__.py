"""kbvq: KBVQ-MoE quantization of Mixture-of-Experts models, one resumable stage at a time.

Importing this package must stay cheap (no torch, no transformers): `kbvq --help` depends on it.
"""

__version__ = "0.1.0"
