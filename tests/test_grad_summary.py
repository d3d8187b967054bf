"""grad_summary (|g|^2 and the probe projections in one pass) against float64 arithmetic."""
import pytest
import torch

from gradstats import ops as _ops
from conftest import devices


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("R, C, K", [(1, 1, 1), (7, 13, 2), (300, 5, 3), (33, 1030, 2)])
def test_grad_summary_matches_float64(device, dtype, R, C, K):
    g = torch.randn(R, C, device=device).to(dtype)
    x = torch.randn(R, K, dtype=torch.float64, device=device)
    y = torch.randn(C, K, dtype=torch.float64, device=device)
    got = _ops.grad_summary(g, x, y)
    gd = g.double()
    rms = ((gd.square() @ y.square()) * x.square()).sum(0)
    want = torch.cat([gd.square().sum().reshape(1), ((gd @ y) * x).sum(0), rms])
    # float32 accumulation within rows for float32/bfloat16 gradients (float64 across rows):
    # the error scales with the sums of absolute terms
    scale = torch.cat([gd.square().sum().reshape(1), ((gd.abs() @ y.abs()) * x.abs()).sum(0),
                       rms])
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    assert ((got - want).abs() <= rtol * scale).all(), ((got - want).abs() / scale).max()


def test_grad_summary_of_a_transposed_view():
    g = torch.randn(9, 6, dtype=torch.float64).t()
    x, y = torch.randn(6, 2, dtype=torch.float64), torch.randn(9, 2, dtype=torch.float64)
    want = torch.cat([g.square().sum().reshape(1), ((g @ y) * x).sum(0),
                      ((g.square() @ y.square()) * x.square()).sum(0)])
    torch.testing.assert_close(_ops.grad_summary(g, x, y), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("args, match", [
    ((torch.randn(3), torch.randn(3, 2).double(), torch.randn(1, 2).double()), "g must be 2-D"),
    ((torch.randn(3, 4), torch.randn(2, 2).double(), torch.randn(4, 2).double()), "x must be"),
    ((torch.randn(3, 4), torch.randn(3, 2).double(), torch.randn(4, 3).double()), "y must be"),
    ((torch.randn(3, 4), torch.randn(3, 2), torch.randn(4, 2)), "float64"),
])
def test_grad_summary_bad_input(args, match):
    with pytest.raises(RuntimeError, match=match):
        _ops.grad_summary(*args)


def test_grad_summary_opcheck():
    args = (torch.randn(5, 7), torch.randn(5, 2, dtype=torch.float64),
            torch.randn(7, 2, dtype=torch.float64))
    torch.library.opcheck(torch.ops.gradstats.grad_summary.default, args)
