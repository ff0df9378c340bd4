"""Per-token quantization: ``mmkern.ops.quantize_per_token``, its inverse ``dequantize_per_token``,
and ``fake_quantize_per_token`` (both in one pass, straight-through gradient) for training.

The schemas are in csrc/registration.cpp, the kernels in csrc/cpu/quantize_per_token.cpp and
csrc/cuda/quantize_per_token.cu, following the rules of csrc/quantize_rules.h; this file holds
the public functions, their argument checks, the fake kernels and the autograd registrations.
"""

import torch

from mmkern.ops._checks import check_scale_values, check_tensor, checks_values
from mmkern.ops._eager import call_op

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
OUT_DTYPES = (*FLOAT_DTYPES, torch.float64)
# The largest magnitude of each quantized dtype; int8 is symmetric (-128 is never produced).
QUANTIZED_MAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}
QUANTIZED_DTYPES = tuple(QUANTIZED_MAX)


def quantize_per_token(x: torch.Tensor, dtype: torch.dtype = torch.int8) -> tuple:
    """Symmetric per-token quantization: each row (over the last dim) gets its own scale.

    Args:
        x: ``(*lead, d)`` float16, bfloat16 or float32, on CPU or CUDA.
        dtype: ``torch.int8`` (values in [-127, 127]) or ``torch.float8_e4m3fn`` ([-448, 448]).

    Returns:
        ``(xq, scale)``: ``xq (*lead, d)`` in ``dtype``, ``round(x / scale)`` (half to even) clamped
        to the range; ``scale (*lead, 1)`` float32, ``amax / qmax`` of the row. A row of zeros gets
        the smallest normal float32 as its scale, so it dequantizes to zeros. Not differentiable:
        train through quantization with ``fake_quantize_per_token``.

    Raises:
        TypeError: x not a float16/bfloat16/float32 tensor, dtype not int8 or float8_e4m3fn.
        ValueError: x is 0-d, or holds NaN or inf (checked on CPU, and on CUDA with
            ``mmkern.set_value_checks(True)``, a device sync; unchecked, and under torch.compile,
            such a row gets a NaN scale and zeros).
    """
    _check_float_input(x, "x")
    _check_quantized_dtype(dtype, "dtype")
    xq, scale = call_op(torch.ops.mmkern.quantize_per_token.default, [x], x, dtype)
    if checks_values(scale.device):
        raise_on_nonfinite_rows(scale, "x")
    return xq, scale


def dequantize_per_token(xq: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``xq * scale`` in ``dtype``: the inverse of ``quantize_per_token``.

    Args:
        xq: ``(*lead, d)`` int8 or float8_e4m3fn.
        scale: ``(*lead, 1)`` float32, finite and non-negative.
        dtype: float16, bfloat16, float32 (default) or float64.

    Raises:
        TypeError: xq not quantized, scale not float32, dtype not a float dtype.
        ValueError: scale of the wrong shape or device, a negative or non-finite scale (checked on
            CPU, and on CUDA with ``mmkern.set_value_checks(True)``).
    """
    check_quantized_pair(xq, scale, "xq", "scale")
    if dtype not in OUT_DTYPES:
        raise TypeError(f"dtype must be one of {', '.join(map(str, OUT_DTYPES))}, got {dtype}")
    check_scale_values([scale], lambda i: "scale")
    return call_op(torch.ops.mmkern.dequantize_per_token.default, [xq, scale], xq, scale, dtype)


def fake_quantize_per_token(x: torch.Tensor, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """``dequantize_per_token(*quantize_per_token(x, dtype), x.dtype)`` in one pass, for training
    with quantization in the loop: the gradient passes straight through, as if unquantized (the
    per-row scale maps each row's largest magnitude to the range's edge, so nothing is clipped).

    Args:
        x: ``(*lead, d)`` float16, bfloat16 or float32.
        dtype: ``torch.int8`` or ``torch.float8_e4m3fn``, the format being simulated.

    Returns:
        ``(*lead, d)`` in x's dtype. A row holding NaN or inf comes out NaN, as a float op's would.
    """
    _check_float_input(x, "x")
    _check_quantized_dtype(dtype, "dtype")
    return call_op(torch.ops.mmkern.fake_quantize_per_token.default, [x], x, dtype)


def _check_float_input(x, name: str) -> None:
    check_tensor(x, name)
    if x.dtype not in FLOAT_DTYPES:
        hint = "; it is already quantized" if x.dtype in QUANTIZED_DTYPES else ""
        raise TypeError(f"{name} has dtype {x.dtype}; expected float16, bfloat16 or float32{hint}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have a feature dimension, got a 0-d tensor")


def _check_quantized_dtype(dtype, name: str) -> None:
    if dtype not in QUANTIZED_DTYPES:
        raise TypeError(f"{name} must be one of {', '.join(map(str, QUANTIZED_DTYPES))}, got {dtype}")


def check_quantized_pair(xq, scale, xq_name: str, scale_name: str) -> None:
    """A quantized tensor ``(*lead, d)`` and its per-token float32 scales ``(*lead, 1)``, on one device."""
    check_tensor(xq, xq_name)
    check_tensor(scale, scale_name)
    if xq.dtype not in QUANTIZED_DTYPES:
        hint = " (quantize it with mmkern.ops.quantize_per_token)" if xq.dtype.is_floating_point else ""
        raise TypeError(f"{xq_name} has dtype {xq.dtype}; expected {' or '.join(map(str, QUANTIZED_DTYPES))}{hint}")
    if scale.dtype != torch.float32:
        raise TypeError(f"{scale_name} has dtype {scale.dtype}; per-token scales are float32")
    if xq.dim() == 0:
        raise ValueError(f"{xq_name} must have a feature dimension, got a 0-d tensor")
    expected = (*xq.shape[:-1], 1)
    if tuple(scale.shape) != expected:
        raise ValueError(
            f"{scale_name} must have shape {expected} (one scale per row of {xq_name}), got {tuple(scale.shape)}"
        )
    if scale.device != xq.device:
        raise ValueError(
            f"{scale_name} is on {scale.device} but {xq_name} is on {xq.device}; they must share one device"
        )


def raise_on_nonfinite_rows(scale: torch.Tensor, name: str) -> None:
    """A ValueError naming the first row of ``name`` that held NaN or inf, read off the NaN its scale
    came out with."""
    bad = torch.isnan(scale)
    if bad.any():
        row = tuple(bad.nonzero()[0, :-1].tolist())
        raise ValueError(f"{name} holds NaN or inf in row {row}; quantization needs finite values")


@torch.library.register_fake("mmkern::quantize_per_token")
def _quantize_per_token_fake(x, dtype):
    return x.new_empty(x.shape, dtype=dtype), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@torch.library.register_fake("mmkern::dequantize_per_token")
def _dequantize_per_token_fake(xq, scale, dtype):
    return xq.new_empty(xq.shape, dtype=dtype)


@torch.library.register_fake("mmkern::fake_quantize_per_token")
def _fake_quantize_per_token_fake(x, dtype):
    return x.new_empty(x.shape)


def _no_gradient(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _quantize_backward(ctx, grad_xq, grad_scale):
    raise RuntimeError("quantize_per_token is not differentiable; use fake_quantize_per_token to train through it")


def _straight_through(ctx, grad):
    return grad, None


torch.library.register_autograd("mmkern::quantize_per_token", _quantize_backward, setup_context=_no_gradient)
torch.library.register_autograd("mmkern::fake_quantize_per_token", _straight_through)
