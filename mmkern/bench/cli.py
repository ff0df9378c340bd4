"""The command line every benchmarks/bench_<op>.py shares."""

import argparse
import os

import torch

from mmkern.bench.records import format_table, write_results
from mmkern.bench.runner import MODES, run_cases


def benchmark_parser(description: str, results_dir: str, default_modes=MODES) -> argparse.ArgumentParser:
    """--device, --dtype, --cases, --modes, --repeats, --budget, --no-compile and --out."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--cases", default=None, help="comma-separated names; default: all for the device")
    parser.add_argument("--modes", default=",".join(default_modes), help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timing per (case, provider, mode)")
    parser.add_argument("--no-compile", action="store_true", help="leave out providers that torch.compile")
    parser.add_argument("--out", default=os.path.abspath(results_dir))
    return parser


def device_and_dtype(args) -> tuple:
    device = torch.device(args.device)
    return device, getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))


def chosen_cases(parser, args, known: dict, default: dict) -> list:
    """The case names asked for (default: every case of ``default``), each checked to be known."""
    names = args.cases.split(",") if args.cases else list(default)
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(known)}")
    return names


def run_and_report(op: str, cases: list, make_providers, args, device: torch.device, dtype: torch.dtype,
                   environment: dict, notes=(), **run_options) -> list:
    """Times ``cases`` (``run_cases`` with the command line's modes, repeats and budget unless
    ``run_options`` say otherwise), appends the figures to ``args.out`` and prints the table."""
    options = dict(modes=args.modes.split(","), repeats=args.repeats, budget_s=args.budget)
    records = run_cases(op, cases, make_providers, device=device, dtype=dtype, **{**options, **run_options})
    csv_path, json_path = write_results(records, environment, args.out, op)
    print(f"\n{op}: {environment['device']} | {dtype} | torch {environment['torch']} | {environment['timestamp']}")
    print(format_table(records))
    for note in sorted(notes):
        print(f"note: {note}")
    print(f"\nrows appended to {csv_path}; this run in {json_path}")
    return records
