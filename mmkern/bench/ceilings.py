"""The device's own limits, measured at the start of a run: the bandwidth of a large device-to-device
copy and the throughput of a large matrix product in each dtype the run times. Each record is then
reported as a fraction of them, so the distance to the physical limit shows beside the speedups."""

import torch

from mmkern.bench.timing import time_calls

# Large enough to leave every cache far behind and to fill every SM; small enough for a 2-core CPU.
COPY_BYTES = {"cuda": 2**30, "cpu": 2**28}
MATMUL_SIZE = {"cuda": 8192, "cpu": 2048}


def _matmul_call(size: int, dtype, device: torch.device):
    if dtype == "int8":
        a = torch.randint(-128, 128, (size, size), dtype=torch.int8, device=device)
        b = torch.randint(-128, 128, (size, size), dtype=torch.int8, device=device)
        return lambda: torch._int_mm(a, b)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    return lambda: torch.mm(a, b)


def measure_ceilings(device: torch.device, dtypes, repeats: int = 10) -> dict:
    """{"copy_gbps": ..., "matmul_tflops": {dtype name: ...}}; dtypes are torch dtypes or "int8"."""
    nbytes = COPY_BYTES[device.type]
    source = torch.randn(nbytes // 4, device=device)
    target = torch.empty_like(source)
    calls = {"copy": [lambda: target.copy_(source)]}
    size = MATMUL_SIZE[device.type]
    for dtype in dtypes:
        calls[str(dtype).replace("torch.", "")] = [_matmul_call(size, dtype, device)]
    timings = time_calls(calls, device, warmup=2, repeats=repeats, budget_s=1.0, graphable=False)
    # A ceiling is what the device can reach: the fastest call, not the typical one.
    ceilings = {
        "copy_gbps": 2 * nbytes / timings.pop("copy").min_ms / 1e6,  # read and write
        "matmul_tflops": {name: 2 * size**3 / stats.min_ms / 1e9 for name, stats in timings.items()},
        "copy_bytes": nbytes,
        "matmul_size": size,
    }
    return ceilings


def attach_fractions(records: list, ceilings: dict, compute_dtype=None) -> None:
    """Sets each record's fractions of the ceilings; ``compute_dtype`` names the ceiling its FLOPs
    are counted against ("int8" for an int8 GEMM), else the record's own dtype."""
    for r in records:
        peak = ceilings["matmul_tflops"].get(compute_dtype or r.dtype)
        r.flops_fraction = r.tflops / peak if r.tflops and peak else None
        r.bandwidth_fraction = r.gbps / ceilings["copy_gbps"] if r.gbps else None
