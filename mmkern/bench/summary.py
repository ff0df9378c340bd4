"""``python -m mmkern.bench.summary``: the GPU kit's last table, at most ``--lines`` lines: for every
(op, case, mode) of a benchmark run, mmkern's device and host time, its speedup over the reference,
the fastest provider, and its fraction of the measured ceilings; then the tuned table's counts."""

import argparse
import json
import sys
from collections import defaultdict

from mmkern.bench.records import load_records, timing_method


def summary_lines(results_path: str, table_path: str | None = None, max_lines: int = 40) -> list:
    saved, records = load_records(results_path)
    device_type = saved["environment"].get("device_type", "cpu")
    rows = defaultdict(list)
    for r in records:
        rows[(r["op"], r["case"], r["mode"], r["dtype"])].append(r)
    header = f"{'op':<24} {'case':<36} {'mode':<8} {'dev ms':>8} {'host ms':>8} {'vs ref':>7} {'fastest':<16} peak"
    lines = [f"{saved['environment']['device']}, {saved['environment']['timestamp']}", header]
    tail = []
    if table_path is not None:
        with open(table_path) as handle:
            table = json.load(handle)
        tuned = {family: len(entries) for family, entries in table["families"].items()}
        tail.append(f"tuned: {tuned}; kept default {len(table['kept_default'])}; left out {len(table['left_out'])}")
    body = []
    for (op, case, mode, dtype), group in rows.items():
        ours = next((r for r in group if r["provider"] == "mmkern"), None)
        if ours is None:
            continue
        fastest = min(group, key=lambda r: r["median_ms"])
        fractions = [f for f in (ours.get("flops_fraction"), ours.get("bandwidth_fraction")) if f is not None]
        host = "" if ours.get("host_ms") is None else f"{ours['host_ms']:.3f}"
        speedup = "" if ours.get("speedup") is None else f"{ours['speedup']:.2f}x"
        peak = f"{100 * max(fractions):.0f}%" if fractions else ""
        method = timing_method(ours, device_type)
        body.append(
            f"{op[:24]:<24} {case[:36]:<36} {mode.replace('forward+backward', 'fwd+bwd')[:8]:<8} "
            f"{ours['median_ms']:>8.3f} {host:>8} {speedup:>7} {fastest['provider'][:16]:<16} {peak}"
            + ("" if method == "cuda-graph" else f" ({method})")
        )
    room = max_lines - len(lines) - len(tail)
    if len(body) > room:
        body = body[: room - 1] + [f"... {len(body) - room + 1} more rows in the run's report.md"]
    return lines + body + tail


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmkern.bench.summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="a run's results.json")
    parser.add_argument("--table", default=None, help="the tuning sweep's table")
    parser.add_argument("--lines", type=int, default=40)
    args = parser.parse_args(argv)
    print("\n".join(summary_lines(args.results, args.table, args.lines)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
