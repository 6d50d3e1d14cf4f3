"""The packed model format, defined once, and everything that loads it.

Format: tensor names and unit layout (`layout`), unit metadata (`schema`), code bit-packing (`bitpack`),
storage accounting, formula and measured (`storage`), the files beside the shards (`side_files`,
`model_card`), and the proof that a directory holds what `kbvq pack` wrote (`integrity`).

Loading: `import kbvq_cli` registers the transformers quantization method (`registration`, `quantizer`),
which verifies the pack and installs the kernel-backed runtime modules (`install`, `modules`) holding
the pack's compact tensors (`resident` counts them); `loader.load_quantized` is the same call. The
reference modules (each expert dequantized whole) and their loader are `reference`, `reference_loader`.

`kbvq pack` writes the format; the loaders, `kbvq pack --dense`, `kbvq eval` and `kbvq report` read it.
"""
