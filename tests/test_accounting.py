"""docs/method.md §5 formula against the paper's worked example (Appendix A.5)."""

from kbvq_cli.packed.storage import projection_bits


def test_paper_worked_example():
    # 2048 x 5632 (oc x ic), 64 experts, b = 2, d = 4, k = 16
    result = projection_bits(n=64, oc=2048, ic=5632, rank=16, bits=2, dim=4)
    assert result.weights == 738_197_504
    assert result.total == 1_516_634_112
    assert int(result.bits_per_weight * 1000) / 1000 == 2.054  # 2.05451, quoted truncated in docs/method.md §5
    assert round(result.total / 8 / 2**30, 2) == 0.18 and round(result.weights * 16 / 8 / 2**30, 2) == 1.38


def test_plain_vq_has_no_shared_part():
    plain = projection_bits(n=60, oc=1408, ic=2048, rank=0, bits=3, dim=4)
    assert plain.shared == 0 and plain.indices == 60 * 1408 * 2048 * 3
