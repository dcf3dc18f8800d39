"""few_rows.linear: F.linear in the other GEMM orientation for decode-sized calls, F.linear itself elsewhere."""
import pytest
import torch

from pipeline.models import few_rows


def test_small_example_by_hand():
    # W = [[1, 2], [3, 4], [5, 6]] (3 x 2), x = [[1, -1]], b = (0.5, 0, -1):
    # W x^T = (1 - 2, 3 - 4, 5 - 6) = (-1, -1, -1); + b = (-0.5, -1, -2)
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    x = torch.tensor([[[1.0, -1.0]]])
    assert few_rows.applies(x, w)
    out = few_rows.linear(x, w, torch.tensor([0.5, 0.0, -1.0]))
    assert out.shape == (1, 1, 3) and out.is_contiguous()
    assert out.tolist() == [[[-0.5, -1.0, -2.0]]]


@pytest.mark.parametrize("lead", [(1,), (8, 1), (4, 2, 1), (32,)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_equals_f_linear_to_float32_round_off(lead, with_bias):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 40, generator=g)
    b = torch.randn(96, generator=g) if with_bias else None
    x = torch.randn(*lead, 40, generator=g)
    assert few_rows.applies(x, w)
    got = few_rows.linear(x, w, b)
    assert got.shape == (*lead, 96) and got.is_contiguous()
    torch.testing.assert_close(got, torch.nn.functional.linear(x, w, b), atol=1e-5, rtol=1e-6)


def test_other_calls_are_f_linear_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    tall, wide = torch.randn(96, 40, generator=g), torch.randn(40, 96, generator=g)
    many = torch.randn(few_rows.MAX_ROWS + 1, 40, generator=g)
    cases = [
        (many, tall),  # more rows than a decode step's
        (torch.randn(8, 96, generator=g), wide),  # out < in: F.linear measured faster
        (torch.randn(8, 40, generator=g).bfloat16(), tall.bfloat16()),  # bf16 goes to oneDNN, not MKL
    ]
    for x, w in cases:
        assert not few_rows.applies(x, w)
        assert torch.equal(few_rows.linear(x, w), torch.nn.functional.linear(x, w))
