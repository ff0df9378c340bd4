"""How mmkern's results are compared with the eager reference."""

import pytest
import torch

from mmkern import _config
from mmkern.kernels.launch import runs_on_triton, triton_has_float64_dot

# Devices every op test runs on: the C++ CPU kernels (or, under MMKERN_TRITON_INTERPRET=1, the Triton
# kernels in the interpreter), and CUDA where there is a GPU.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Triton's interpreter computes a bf16 tl.dot wrongly; bf16 through Triton is tested on a GPU.
INTERPRETER_DTYPES = (torch.float64, torch.float32, torch.float16)
ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def dtypes_for(device: str) -> tuple:
    dtypes = INTERPRETER_DTYPES if _config.TRITON_ON_CPU and device == "cpu" else ALL_DTYPES
    return dtypes if float64_runs_on(device) else tuple(d for d in dtypes if d != torch.float64)


def float64_runs_on(device: str) -> bool:
    return not runs_on_triton(torch.device(device)) or triton_has_float64_dot()


def skip_unless_float64_runs_on(device: str) -> None:
    if not float64_runs_on(device):
        pytest.skip("float64 through Triton needs Triton >= 3.5")


def assert_close_to_reference(
    actual: torch.Tensor, exact: torch.Tensor, eager: torch.Tensor, name: str, factor: float = 2.0, terms: int = 1
) -> None:
    """flash-attention's criterion: the error of ``actual`` against the float64 result ``exact`` is at
    most ``factor`` times the error of eager PyTorch in the same dtype (``eager``), plus a floor for
    results eager happens to get exactly right. In float64 eager *is* the exact result, so there the
    floor (1e-12 relative) allows for a different summation order alone.

    The floor is a few units of roundoff of the output's dtype, or of the float32 sums behind each
    element where those are larger: ``terms`` is their length, and their roundoff grows with its
    square root. The order of a long sum (which BLAS may change with memory alignment from run to
    run) decides how much of it eager happens to get right, and a cancellation eager gets exactly
    right by summing twice in the same order (softmax's backward over one key) is roundoff of that
    size in a kernel that sums the two sides differently."""
    assert actual.shape == exact.shape, f"{name}: shape {tuple(actual.shape)}, expected {tuple(exact.shape)}"
    assert actual.dtype == eager.dtype, f"{name}: dtype {actual.dtype}, expected {eager.dtype}"
    if exact.numel() == 0:
        return
    error = (actual.double() - exact).abs().max().item()
    eager_error = (eager.double() - exact).abs().max().item()
    accumulator = torch.float64 if actual.dtype == torch.float64 else torch.float32
    roundoff = max(torch.finfo(actual.dtype).eps, torch.finfo(accumulator).eps * terms**0.5)
    floor = max(4 * roundoff, 1e-12 * terms**0.5) * max(exact.abs().max().item(), 1.0)
    assert error <= factor * eager_error + floor, (
        f"{name}: max error {error:.3e} against float64, eager PyTorch's is {eager_error:.3e} "
        f"(allowed {factor} x that + {floor:.1e})"
    )
