"""Bit-packing round trips for every index width the codebooks use, odd lengths included."""

import pytest
import torch

from kbvq_cli.errors import KbvqError
from kbvq_cli.packed.bitpack import pack_indices, packed_size, unpack_indices


@pytest.mark.parametrize("width", [4, 6, 8, 12, 16, 1, 13])
@pytest.mark.parametrize("count", [0, 1, 7, 1001, 4096])
def test_round_trip_and_size(width, count):
    values = torch.randint(0, 1 << width, (count,), generator=torch.Generator().manual_seed(width * 7 + count))
    packed = pack_indices(values, width)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(count, width) == (count * width + 7) // 8
    assert torch.equal(unpack_indices(packed, width, count), values)


def test_bit_order_is_little_endian():
    assert pack_indices(torch.tensor([0xABC, 0x123]), 12).tolist() == [0xBC, 0x3A, 0x12]
    assert pack_indices(torch.tensor([0x1234]), 16).tolist() == [0x34, 0x12]


def test_out_of_range_and_corrupt_sizes_are_errors():
    with pytest.raises(KbvqError, match="does not fit in 12 bits"):
        pack_indices(torch.tensor([4096]), 12)
    with pytest.raises(KbvqError, match="the shard is corrupt"):
        unpack_indices(torch.zeros(5, dtype=torch.uint8), 12, 4)
    with pytest.raises(KbvqError, match="1 to 16 bits"):
        pack_indices(torch.tensor([1]), 17)


@pytest.mark.parametrize("width", [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 13, 14, 16])
@pytest.mark.parametrize("count", [1, 7, 1001])
def test_unpack_rows_equals_unpack_indices_per_row(width, count):
    """Rows packed one by one (one per expert, as `kbvq pack` stacks them) decode to the same codes, in the
    resident dtype the kernels read (int16 holds the unsigned value of codes wider than 8 bits)."""
    from kbvq_cli.packed.bitpack import code_dtype, unpack_rows

    generator = torch.Generator().manual_seed(width * 31 + count)
    values = torch.randint(0, 1 << width, (3, count), generator=generator)
    packed = torch.stack([pack_indices(row, width) for row in values])
    codes = unpack_rows(packed, width, count)
    assert codes.dtype == code_dtype(width) and codes.shape == (3, count)
    unsigned = codes.to(torch.int64) & 0xFFFF
    assert torch.equal(unsigned, values)


def test_unpack_rows_views_8_and_16_bit_codes_without_copying():
    from kbvq_cli.packed.bitpack import unpack_rows

    packed8 = torch.stack([pack_indices(torch.arange(10) % 256, 8)] * 2)
    assert unpack_rows(packed8, 8, 10).data_ptr() == packed8.data_ptr()
    packed16 = torch.stack([pack_indices(torch.tensor([0x1234, 0xFFFF]), 16)])
    codes = unpack_rows(packed16, 16, 2)
    assert codes.data_ptr() == packed16.data_ptr() and codes.tolist() == [[0x1234, -1]]
    with pytest.raises(KbvqError, match="the shard is corrupt"):
        unpack_rows(torch.zeros(2, 5, dtype=torch.uint8), 12, 4)
