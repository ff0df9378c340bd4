"""``mmkern tune`` (``python -m mmkern.bench.tune``): the tuning sweep that writes a GPU model's tile table.

1. The plan: every benchmark case of the chosen ops and dtypes runs mmkern once (forward, and backward
   where the op has one) with the tile functions watched, which gives each kernel family's shape
   classes (``tiles.shape_class``) and the first case and mode that reaches each.
2. For each shape class, in turn, while the budget lasts: the family's candidate tiles (the shape-only
   default first) run that case with the candidate forced on that class alone. A candidate whose output
   or gradients disagree with the case's reference, or that fails to compile or launch (too much shared
   memory, say), is dropped; the others are timed together, device time in interleaved rounds.
3. The table: an entry per class where the fastest candidate beats the default by more than MARGIN
   (else the default stays, and the table says so), written to ``mmkern/kernels/tuned/<gpu>.json`` (or
   ``--out``), which ``mmkern.kernels.tiles`` reads on that GPU model. Nothing is tuned at run time.

It runs mmkern's GPU path: on CUDA, or on a CPU through Triton's interpreter (``MMKERN_TRITON_INTERPRET=1``,
where it plans and checks with the interpreter's small candidates; its timings say nothing about a GPU).
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace

import torch

from mmkern import _config
from mmkern.bench.records import describe_environment
from mmkern.bench.runner import AGREEMENT, _disagreement, _leaves, _results, mode_steps
from mmkern.bench.suite import ProviderOptions, suites
from mmkern.bench.timing import time_calls
from mmkern.kernels import tiles
from mmkern.kernels.tiles import AttentionTile, GemmTile

# The ops whose mmkern kernels take a tile family.
TUNED_OPS = ("concat_linear", "quantized_concat_linear", "cross_modal_attention")
# A candidate replaces the default only when this much faster (timing noise must not flip a table).
MARGIN = 0.03


@dataclass
class Target:
    """A shape class of a family, and the (suite, case, dtype, mode) that reaches it first."""

    family: str
    key: str
    suite: object
    case: object
    dtype: torch.dtype
    mode: str
    args: tuple  # the tile function's arguments, the first time the class was reached
    cases: list = field(default_factory=list)  # every case name that reaches it


def _watching(seen: list):
    """Overrides that record every tile choice and keep the default."""
    stack = contextlib.ExitStack()
    for family in tiles.FAMILIES:
        stack.enter_context(tiles.override(family, lambda *args, family=family: seen.append((family, args))))
    return stack


def plan(chosen: list, dtypes: list, device: torch.device, preset: str) -> list:
    """The Targets of ``chosen`` suites' cases of ``preset`` on ``device``, in ``dtypes``."""
    targets = {}
    for suite in chosen:
        for dtype in dtypes:
            for name, spec in suite.cases(preset, device.type).items():
                case = suite.make_case(name, spec, dtype)
                mmkern_fn = suite.make_providers(case, ProviderOptions(device, dtype, with_compile=False))["mmkern"]
                args = case.make_args(device, dtype)
                for mode in ("forward", "forward+backward") if "forward+backward" in suite.modes else ("forward",):
                    seen = []
                    with _watching(seen):
                        out = mmkern_fn(*args)
                        if mode != "forward":
                            torch.autograd.grad(out, _leaves(args), torch.ones_like(out), allow_unused=True)
                    for family, family_args in seen:
                        key = tiles.shape_class(family, *family_args)
                        if key is None:
                            continue
                        target = targets.setdefault(
                            (family, key), Target(family, key, suite, case, dtype, mode, family_args)
                        )
                        if name not in target.cases:
                            target.cases.append(name)
                del args
    return list(targets.values())


def _default(target: Target):
    """The shape-only tile of the target (no override, no table)."""
    function = {
        "gemm": tiles.gemm_tile,
        "attention_forward": tiles.attention_forward_tile,
        "attention_backward": tiles.attention_backward_tile,
        "attention_backward_kv": tiles.attention_backward_kv_tile,
    }[target.family]
    with tiles.use_table({}):
        return function(*target.args)


