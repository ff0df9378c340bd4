"""The benchmark suite (``mmkern bench``, ``python -m mmkern.bench``) and its harness: cases, providers,
modes, timing with spread, peak memory, throughput against the device's own ceilings, and results
written with what they ran on."""

from mmkern.bench.records import Record, describe_environment, format_table, load_records, write_records
from mmkern.bench.runner import MODES, Case, run_cases
from mmkern.bench.timing import TimingStats, peak_memory_bytes, time_calls

__all__ = [
    "MODES",
    "Case",
    "Record",
    "TimingStats",
    "describe_environment",
    "format_table",
    "load_records",
    "peak_memory_bytes",
    "run_cases",
    "time_calls",
    "write_records",
]
