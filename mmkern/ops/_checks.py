"""Argument checks shared by the ops. Each error names the argument and what was expected."""

from collections.abc import Sequence

import torch

from mmkern import _config
from mmkern.kernels.launch import leading_shape, runs_on_triton


def tensor_list(value, name: str) -> list:
    """``value`` as a non-empty list of tensors."""
    if isinstance(value, torch.Tensor) or not isinstance(value, Sequence):
        raise TypeError(
            f"{name} must be a sequence of tensors, one per segment, got {type(value).__name__}"
            + ("; wrap a single tensor in a list" if isinstance(value, torch.Tensor) else "")
        )
    value = list(value)
    if not value:
        raise ValueError(f"{name} must hold at least one tensor")
    for i, tensor in enumerate(value):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(tensor).__name__}")
    return value


def check_tensor(value, name: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor{' or None' if optional else ''}, got {type(value).__name__}")


def check_choice(value, name: str, choices: Sequence) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")


def check_same_device(named: list, device: torch.device, device_name: str, op: str) -> None:
    for name, tensor in named:
        if tensor.device != device:
            raise ValueError(
                f"{name} is on {tensor.device} but {device_name} is on {device}; all tensors must share one device"
            )
    if device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"{op} runs on cpu and cuda tensors, got tensors on {device}")


def check_concat_shapes(inputs: list, weight: torch.Tensor, bias, inputs_name: str, weight_name: str) -> None:
    """The shapes of a concat-projection: feature dims whose sum is the weight's width, a (N,) bias,
    and leading shapes that broadcast."""
    for i, x in enumerate(inputs):
        if x.dim() == 0:
            raise ValueError(f"{inputs_name}[{i}] must have a feature dimension, got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(
            f"{weight_name} must be 2-D (out_features, sum of input widths), got shape {tuple(weight.shape)}"
        )
    widths = [x.shape[-1] for x in inputs]
    if weight.shape[1] != sum(widths):
        raise ValueError(
            f"{weight_name}.shape[1] must equal the sum of the {inputs_name}' last dims {widths} = {sum(widths)}, "
            f"got {weight_name} of shape {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    try:
        leading_shape(inputs)
    except RuntimeError:
        shapes = ", ".join(f"{inputs_name}[{i}] {tuple(x.shape[:-1])}" for i, x in enumerate(inputs))
        raise ValueError(
            f"the leading shapes of the {inputs_name} (all but the last dim) do not broadcast: {shapes}"
        ) from None


def checks_values(device: torch.device) -> bool:
    """Whether an op checks the values of its arguments on ``device``: always where it runs its C++ CPU
    kernel (the values are on the host already), on the GPU path (CUDA, and CPU tensors under the
    interpreter switch, which stand for CUDA ones) only with mmkern.set_value_checks(True) or
    MMKERN_CHECK_VALUES=1, since each check reads the device. Never while torch.compile traces: a
    compiled graph cannot raise on data."""
    if torch.compiler.is_compiling():
        return False
    return _config.value_checks() or not runs_on_triton(device)


def check_scale_values(scales: list, name_of) -> None:
    """Scales must be finite and non-negative: checked here on the GPU path where checks_values (one
    read of the device for all of them; ``name_of(i)`` names ``scales[i]`` in the error, built only
    then); the C++ CPU kernels check the scales they read themselves (csrc/cpu/scale_values.cpp), with
    the same message, so a CPU call builds no tensors to check."""
    if not scales or not runs_on_triton(scales[0].device) or not checks_values(scales[0].device):
        return
    values = torch.cat([s.reshape(-1) for s in scales])
    if values.numel() == 0:
        return
    # One extremum pass over all of them (a NaN is both extrema): three ops where a test per scale
    # took six each, which cost a small call more than its kernel.
    low, high = values.aminmax()
    if bool((low >= 0) & (high < float("inf"))):
        return
    for i, scale in enumerate(scales):
        bad = scale[~(torch.isfinite(scale) & (scale >= 0))]
        if bad.numel():
            raise ValueError(f"{name_of(i)} holds {bad[0].item()}; scales must be finite and >= 0")
