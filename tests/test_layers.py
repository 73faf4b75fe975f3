import pytest
import torch

from nic.layers import GDN, NonNegative, conv, deconv


def test_fresh_gdn_matches_closed_form():
    # β = 1, γ = 0.1·I: y = x / sqrt(1 + 0.1 x²), channel by channel.
    x = torch.linspace(-20, 20, 4 * 5 * 7).reshape(1, 4, 5, 7)
    y = GDN(4)(x)
    torch.testing.assert_close(y, x / torch.sqrt(1 + 0.1 * x**2), rtol=1e-5, atol=1e-6)


def test_fresh_igdn_matches_closed_form():
    x = torch.linspace(-20, 20, 4 * 5 * 7).reshape(1, 4, 5, 7)
    y = GDN(4, inverse=True)(x)
    torch.testing.assert_close(y, x * torch.sqrt(1 + 0.1 * x**2), rtol=1e-5, atol=1e-5)


def test_gdn_mixes_channels_through_gamma():
    gdn = GDN(2)
    with torch.no_grad():
        gdn.gamma.copy_(gdn.gamma_reparam.init(torch.tensor([[0.0, 1.0], [0.0, 0.0]])))
    x = torch.tensor([3.0, 4.0]).reshape(1, 2, 1, 1)
    y = gdn(x).flatten()
    torch.testing.assert_close(y, torch.tensor([3.0 / (1 + 16.0) ** 0.5, 4.0]), rtol=1e-5, atol=1e-6)


def test_reparameterization_keeps_beta_and_gamma_in_range():
    gdn = GDN(3)
    with torch.no_grad():
        gdn.beta.fill_(-5.0)
        gdn.gamma.fill_(-5.0)
    assert (gdn.beta_reparam(gdn.beta) >= 1e-6 - 1e-12).all()
    assert (gdn.gamma_reparam(gdn.gamma) >= 0).all()


def test_lower_bound_lets_gradient_push_upward():
    reparam = NonNegative(minimum=1.0)
    p = torch.tensor([0.0], requires_grad=True)  # below the bound
    (-reparam(p)).sum().backward()  # minimizing -v wants v larger: gradient flows
    assert p.grad is not None and p.grad.abs().item() > 0


def test_strided_convolutions_halve_and_double():
    x = torch.zeros(1, 3, 32, 48)
    y = conv(3, 5)(x)
    assert y.shape == (1, 5, 16, 24)
    assert deconv(5, 3)(y).shape == (1, 3, 32, 48)


@pytest.mark.parametrize("inverse", [False, True])
def test_inference_path_is_bit_identical_to_the_autograd_path(inverse):
    """GDN computes in place when autograd is off; the numbers must not change."""
    torch.manual_seed(0)
    layer = GDN(16, inverse=inverse)
    with torch.no_grad():
        layer.gamma.add_(0.3 * torch.rand_like(layer.gamma))
    x = torch.randn(2, 16, 20, 24).contiguous(memory_format=torch.channels_last)
    with torch.enable_grad():
        reference = layer(x).detach()
    before = x.clone()
    with torch.inference_mode():
        assert torch.equal(layer(x), reference)
    assert torch.equal(x, before)  # the input is not overwritten
