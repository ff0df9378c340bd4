"""Two runs side by side: every (op, case, provider, mode, dtype) both timed, with the change in its
median device time, and the ones slower than a threshold counted as regressions. Runs of either record
format compare; a row whose timing method changed (say from events on an idle GPU, host latency
included, to CUDA-graph replays) is marked, since part of its change is the method's."""

from dataclasses import dataclass

from mmkern.bench.records import timing_method

KEY = ("op", "case", "provider", "mode", "dtype")


@dataclass
class Change:
    key: tuple
    old_ms: float
    new_ms: float
    old_timing: str = ""
    new_timing: str = ""

    @property
    def percent(self) -> float:
        """How much slower the new run is (negative: faster)."""
        return 100.0 * (self.new_ms / self.old_ms - 1.0)


def compare_records(old: list, new: list, old_device_type: str = "cpu", new_device_type: str = "cpu") -> tuple:
    """(changes of the rows both runs have, keys only the old run has, keys only the new run has)."""
    old_by_key = {tuple(r[k] for k in KEY): r for r in old}
    new_by_key = {tuple(r[k] for k in KEY): r for r in new}
    changes = [
        Change(
            key,
            old_by_key[key]["median_ms"],
            new_by_key[key]["median_ms"],
            timing_method(old_by_key[key], old_device_type),
            timing_method(new_by_key[key], new_device_type),
        )
        for key in new_by_key
        if key in old_by_key
    ]
    return changes, sorted(set(old_by_key) - set(new_by_key)), sorted(set(new_by_key) - set(old_by_key))


def regressions(changes: list, threshold_percent: float) -> list:
    return [c for c in changes if c.percent > threshold_percent]


def format_comparison(
    changes: list, only_old: list, only_new: list, old_env: dict, new_env: dict, threshold_percent=None
) -> str:
    lines = [
        f"old: {old_env.get('device')} {old_env.get('timestamp')}  new: {new_env.get('device')} "
        f"{new_env.get('timestamp')}"
    ]
    if old_env.get("device") != new_env.get("device"):
        lines.append("note: the runs are on different devices; the changes compare the devices too")
    rows = [["op", "case", "provider", "mode", "dtype", "old ms", "new ms", "change"]]
    for c in sorted(changes, key=lambda c: -c.percent):
        flag = " REGRESSION" if threshold_percent is not None and c.percent > threshold_percent else ""
        if c.old_timing != c.new_timing:
            flag += f" (timing: {c.old_timing} -> {c.new_timing})"
        rows.append([*map(str, c.key), f"{c.old_ms:.3f}", f"{c.new_ms:.3f}", f"{c.percent:+.1f}%{flag}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    for label, keys in (("only in the old run", only_old), ("only in the new run", only_new)):
        if keys:
            lines.append(f"{label}: " + "; ".join(" ".join(map(str, k)) for k in keys))
    if threshold_percent is not None:
        count = len(regressions(changes, threshold_percent))
        lines.append(f"{count} regression(s) over {threshold_percent:g}%")
    return "\n".join(lines)
