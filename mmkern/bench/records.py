"""What a benchmark ran on, and where its figures go: rows appended to one CSV, plus one JSON file
per run, under benchmarks/results/."""

import csv
import datetime
import json
import os
import platform
import re
from dataclasses import asdict, dataclass, field

import torch

import mmkern


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_environment(device: torch.device) -> dict:
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"{_cpu_name()} ({torch.get_num_threads()} threads)"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name,
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "mmkern": mmkern.__version__,
        "python": platform.python_version(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass
class Record:
    op: str
    case: str
    provider: str
    mode: str
    dtype: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    repeats: int
    tflops: float | None
    gbps: float | None
    peak_memory_mb: float
    speedup: float | None = None  # the baseline provider's median time over this one's
    baseline: str | None = None
    params: dict = field(default_factory=dict)


def device_slug(environment: dict) -> str:
    return re.sub(r"[^a-z0-9]+", "-", environment["device"].lower()).strip("-")[:60]


def write_results(records: list, environment: dict, out_dir: str, op: str) -> tuple:
    """Appends the rows to out_dir/<op>.csv and writes out_dir/<op>-<device>-<time>.json."""
    os.makedirs(out_dir, exist_ok=True)
    rows = [{**environment, **{k: v for k, v in asdict(r).items() if k != "params"}, "params": json.dumps(r.params)}
            for r in records]
    csv_path = os.path.join(out_dir, f"{op}.csv")
    new_file = not os.path.exists(csv_path)
    with open(csv_path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
    stamp = environment["timestamp"].replace(":", "").replace("+0000", "Z")
    json_path = os.path.join(out_dir, f"{op}-{device_slug(environment)}-{stamp}.json")
    with open(json_path, "w") as handle:
        json.dump({"environment": environment, "records": [asdict(r) for r in records]}, handle, indent=1)
    return csv_path, json_path


def format_table(records: list) -> str:
    baseline = next((r.baseline for r in records if r.baseline), "baseline")
    header = ["case", "mode", "provider", "median ms", "p20-p80 ms", "TFLOP/s", "GB/s", "peak MB", f"vs {baseline}"]
    lines = [header]
    for r in records:
        lines.append([
            r.case, r.mode, r.provider, f"{r.median_ms:.3f}", f"{r.p20_ms:.3f}-{r.p80_ms:.3f}",
            "" if r.tflops is None else f"{r.tflops:.3f}",
            "" if r.gbps is None else f"{r.gbps:.1f}",
            f"{r.peak_memory_mb:.1f}",
            "" if r.speedup is None else f"{r.speedup:.2f}x",
        ])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
    out = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)) for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)
