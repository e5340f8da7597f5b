"""``fusedad.nn.Linear`` and ``fusedad.convert``: drop-in behaviour, and the examples of the autodiff lecture
this project grew from (Net2 with a frozen layer, the backward identities, the three grad modes)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fusedad
from conftest import DEVICES, randn

pytestmark = pytest.mark.parametrize("device", DEVICES)


def test_same_init_parameters_and_repr_as_nn_linear(device):
    torch.manual_seed(0)
    ref = nn.Linear(7, 5, device=device)
    torch.manual_seed(0)
    ours = fusedad.nn.Linear(7, 5, device=device)
    assert isinstance(ours, nn.Linear)
    torch.testing.assert_close(ours.weight, ref.weight, rtol=0, atol=0)
    torch.testing.assert_close(ours.bias, ref.bias, rtol=0, atol=0)
    assert list(ours.state_dict()) == list(ref.state_dict()) == ["weight", "bias"]
    assert ours.extra_repr() == ref.extra_repr() == "in_features=7, out_features=5, bias=True"
    assert repr(fusedad.nn.Linear(3, 2, bias=False, activation="gelu")) == (
        "Linear(in_features=3, out_features=2, bias=False, activation='gelu')")
    assert fusedad.nn.Linear(3, 2, bias=False).bias is None


def test_dtype_and_device_arguments(device):
    m = fusedad.nn.Linear(4, 3, device=device, dtype=torch.float64)
    assert m.weight.dtype == torch.float64 and m.weight.device.type == device
    y = m(randn(2, 4, dtype=torch.float64, device=device))
    assert y.dtype == torch.float64


def test_state_dict_interchange(device):
    ref = nn.Linear(6, 4, device=device)
    ours = fusedad.nn.Linear(6, 4, device=device)
    ours.load_state_dict(ref.state_dict())
    x = randn(3, 6, device=device)
    torch.testing.assert_close(ours(x), ref(x))
    back = nn.Linear(6, 4, device=device)
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back(x), ref(x))


def test_bad_activation_rejected_at_construction(device):
    with pytest.raises(ValueError, match="unknown activation 'softplus'"):
        fusedad.nn.Linear(3, 2, activation="softplus", device=device)


def _mlp(device):
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.GELU(approximate="tanh"),
                         nn.Linear(16, 12), nn.SiLU(), nn.Linear(12, 12), nn.GELU(), nn.Linear(12, 3)).to(device)


def test_convert_shares_parameters_and_fuses_activations(device):
    model = _mlp(device)
    params = [p for p in model.parameters()]
    keys = list(model.state_dict())
    fusedad.convert(model)
    assert [p for p in model.parameters()] == params  # the same Parameter objects
    assert list(model.state_dict()) == keys
    assert [type(m).__name__ for m in model] == ["Linear", "Identity"] * 4 + ["Linear"]
    assert [m.activation for m in model if isinstance(m, fusedad.nn.Linear)] == [
        "relu", "gelu_tanh", "silu", "gelu", None]
    assert all(type(m) is fusedad.nn.Linear for m in model if isinstance(m, nn.Linear))


def test_convert_gives_same_outputs_and_gradients(device):
    ref = _mlp(device)
    ours = _mlp(device)
    ours.load_state_dict(ref.state_dict())
    fusedad.convert(ours)
    x = randn(5, 8, device=device)
    dy = randn(5, 3, device=device)
    y_ref, y = ref(x), ours(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    y_ref.backward(dy)
    y.backward(dy)
    for (name, p_ref), p in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_convert_nested_models_and_bare_linear(device):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.inner = nn.ModuleList([nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 2), nn.ReLU())])

        def forward(self, x):
            return self.inner[1](self.inner[0](self.proj(x)))

    block = Block().to(device)
    x = randn(3, 4, device=device)
    expect = block(x)
    fusedad.convert(block)
    assert type(block.proj) is fusedad.nn.Linear and type(block.inner[0]) is fusedad.nn.Linear
    assert block.inner[1][0].activation == "relu" and isinstance(block.inner[1][1], nn.Identity)
    torch.testing.assert_close(block(x), expect)
    bare = nn.Linear(4, 2).to(device)
    converted = fusedad.convert(bare)
    assert type(converted) is fusedad.nn.Linear and converted.weight is bare.weight


# ---- the lecture's examples ----------------------------------------------------------------------------

class Net2(nn.Module):
    """The lecture's Net2 (4 → 3 → 1 with ReLU), built from a Linear class without bias."""

    def __init__(self, linear):
        super().__init__()
        self.layer0 = linear(4, 3, bias=False)
        self.layer1 = linear(3, 1, bias=False)

    def forward(self, x):
        return self.layer1(F.relu(self.layer0(x)))


