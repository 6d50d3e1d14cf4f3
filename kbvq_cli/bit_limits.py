"""Which code widths kbvq supports, defined once for the settings checks, the math and the messages.

VQ: `b` bits per weight with sub-vectors of `d` weights gives codebooks of K = 2^(b d) codewords. 4 bits at
d = 4 would be K = 65536: that codebook (65536 x 4 x 16 bits) alone costs 1.5 bits per weight of a
1408 x 2048 expert, and k-means over that many centroids is slow; at d = 2, 4 bits is K = 256.
RTN/GPTQ: integer codes of 2, 3, 4 or 8 bits.
"""

from __future__ import annotations

VQ_BITS: dict[int, tuple[int, ...]] = {4: (2, 3), 2: (2, 3, 4)}  # dim -> the bits it supports
SCALAR_BITS: tuple[int, ...] = (2, 3, 4, 8)


def _words(values) -> str:
    values = [str(v) for v in values]
    return ", ".join(values[:-1]) + f" or {values[-1]}" if len(values) > 1 else values[0]


def vq_combinations() -> str:
    """The valid (bits, dim) pairs in words, with their codebook sizes, for error messages."""
    pairs = [f"bits {_words(bits)} with dim {dim} ({_words([2 ** (b * dim) for b in bits])} codewords)"
             for dim, bits in VQ_BITS.items()]
    return " and ".join(pairs) + ", as K = 2^(bits*dim)"


def vq_problem(bits: int, dim: int) -> str | None:
    """Why `bits` with `dim` is unsupported, naming the valid combinations; None if it is supported."""
    if dim not in VQ_BITS:
        return f"dim={dim} is not supported; valid: {vq_combinations()}"
    if bits in VQ_BITS[dim]:
        return None
    other_dims = [d for d, allowed in VQ_BITS.items() if bits in allowed]
    hint = f"; for {bits} bits pass --dim {other_dims[0]}" if other_dims else ""
    return f"bits={bits} is out of range for dim {dim}; valid: {vq_combinations()}{hint}"


def scalar_problem(bits: int) -> str | None:
    if bits in SCALAR_BITS:
        return None
    return f"bits={bits} is out of range; use one of {', '.join(map(str, SCALAR_BITS))}"
