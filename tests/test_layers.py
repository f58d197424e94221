import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from nsn_export import NSNLinear


def make_linear(d_in=24, d_out=40, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out)


def test_svd_init_prefixes_are_best_rank_r_approximations():
    linear = make_linear()
    nsn = NSNLinear.from_linear(linear, max_rank=24)
    weight = linear.weight.detach().double()
    singular = torch.linalg.svdvals(weight)
    for r in (1, 3, 8, 17, 23):
        error = (weight - nsn.weight_at(r).detach().double()).pow(2).sum()
        expected = singular[r:].pow(2).sum()
        assert torch.allclose(error, expected, rtol=1e-4), (r, error, expected)


def test_each_rank_image_lies_inside_the_next_ranks_image():
    nsn = NSNLinear.from_linear(make_linear(), max_rank=20)
    for r in (1, 5, 12, 19):
        w_r = nsn.weight_at(r).detach().double()
        basis, _ = torch.linalg.qr(nsn.B[:, : r + 1].detach().double())
        projected = basis @ (basis.T @ w_r)
        assert torch.allclose(projected, w_r, atol=1e-6)


def test_full_rank_reproduces_linear_and_conv1d():
    torch.manual_seed(0)
    x = torch.randn(5, 24)
    linear = make_linear()
    assert torch.allclose(NSNLinear.from_linear(linear, 24)(x), linear(x), atol=1e-5)
    conv = Conv1D(40, 24)
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    nsn = NSNLinear.from_linear(conv, 24)
    assert (nsn.in_features, nsn.out_features) == (24, 40)
    assert torch.allclose(nsn(x), conv(x), atol=1e-4)


def test_forward_at_rank_matches_formula_and_to_dense_in_both_modes():
    nsn = NSNLinear.from_linear(make_linear(), 16)
    x = torch.randn(3, 7, 24)
    for r in (1, 6, 16):
        expected = (x @ nsn.A[:r].T) @ nsn.B[:, :r].T + nsn.bias
        for mode in ("slice", "mask"):
            nsn.rank, nsn.rank_mode = r, mode
            assert torch.allclose(nsn(x), expected, atol=1e-5)
        assert torch.allclose(nsn.to_dense(r)(x), expected, atol=1e-5)


def test_float64_svd_keeps_the_models_dtype():
    nsn = NSNLinear.from_linear(make_linear().to(torch.bfloat16), 8)
    assert nsn.A.dtype == nsn.B.dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [0, -1, 17, 2.0, True, "3", None, torch.tensor([1, 2]), torch.tensor(2.0)])
def test_invalid_rank_is_a_value_error_naming_the_range(bad):
    nsn = NSNLinear.from_linear(make_linear(), 16)
    with pytest.raises(ValueError, match=r"\[1, 16\]"):
        nsn.weight_at(bad)


def test_max_rank_beyond_the_layer_is_refused():
    with pytest.raises(ValueError, match=r"\[1, 24\]"):
        NSNLinear.from_linear(make_linear(), 25)


def test_flops_per_token_is_linear_in_rank():
    nsn = NSNLinear.from_linear(make_linear(), 16)
    assert nsn.flops_per_token(5) == 2 * 5 * (24 + 40)
    assert nsn.flops_per_token() == 2 * 16 * 64
