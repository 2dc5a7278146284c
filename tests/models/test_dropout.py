import pytest
import torch

from fraudflow.models.dropout import ByteDropout, ReLUDropout


def test_drops_the_quantised_share_and_keeps_the_expectation() -> None:
    torch.manual_seed(0)
    layer = ByteDropout(0.2)
    x = torch.ones(1000, 1000)
    y = layer(x)
    dropped = (y == 0).float().mean().item()
    assert dropped == pytest.approx(51 / 256, abs=0.002)
    assert y.mean().item() == pytest.approx(1.0, abs=0.005)
    assert torch.unique(y).tolist() == pytest.approx([0.0, 256 / 205])


def test_eval_mode_and_zero_probability_are_the_identity() -> None:
    x = torch.randn(64, 8)
    layer = ByteDropout(0.5)
    layer.eval()
    assert torch.equal(layer(x), x)
    assert torch.equal(ByteDropout(0.0)(x), x)


def test_same_seed_same_mask_and_gradient_through_kept_values() -> None:
    x = torch.randn(33, 7, requires_grad=True)  # numel not a multiple of 8
    torch.manual_seed(3)
    a = ByteDropout(0.3)(x)
    torch.manual_seed(3)
    b = ByteDropout(0.3)(x)
    assert torch.equal(a, b)
    a.sum().backward()
    assert x.grad is not None
    assert torch.equal(x.grad != 0, a.detach() != 0)


def test_rejects_invalid_probability() -> None:
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        ByteDropout(1.0)


def test_fused_relu_dropout_matches_relu_then_dropout_with_the_same_mask() -> None:
    x = torch.randn(64, 40)
    fused_in = x.clone().requires_grad_(True)
    plain_in = x.clone().requires_grad_(True)
    upstream = torch.randn(64, 40)

    torch.manual_seed(5)
    fused = ReLUDropout(0.25)(fused_in * 1.0)  # a non-leaf, as a Linear's output is
    torch.manual_seed(5)
    plain = ByteDropout(0.25)(torch.relu(plain_in * 1.0))
    assert torch.equal(fused, plain)
    assert (fused == 0).any() and (fused > 0).any()

    (fused * upstream).sum().backward()
    (plain * upstream).sum().backward()
    assert fused_in.grad is not None and plain_in.grad is not None
    assert torch.equal(fused_in.grad, plain_in.grad)


def test_fused_relu_dropout_is_plain_relu_in_eval_mode() -> None:
    x = torch.randn(16, 8)
    layer = ReLUDropout(0.5)
    layer.eval()
    assert torch.equal(layer(x), torch.relu(x))
    with torch.no_grad():
        layer.train()
        dropped = layer(x.abs() + 1)
    assert ((dropped == 0) | (dropped == 2.0 * (x.abs() + 1))).all()
    assert (dropped == 0).any() and (dropped > 0).any()
