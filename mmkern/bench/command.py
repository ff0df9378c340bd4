"""``mmkern bench`` (``python -m mmkern.bench``): every op's benchmark, and the complete models', in one
run, against every baseline installed, reported against the device's own ceilings.

    mmkern bench                              the quick preset (a few minutes on a 2-core CPU)
    mmkern bench --preset full                every op, case, dtype and mode
    mmkern bench --preset models              training steps of the complete models
    mmkern bench --preset host                host time per call of every op's GPU path (on a CPU too)
    mmkern bench --compare OLD.json [NEW.json] [--fail-if-regression PCT]
    mmkern bench --update-readme              the README's performance section from benchmarks/results

A run writes a folder under --out with results.json, results.csv, plots/*.png and report.md.
"""

import argparse
import os
import sys

import torch

from mmkern.bench.ceilings import attach_fractions, measure_ceilings
from mmkern.bench.compare import compare_records, format_comparison, regressions
from mmkern.bench.records import (
    describe_environment,
    format_table,
    load_records,
    run_folder_name,
    slower_than_baseline,
    write_records,
)
from mmkern.bench.report import markdown_report, plot_speedups, update_readme
from mmkern.bench.runner import MODES, run_cases
from mmkern.bench.suite import PRESETS, ProviderOptions, default_dtypes, suites

# Seconds of timing per (case, provider, mode): the quick preset trades spread for its time limit.
BUDGET_S = {"quick": 1.0, "full": 3.0, "models": 3.0}
# The quick preset leaves out the backward alone (forward+backward covers it).
QUICK_MODES = ("forward", "forward+backward")


