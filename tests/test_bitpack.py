import pytest
import torch

from lowbit.formats.bitpack import pack_bits, packed_row_bytes, unpack_bits


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("cols", [8, 13, 64, 136])
def test_round_trip(bits, cols):
    g = torch.Generator().manual_seed(bits * 100 + cols)
    codes = torch.randint(0, 1 << bits, (5, cols), generator=g)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, packed_row_bytes(cols, bits))
    assert torch.equal(unpack_bits(packed, bits, cols).long(), codes)


def test_layout_is_little_endian_dense():
    # 3-bit codes 1..8 (mod 8) -> bit string 001 010 011 100 101 110 111 000 read LSB first.
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]])
    packed = pack_bits(codes, 3)
    word = int.from_bytes(bytes(packed[0].tolist()), "little")
    assert [(word >> (3 * i)) & 7 for i in range(8)] == [1, 2, 3, 4, 5, 6, 7, 0]
    assert pack_bits(torch.tensor([[1, 2]]), 4).tolist() == [[0x21]]


def test_rejects_bad_bits_and_sizes():
    with pytest.raises(ValueError):
        pack_bits(torch.zeros(2, 8, dtype=torch.long), 9)
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(2, 3, dtype=torch.uint8), 4, 8)