def test_seed_net2_frozen_layer(device):
    """net2.layer1.requires_grad_(False): its grad stays None, the other grads match eager."""
    ref, ours = Net2(nn.Linear).to(device), Net2(fusedad.nn.Linear).to(device)
    ours.load_state_dict(ref.state_dict())
    for net in (ref, ours):
        net.layer1.requires_grad_(False)
    x = randn(4, device=device)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    z_ref, z = ref(xs[0]), ours(xs[1])
    torch.testing.assert_close(z, z_ref)
    z_ref.backward()
    z.backward()
    assert ours.layer1.weight.grad is None
    torch.testing.assert_close(ours.layer0.weight.grad, ref.layer0.weight.grad)
    torch.testing.assert_close(xs[1].grad, xs[0].grad)


def test_seed_backward_identities(device):
    """dL/dX = dL/dY·W and dL/dW = dL/dYᵀ·X (nn.Linear layout), checked on retained grads."""
    layer = fusedad.nn.Linear(12, 8, bias=False, device=device)
    x = randn(6, 12, device=device, requires_grad=True)
    y = layer(x)
    y.retain_grad()
    (y.square().sum() / 2).backward()
    torch.testing.assert_close(x.grad, y.grad @ layer.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.weight.grad, y.grad.t() @ x, rtol=1e-5, atol=1e-6)


def test_seed_grad_modes(device):
    """default / no_grad / inference_mode: equal outputs, only the default mode records a graph."""
    net = nn.Sequential(fusedad.nn.Linear(16, 32, activation="relu"), fusedad.nn.Linear(32, 32, activation="relu"),
                        fusedad.nn.Linear(32, 1)).to(device)
    x = randn(8, 16, device=device)
    y = net(x)
    with torch.no_grad():
        y_ng = net(x)
    with torch.inference_mode():
        y_inf = net(x)
    assert y.grad_fn is not None
    assert y_ng.grad_fn is None and not y_ng.requires_grad
    assert y_inf.grad_fn is None and torch.is_inference(y_inf)
    assert torch.equal(y.detach(), y_ng) and torch.equal(y_ng, y_inf)


def test_accumulate_main_grad_over_micro_batches(device):
    """Megatron-style: bf16 weight, fp32 weight.main_grad summed over micro-batches, weight.grad None."""
    layer = fusedad.nn.Linear(16, 8, activation="silu", device=device, dtype=torch.bfloat16,
                              accumulate_main_grad=True)
    ref = nn.Linear(16, 8, device=device, dtype=torch.float64)
    ref.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    for _ in range(3):
        x = randn(5, 16, device=device, dtype=torch.bfloat16)
        layer(x).float().sum().backward()
        F.silu(ref(x.double())).sum().backward()
    assert layer.weight.grad is None and layer.weight.main_grad.dtype == torch.float32
    torch.testing.assert_close(layer.weight.main_grad.double(), ref.weight.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(layer.bias.grad.double(), ref.bias.grad, rtol=2e-2, atol=5e-2)
    assert "accumulate_main_grad" not in repr(layer)  # extra_repr stays nn.Linear's (+ activation)


def test_convert_keeps_the_activation_of_an_already_fused_layer(device):
    """A fusedad layer that has its own activation, followed by an activation module: convert leaves both
    (it fuses only into a layer without one), so the model computes what it did before."""
    model = nn.Sequential(fusedad.nn.Linear(6, 5, activation="silu"), nn.ReLU(), nn.Linear(5, 4), nn.GELU()).to(device)
    x = randn(3, 6, device=device)
    expect = model(x)
    fusedad.convert(model)
    assert model[0].activation == "silu" and type(model[1]) is nn.ReLU
    assert model[2].activation == "gelu" and type(model[3]) is nn.Identity
    torch.testing.assert_close(model(x), expect)