def candidates(target: Target) -> list:
    """The family's candidate tiles for the target, its default first; through the interpreter, the
    default and one other small tile."""
    default = _default(target)
    if _config.TRITON_ON_CPU:
        if target.family == "gemm":
            others = [GemmTile(32, 32, 16, 4, 1, 1)]
        else:
            others = [AttentionTile(32, 32, 1, 1)]
    elif target.family == "gemm":
        m, n, _, dtype, _, capability = target.args
        block_k = default.block_k
        shapes = [(64, 64), (64, 128), (128, 64), (128, 128), (128, 256), (256, 128)]
        if dtype in (torch.float32, torch.float64):
            shapes = [(32, 32), (32, 64), (64, 32), (64, 64), (64, 128), (128, 64)]
        others = [
            GemmTile(bm, bn, block_k, 8, warps, stages, tma)
            for bm, bn in shapes
            if bm <= max(16, tiles.power_of_2_at_least(m, 16, 256))
            and bn <= max(32, tiles.power_of_2_at_least(n, 32, 256))
            for warps in (4, 8)
            for stages in (3, 4)
            for tma in ((False, True) if capability >= 90 and dtype != torch.float64 else (False,))
        ]
    else:
        # (rows, d_pad, dv_pad, dtype, capability) for the forward, (d_pad, dv_pad, dtype, ...) for the others.
        d_pad, dv_pad, dtype = target.args[1:4] if target.family == "attention_forward" else target.args[:3]
        wide = max(d_pad, dv_pad)
        blocks = (
            [(64, 32), (64, 64), (128, 32), (128, 64), (128, 128)] if wide <= 128 else [(32, 32), (64, 32), (64, 64)]
        )
        if target.family == "attention_backward":
            blocks = [(32, 32), (64, 32), (32, 64), (64, 64), (128, 64)] if wide <= 128 else [(32, 32), (64, 32)]
        if target.family == "attention_backward_kv":  # (queries a step, keys a program)
            blocks = (
                [(16, 64), (32, 64), (64, 64), (16, 128), (32, 128), (64, 128)] if wide <= 128 else [(16, 64), (32, 64)]
            )
        if dtype in (torch.float32, torch.float64):
            blocks = [(bm // 2, bn // 2) for bm, bn in blocks]
        stages = (1, 2, 3) if target.family.startswith("attention_backward") else (2, 3, 4)
        others = [AttentionTile(bm, bn, warps, st) for bm, bn in blocks for warps in (4, 8) for st in stages]
    if target.family == "gemm" and default.tma:
        # A persistent grid costs the audit's 128-row tiles 18-65 registers (a CTA per SM fewer for
        # some), which only a measurement can say whether it earns back: one candidate per class.
        others.append(replace(default, persistent=True))
    return [default] + [tile for tile in dict.fromkeys(others) if tile != default]


def _forced(target: Target, tile):
    """An override that gives ``tile`` to the target's class and the table's or default tile elsewhere."""
    return tiles.override(
        target.family, lambda *args: tile if tiles.shape_class(target.family, *args) == target.key else None
    )


def _with_tile(fn, target, tile):
    def call(*args):
        with _forced(target, tile):
            return fn(*args)

    return call


def checked(target: Target, tile_list: list, device: torch.device, deadline: float = math.inf) -> tuple:
    """(the candidates whose output and gradients match the case's reference, {tile: why it was dropped});
    candidates after ``deadline`` (a time.perf_counter() value) are not tried (each is a compile)."""
    suite, case, dtype = target.suite, target.case, target.dtype
    providers = suite.make_providers(case, ProviderOptions(device, dtype, with_compile=False))
    reference = providers[case.params.get("reference", suite.reference)]
    args = case.make_args(device, dtype)
    with_grads = target.mode != "forward"
    expected, grad_out = _results(reference, args, with_grads)
    kept, dropped = [], {}
    for index, tile in enumerate(tile_list):
        if index > 0 and time.perf_counter() > deadline:
            break
        try:
            actual, _ = _results(_with_tile(providers["mmkern"], target, tile), args, with_grads, grad_out)
        except Exception as failure:  # noqa: BLE001 - a tile that cannot compile or launch is a tile to drop
            dropped[tile] = f"fails: {type(failure).__name__}: {str(failure).splitlines()[0][:120]}"
            continue
        errors = [
            0.0 if (a is None and e is None) else math.inf if (a is None) != (e is None) else _disagreement(a, e)
            for a, e in zip(actual, expected)
        ]
        if max(errors) > AGREEMENT[dtype]:
            dropped[tile] = f"disagrees with the reference (relative error {max(errors):.2e})"
        else:
            kept.append(tile)
    return kept, dropped


def timed(target: Target, tile_list: list, device: torch.device, repeats: int, budget_s: float) -> dict:
    """{tile: device median ms} of the target's case and mode with each tile forced, timed together."""
    suite, case, dtype = target.suite, target.case, target.dtype
    fn = suite.make_providers(case, ProviderOptions(device, dtype, with_compile=False))["mmkern"]
    arg_sets = [case.make_args(device, dtype, seed=seed) for seed in range(2)]
    calls = {tile: mode_steps(_with_tile(fn, target, tile), arg_sets, target.mode) for tile in tile_list}
    stats = time_calls(calls, device, warmup=1, repeats=repeats, budget_s=budget_s)
    return {tile: s.median_ms for tile, s in stats.items()}


def sweep(
    targets: list, device: torch.device, budget_s: float, repeats: int = 10, log=print, start=None, progress=None
) -> dict:
    """The table (a dict as tiles.use_table takes it) from timing each target's candidates; stops
    starting targets once ``budget_s`` from ``start`` (a time.perf_counter() value; default now) is
    spent, and says which it left. ``progress(table)`` is called after each target, so a sweep cut
    short keeps what it measured."""
    environment = describe_environment(device)
    families = {family: {} for family in tiles.FAMILIES}
    table = {
        "gpu": environment["device"],
        "environment": environment,
        "budget_s": budget_s,
        "families": families,
        "kept_default": {},
        "dropped": {},
        "left_out": [f"{t.family} {t.key}" for t in targets],
    }
    start = time.perf_counter() if start is None else start
    for index, target in enumerate(targets):
        left = budget_s - (time.perf_counter() - start)
        if left <= 0:
            log(f"budget spent: {len(table['left_out'])} shape class(es) left untuned")
            break
        table["left_out"] = table["left_out"][1:]
        # Each remaining target gets an equal share of what is left: half to check candidates, half to time them.
        share = left / (len(targets) - index)
        tile_list = candidates(target)
        kept, dropped = checked(target, tile_list, device, deadline=time.perf_counter() + share / 2)
        label = f"{target.family} {target.key}"
        if dropped:
            table["dropped"][label] = {str(tiles.tile_entry(t)): why for t, why in dropped.items()}
        default = tile_list[0]
        if default not in kept:
            raise RuntimeError(
                f"{label}: the default tile fails its own check ({dropped.get(default)}); "
                "that is a kernel bug, not a tuning result"
            )
        medians = timed(target, kept, device, repeats, budget_s=share / (2 * len(kept)))
        best = min(kept, key=medians.get)
        summary = {
            "case": target.case.name,
            "dtype": str(target.dtype).replace("torch.", ""),
            "mode": target.mode,
            "cases": target.cases,
            "default": tiles.tile_entry(default),
            "default_ms": medians[default],
            "candidates": len(tile_list),
            "timed": len(kept),
        }
        untried = len(tile_list) - len(kept) - len(dropped)
        if best != default and medians[best] < (1 - MARGIN) * medians[default]:
            families[target.family][target.key] = {
                "tile": tiles.tile_entry(best),
                "median_ms": medians[best],
                **summary,
            }
            log(
                f"{label}: {best} {medians[best]:.4f} ms, default {medians[default]:.4f} ms "
                f"({medians[default] / medians[best]:.2f}x; {len(kept)} of {len(tile_list)} candidates timed)"
            )
        else:
            table["kept_default"][label] = summary
            log(f"{label}: default kept ({medians[default]:.4f} ms; {len(kept)} of {len(tile_list)} timed)")
        if untried:
            log(f"{label}: {untried} candidate(s) not tried in its share of the budget")
        if progress is not None:
            progress(table)
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmkern tune", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget", type=float, default=180.0, help="seconds for the whole sweep (default 180)")
    parser.add_argument("--ops", default=",".join(TUNED_OPS), help=f"comma-separated, of {', '.join(TUNED_OPS)}")
    parser.add_argument("--dtype", default=None, help="comma-separated (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument(
        "--preset", default="full", choices=("quick", "full"), help="whose cases give the shape classes (default: full)"
    )
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: the preset's)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="the table's path (default: mmkern/kernels/tuned/<gpu>.json)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" and not _config.TRITON_ON_CPU:
        parser.error("the sweep runs mmkern's GPU path: on a CUDA device, or on a CPU with MMKERN_TRITON_INTERPRET=1")
    if device.type != "cuda" and args.out is None:
        parser.error(
            "--out: through the interpreter the timings say nothing about a GPU, so no GPU's table is "
            "written; name the file"
        )
    ops = args.ops.split(",")
    unknown = sorted(set(ops) - set(TUNED_OPS))
    if unknown:
        parser.error(f"--ops: unknown {unknown}; the tuned ops are {', '.join(TUNED_OPS)}")
    dtypes = [
        getattr(torch, name) for name in (args.dtype or ("bfloat16" if device.type == "cuda" else "float32")).split(",")
    ]
    chosen = [s for s in suites() if s.op in ops]
    if args.cases is not None:
        names = set(args.cases.split(","))
        chosen = [_only_cases(s, names) for s in chosen]
    start = time.perf_counter()  # the budget covers the plan too
    targets = plan(chosen, dtypes, device, args.preset)
    if not targets:
        parser.error("no shape class to tune: the chosen cases reach no tile family")
    print(
        f"mmkern tune: {len(targets)} shape classes, budget {args.budget:g} s "
        f"({time.perf_counter() - start:.0f} s of it to plan)",
        file=sys.stderr,
    )
    path = args.out or tiles.table_path(describe_environment(device)["device"])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(table):
        table["written"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        with open(path, "w") as handle:
            json.dump(table, handle, indent=1, sort_keys=True)

    table = sweep(targets, device, args.budget, args.repeats, start=start, progress=write)
    write(table)
    tuned = sum(len(entries) for entries in table["families"].values())
    print(
        f"table: {path} ({tuned} tuned class(es), {len(table['kept_default'])} kept the default, "
        f"{len(table['left_out'])} left out)"
    )
    return 0


def _only_cases(suite, names: set):
    def cases(preset, device_type):
        return {n: spec for n, spec in suite.cases(preset, device_type).items() if n in names}

    return replace(suite, cases=cases)


if __name__ == "__main__":
    sys.exit(main())
