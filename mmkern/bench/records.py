"""What a benchmark ran on, and its figures: one folder per run, with every record as CSV and JSON."""

import csv
import datetime
import json
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


def _cuda_driver() -> str | None:
    try:
        version = torch._C._cuda_getDriverVersion()  # e.g. 13000 for 13.0
    except (AttributeError, RuntimeError):
        return None
    return f"{version // 1000}.{version % 1000 // 10}"


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
        "driver": _cuda_driver() if device.type == "cuda" else None,
        "triton": triton_version,
        # The host's vector ISA as torch dispatches on it (AVX2, AVX512, ...): CPU figures, and ATen's
        # int8 product among them, depend on it by factors of ten.
        "cpu_isa": torch.backends.cpu.get_cpu_capability(),
        # ... and the build of mmkern's C++ hot loops that ran, with its int8 GEMM (csrc/cpu/isa).
        "mmkern_cpu_isa": f"{mmkern.cpu_isa()}, int8 GEMM {torch.ops.mmkern.cpu_int8_gemm()}",
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
    median_ms: float  # device time per call (see mmkern.bench.timing), as are p20, p80 and min
    p20_ms: float
    p80_ms: float
    min_ms: float
    repeats: int
    tflops: float | None
    gbps: float | None
    peak_memory_mb: float
    speedup: float | None = None  # the baseline provider's median time over this one's
    baseline: str | None = None
    timing: str = "cpu-wall"  # how the device time was taken: one of timing.METHODS
    host_ms: float | None = None  # the host's time per call (CUDA only)
    input_copies: int = 1  # copies of the inputs the timed calls took in turn
    flops_fraction: float | None = None  # of the device's measured matrix-product ceiling
    bandwidth_fraction: float | None = None  # of the device's measured copy bandwidth
    params: dict = field(default_factory=dict)


def device_slug(environment: dict) -> str:
    return re.sub(r"[^a-z0-9]+", "-", environment["device"].lower()).strip("-")[:60]


def run_folder_name(environment: dict) -> str:
    stamp = environment["timestamp"].replace(":", "").replace("+0000", "Z")
    return f"{stamp}-{device_slug(environment)}"


def write_records(records: list, path_stem: str, extra: dict) -> tuple:
    """``path_stem``.csv (a row per record, with ``extra["environment"]`` on every row) and
    ``path_stem``.json (``extra`` and the records)."""
    environment = extra.get("environment", {})
    rows = [
        {**environment, **{k: v for k, v in asdict(r).items() if k != "params"}, "params": json.dumps(r.params)}
        for r in records
    ]
    csv_path, json_path = path_stem + ".csv", path_stem + ".json"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["op"])
        writer.writeheader()
        writer.writerows(rows)
    with open(json_path, "w") as handle:
        json.dump({**extra, "records": [asdict(r) for r in records]}, handle, indent=1)
    return csv_path, json_path


def load_records(path: str) -> tuple:
    """(the run's JSON without its records, the records as dicts) of a results.json, or of the
    per-op JSON files earlier runs wrote (environment and records)."""
    with open(path) as handle:
        saved = json.load(handle)
    records = saved.pop("records")
    return saved, records


def timing_method(record: dict, device_type: str) -> str:
    """How a saved record's device time was taken. Records from before the method was recorded were
    CUDA-graph replays where marked "graphed", else one call between two events from an idle GPU
    ("events-idle": the host's latency included) or, on a CPU, wall time."""
    if "timing" in record:
        return record["timing"]
    if record.get("graphed"):
        return "cuda-graph"
    return "events-idle" if device_type == "cuda" else "cpu-wall"


def _percent(fraction) -> str:
    return "" if fraction is None else f"{100 * fraction:.0f}%"


def format_table(records: list) -> str:
    """One line per record: device time (median and spread), host time, and 'of peak', the larger of its
    fractions of the device's measured matrix-product and copy ceilings."""
    baseline = next((r.baseline for r in records if r.baseline), "baseline")
    header = [
        "case",
        "mode",
        "provider",
        "device ms",
        "p20-p80 ms",
        "host ms",
        "timing",
        "TFLOP/s",
        "GB/s",
        "of peak",
        "peak MB",
        f"vs {baseline}",
    ]
    lines = [header]
    for r in records:
        fractions = [f for f in (r.flops_fraction, r.bandwidth_fraction) if f is not None]
        lines.append(
            [
                r.case,
                r.mode,
                r.provider,
                f"{r.median_ms:.3f}",
                f"{r.p20_ms:.3f}-{r.p80_ms:.3f}",
                "" if r.host_ms is None else f"{r.host_ms:.3f}",
                r.timing,
                "" if r.tflops is None else f"{r.tflops:.3f}",
                "" if r.gbps is None else f"{r.gbps:.1f}",
                _percent(max(fractions, default=None)),
                f"{r.peak_memory_mb:.1f}",
                "" if r.speedup is None else f"{r.speedup:.2f}x",
            ]
        )
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
    out = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)) for row in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def slower_than_baseline(records: list) -> list:
    """A line for each mmkern figure below 1.0x of its case's baseline (records as dicts)."""
    return [
        f"{r['op']} {r['case']} {r['mode']} {r['dtype']}: {r['speedup']:.2f}x of {r['baseline']}"
        for r in records
        if r["provider"] == "mmkern" and r.get("speedup") is not None and r["speedup"] < 1.0
    ]