def _comma_list(text):
    return [item for item in text.split(",") if item] if text else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmkern bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=(*PRESETS, "host"), default="quick")
    parser.add_argument("--ops", type=_comma_list, help="comma-separated ops (default: the preset's); see --list")
    parser.add_argument(
        "--dtype",
        type=_comma_list,
        help="comma-separated, e.g. bfloat16,float16 (default: bfloat16 on cuda, float32 on cpu; full adds the others)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--providers",
        type=_comma_list,
        help="comma-separated providers to time (default: all; each op's reference still runs, "
        "to check the others against)",
    )
    parser.add_argument("--modes", type=_comma_list, help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--cases", type=_comma_list, help="comma-separated case names (default: the preset's)")
    parser.add_argument("--out", default="mmkern-bench", help="a folder per run is made in it (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--budget", type=float, help="seconds of timing per (case, provider, mode)")
    parser.add_argument("--no-compile", action="store_true", help="leave out providers that torch.compile")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--list", action="store_true", help="list the ops, their presets and cases, and exit")
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="RUN.json",
        help="OLD.json: compare this run with it; OLD.json NEW.json: compare two saved runs",
    )
    parser.add_argument(
        "--fail-if-regression",
        type=float,
        metavar="PCT",
        help="with --compare: exit 1 if any median time is more than PCT percent slower",
    )
    parser.add_argument(
        "--update-readme",
        action="store_true",
        help="rewrite --readme's performance section from the newest run under --results, and exit",
    )
    parser.add_argument("--readme", default="README.md")
    parser.add_argument("--results", default=os.path.join("benchmarks", "results"))
    return parser


def _chosen_suites(parser, args) -> list:
    every = suites()
    if args.ops is None:
        return [s for s in every if args.preset in s.presets]
    known = {s.op: s for s in every}
    unknown = [op for op in args.ops if op not in known]
    if unknown:
        parser.error(f"--ops: unknown {unknown}; known: {', '.join(known)}")
    return [known[op] for op in args.ops]


def _dtypes(parser, args, device) -> list:
    if args.dtype is None:
        return list(default_dtypes(args.preset, device))
    dtypes = [getattr(torch, name, None) for name in args.dtype]
    if any(not isinstance(d, torch.dtype) or not d.is_floating_point for d in dtypes):
        parser.error(f"--dtype: expected floating dtypes such as bfloat16,float32; got {','.join(args.dtype)}")
    return dtypes


def _modes(parser, args, suite) -> list:
    if args.modes is not None:
        unknown = [m for m in args.modes if m not in MODES]
        if unknown:
            parser.error(f"--modes: unknown {unknown}; known: {', '.join(MODES)}")
        return [m for m in args.modes if m in suite.modes]
    return [m for m in suite.modes if args.preset != "quick" or m in QUICK_MODES]


def _list(args, device) -> None:
    for suite in suites():
        print(
            f"{suite.op} (presets: {', '.join(suite.presets)}; reference: {suite.reference}; "
            f"modes: {', '.join(suite.modes)})"
        )
        for preset in suite.presets:
            print(f"  {preset} on {device.type}: {', '.join(suite.cases(preset, device.type))}")


def _compare(old_path: str, new_path: str, threshold) -> int:
    old_saved, old = load_records(old_path)
    new_saved, new = load_records(new_path)
    changes, only_old, only_new = compare_records(
        old, new, old_saved["environment"].get("device_type", "cpu"), new_saved["environment"].get("device_type", "cpu")
    )
    print(format_comparison(changes, only_old, only_new, old_saved["environment"], new_saved["environment"], threshold))
    return 1 if threshold is not None and regressions(changes, threshold) else 0


def run(args, parser) -> str:
    """Runs the chosen suites; returns the run folder's results.json."""
    device = torch.device(args.device)
    chosen, dtypes = _chosen_suites(parser, args), _dtypes(parser, args, device)
    environment = {**describe_environment(device), "preset": args.preset}
    print(
        f"mmkern bench {args.preset}: {environment['device']}, torch {environment['torch']}, "
        f"{', '.join(str(d).replace('torch.', '') for d in dtypes)}",
        file=sys.stderr,
    )
    compute = list(dict.fromkeys([*dtypes, *(s.compute for s in chosen if s.compute)]))
    ceilings = measure_ceilings(device, compute)
    print(
        "device ceilings: copy {:.1f} GB/s; matrix product {}".format(
            ceilings["copy_gbps"], ", ".join(f"{d} {t:.2f} TFLOP/s" for d, t in ceilings["matmul_tflops"].items())
        )
    )
    budget = args.budget if args.budget is not None else BUDGET_S[args.preset]
    records, refused, notes = [], [], set()
    for suite in chosen:
        names = suite.cases(args.preset, device.type)
        if args.cases is not None:
            names = {n: spec for n, spec in names.items() if n in args.cases}
        modes = _modes(parser, args, suite)
        if not names or not modes:
            continue
        for dtype in dtypes:
            options = ProviderOptions(device, dtype, with_compile=not args.no_compile, notes=notes)
            cases = [suite.make_case(name, spec, dtype) for name, spec in names.items()]
            suite_records = run_cases(
                suite.op,
                cases,
                lambda case: suite.make_providers(case, options),
                device=device,
                dtype=dtype,
                modes=modes,
                reference=suite.reference,
                only=args.providers,
                repeats=args.repeats,
                budget_s=budget,
                refusals=refused,
            )
            attach_fractions(suite_records, ceilings, suite.compute)
            print(f"\n{suite.op}, {str(dtype).replace('torch.', '')}\n{format_table(suite_records)}")
            records.extend(suite_records)
    for note in sorted(notes):
        print(f"note: {note}")
    if args.cases is not None and not records:
        parser.error(f"--cases: none of {args.cases} is a case of the chosen ops (see --list)")
    return _write_run(args, environment, ceilings, records, refused, sorted(notes))


def _write_run(args, environment, ceilings, records, refused, notes) -> str:
    run_dir = os.path.join(args.out, run_folder_name(environment))
    os.makedirs(run_dir, exist_ok=True)
    saved = {
        "environment": environment,
        "preset": args.preset,
        "ceilings": ceilings,
        "refused": refused,
        "notes": notes,
    }
    _, json_path = write_records(records, os.path.join(run_dir, "results"), saved)
    _, as_dicts = load_records(json_path)
    plots = [] if args.no_plots else plot_speedups(as_dicts, os.path.join(run_dir, "plots"))
    report_path = os.path.join(run_dir, "report.md")
    with open(report_path, "w") as handle:
        handle.write(markdown_report({**saved, "records": as_dicts}, plots, run_dir))
    slower = slower_than_baseline(as_dicts)
    if slower:
        print("\nslower than the baseline:\n" + "\n".join(f"  {line}" for line in slower))
    print(f"\nresults: {json_path} (and results.csv); report: {report_path}; {len(plots)} plot(s)")
    return json_path


def _run_host(args, argv) -> int:
    from mmkern import _config
    from mmkern.bench import host

    device = torch.device(args.device)
    if device.type == "cpu" and not _config.TRITON_ON_CPU:
        host.reexec_with_interpreter(argv)  # the GPU path on a CPU: the switch must precede the import
    dtype = getattr(torch, args.dtype[0]) if args.dtype else torch.bfloat16
    environment = {**describe_environment(device), "preset": "host"}
    records, method = host.run(device, dtype)
    print(f"\n{method}\n\n{host.format_table(records)}")
    json_path = host.write_run(records, method, environment, os.path.join(args.out, run_folder_name(environment)))
    print(f"\nresults: {json_path} (and results.csv, report.md)")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.fail_if_regression is not None and not args.compare:
        parser.error("--fail-if-regression needs --compare OLD.json")
    if args.compare and len(args.compare) > 2:
        parser.error("--compare takes OLD.json, or OLD.json NEW.json")
    if args.update_readme:
        changed = update_readme(args.readme, args.results)
        print(f"{args.readme}: performance section {'updated' if changed else 'already up to date'}")
        return 0
    if args.list:
        _list(args, torch.device(args.device))
        return 0
    if args.compare and len(args.compare) == 2:
        return _compare(*args.compare, args.fail_if_regression)
    if args.preset == "host":
        return _run_host(args, sys.argv[1:] if argv is None else argv)
    new_path = run(args, parser)
    return _compare(args.compare[0], new_path, args.fail_if_regression) if args.compare else 0
