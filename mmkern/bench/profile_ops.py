"""``python -m mmkern.bench.profile_ops``: a profiler summary per op, what the GPU kit prints about where
each op's time goes: for one case of each op (the quick preset's first), per call, the host's time
enqueueing it and each kernel's device time (CPU ops' self time on a CPU), from torch.profiler. The
full profiler tables go to ``--out``."""

import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from mmkern.bench.runner import mode_steps
from mmkern.bench.suite import ProviderOptions, default_dtypes, suites
from mmkern.bench.timing import quiet_stderr

CALLS = 10  # profiled calls per (op, mode)
TOP = 4  # kernels listed per (op, mode)


def _device_time(event, cuda: bool) -> float:
    """An averaged profiler row's self time in microseconds, on the device (CUDA) or the CPU."""
    if cuda:
        return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)
    return event.self_cpu_time_total


def profile_step(step, device: torch.device, calls: int = CALLS) -> dict:
    """{"host_ms": host time per call, "kernels": [(name, us per call, launches per call)], "table": str}."""
    cuda = device.type == "cuda"
    for _ in range(3):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    begin = time.perf_counter()
    for _ in range(calls):
        step()
    host_ms = (time.perf_counter() - begin) * 1e3 / calls
    if cuda:
        torch.cuda.synchronize(device)
    prof = profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])])
    with quiet_stderr():
        prof.start()
    try:
        for _ in range(calls):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    finally:
        with quiet_stderr():
            prof.stop()
    averages = prof.key_averages()
    rows = [
        e for e in averages if (e.device_type == torch.autograd.DeviceType.CUDA) == cuda and _device_time(e, cuda) > 0
    ]
    rows.sort(key=lambda e: -_device_time(e, cuda))
    kernels = [(e.key, _device_time(e, cuda) / calls, e.count / calls) for e in rows]
    newer = bool(averages) and hasattr(averages[0], "self_device_time_total")
    sort_by = ("self_device_time_total" if newer else "self_cuda_time_total") if cuda else "self_cpu_time_total"
    return {"host_ms": host_ms, "kernels": kernels, "table": averages.table(sort_by=sort_by, row_limit=25)}


def profile_suites(chosen: list, device: torch.device, log=print) -> list:
    """One summary per (op, mode) of each suite's first quick case; returns them as dicts."""
    summaries = []
    for suite in chosen:
        cases = suite.cases("quick", device.type)
        if not cases:
            continue
        name, spec = next(iter(cases.items()))
        dtype = default_dtypes("quick", device)[0]
        case = suite.make_case(name, spec, dtype)
        fn = suite.make_providers(case, ProviderOptions(device, dtype, with_compile=False))["mmkern"]
        args = case.make_args(device, dtype)
        for mode in suite.modes:
            if mode == "backward":
                continue
            summary = {
                "op": suite.op,
                "case": name,
                "mode": mode,
                **profile_step(mode_steps(fn, [args], mode)[0], device),
            }
            kernel_us = sum(us for _, us, _ in summary["kernels"])
            log(
                f"{suite.op} {name} {mode}: host {summary['host_ms']:.3f} ms/call, "
                f"{'kernels' if device.type == 'cuda' else 'CPU ops'} {kernel_us / 1e3:.3f} ms/call"
            )
            for kernel, us, launches in summary["kernels"][:TOP]:
                log(f"    {us:9.1f} us  x{launches:g}  {kernel[:90]}")
            summaries.append(summary)
    return summaries


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmkern.bench.profile_ops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", default=None, help="comma-separated ops (default: every op but the models)")
    parser.add_argument("--out", default=None, help="a folder for the full profiler tables")
    args = parser.parse_args(argv)
    chosen = [s for s in suites() if s.op != "models" and (args.ops is None or s.op in args.ops.split(","))]
    if not chosen:
        parser.error(f"--ops: none of {args.ops} is an op")
    summaries = profile_suites(chosen, torch.device(args.device))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        for s in summaries:
            with open(os.path.join(args.out, f"{s['op']}-{s['mode'].replace('+', '_')}.txt"), "w") as handle:
                handle.write(f"{s['op']} {s['case']} {s['mode']}: host {s['host_ms']:.3f} ms/call\n\n{s['table']}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
