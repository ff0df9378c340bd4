import pytest
import torch

from mmkern import _config, reference
from mmkern.nn import BACKENDS, ConcatLinear, GatedFusion, set_backend
from tests.numerics import DEVICES


def gated_unit_by_hand(module, inputs):
    """Arevalo et al.'s unit written out: tanh projections, softmax gates over the concat."""
    gates = reference.concat_linear(inputs, module.gate.weight, module.gate.bias)
    gates = torch.softmax(gates.unflatten(-1, (len(inputs), module.out_features)), dim=-2)
    projected = [
        torch.tanh(torch.nn.functional.linear(x, p.weight, p.bias)) for p, x in zip(module.projections, inputs)
    ]
    projected = torch.stack(torch.broadcast_tensors(*projected), dim=-2)
    return (gates * projected).sum(-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("widths", [(16, 8), (5, 7, 3)])
def test_gated_fusion_matches_the_unit(device, widths):
    torch.manual_seed(0)
    module = GatedFusion(widths, 12, device=device, dtype=torch.float64)
    shapes = [(2, 5, widths[0])] + [(2, 1, w) for w in widths[1:]]  # pooled vectors beside tokens broadcast
    inputs = [torch.randn(s, device=device, dtype=torch.float64, requires_grad=True) for s in shapes]
    expected = gated_unit_by_hand(module, inputs)
    actual = module(*inputs)
    assert actual.shape == (2, 5, 12)
    torch.testing.assert_close(actual, expected)
    if len(widths) == 2:
        # Two modalities: the first gate is a sigmoid of the logits' difference, as in the paper.
        logits = reference.concat_linear(inputs, module.gate.weight, module.gate.bias).unflatten(-1, (2, 12))
        z = torch.sigmoid(logits[..., 0, :] - logits[..., 1, :])
        h0, h1 = (torch.tanh(p(x)) for p, x in zip(module.projections, inputs))
        torch.testing.assert_close(actual, z * h0 + (1 - z) * h1)
    # Fast mode in Triton's interpreter, where each of full gradcheck's many calls is slow.
    assert torch.autograd.gradcheck(lambda *x: module(*x), inputs, fast_mode=_config.TRITON_ON_CPU)


def test_gated_fusion_arguments():
    with pytest.raises(ValueError, match="at least two modalities"):
        GatedFusion([4], 3)
    with pytest.raises(ValueError, match="expected 2 inputs"):
        GatedFusion([4, 4], 3)(torch.randn(1, 4))


def test_set_backend_switches_every_module():
    model = torch.nn.Sequential(ConcatLinear([3, 4], 5), torch.nn.Sequential(GatedFusion([5, 5], 2)))
    assert set_backend(model, "eager") is model
    assert all(m.backend == "eager" for m in model.modules() if hasattr(m, "backend"))
    x = (torch.randn(2, 3), torch.randn(2, 4))
    eager = model[0](*x)
    set_backend(model, "mmkern")
    torch.testing.assert_close(model[0](*x), eager)
    assert BACKENDS == ("mmkern", "eager")
    with pytest.raises(ValueError, match="backend must be one of"):
        set_backend(model, "triton")
