"""The benchmark harness every op's benchmark uses (benchmarks/bench_<op>.py): cases, providers,
modes, timing with spread, peak memory, throughput, and results written with what they ran on."""

from mmkern.bench.records import Record, describe_environment, format_table, write_results
from mmkern.bench.runner import MODES, Case, run_cases
from mmkern.bench.timing import TimingStats, peak_memory_bytes, time_calls

__all__ = ["MODES", "Case", "Record", "TimingStats", "describe_environment", "format_table", "peak_memory_bytes",
           "run_cases", "time_calls", "write_results"]
