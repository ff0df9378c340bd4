"""``make kernel-audit`` (``python -m mmkern.bench.audit``): every production Triton launch of the
benchmark's cases, compiled for sm_90 (and sm_80) on a machine with no GPU, and what the machine code
says about it.

1. Capture (a child process under ``MMKERN_TRITON_INTERPRET=1``, so CPU tensors reach the launchers):
   each case's mmkern call, forward and backward, runs with every launch recorded instead of run (its
   kernel, grid and arguments) and the tile functions taking their GPU branches, as for a 132-SM H100.
2. Compile (this process, Triton's JIT): each launch bound as the JIT binds it (tensors by dtype and
   16-byte alignment, ints by their ==1 and %16 specialisations) and compiled for the target by
   ``kernel.warmup`` against a stand-in driver; nothing runs.
3. Read: ``cuobjdump --dump-resource-usage`` (registers, stack, local memory, shared memory) and the
   SASS (warpgroup MMA, HGMMA/IGMMA, against HMMA/IMMA; TMA loads, UTMALDG; async copies, LDGSTS;
   spill traffic, LDL/STL), with CTAs per SM and waves on 132 SMs from them.

The table goes to ``benchmarks/audit/<target>.md`` (and .json); ``INVARIANTS`` are what
``tests/test_kernel_audit.py`` holds every production launch to.
"""

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import torch

KERNEL_MODULES = (
    "mmkern.kernels.segmented_matmul",
    "mmkern.kernels.cross_modal_attention",
    "mmkern.kernels.quantized_fusion",
)
AUDITED_OPS = (
    "concat_linear",
    "quantized_concat_linear",
    "quantize_per_token",
    "quantized_fusion",
    "cross_modal_attention",
)
MULTIPROCESSORS = 132  # an H100 SXM's (the H200 has as many)
# Per SM on sm_80/sm_90: registers, shared memory (bytes, with the 1 KiB each CTA reserves), warps, CTAs.
SM_LIMITS = {80: (65536, 167936, 64, 32), 90: (65536, 233472, 64, 32)}
MAX_SHARED_PER_CTA = {80: 166912, 90: 232448}


# -- 1. capture ---------------------------------------------------------------------------------------


class _Recorder:
    """Stands in for ``traceable(kernel)``: ``[grid](*args, **kwargs)`` records the launch."""

    launches: list = []

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            _Recorder.launches.append((self.kernel, tuple(grid), args, kwargs))

        return launch


def _spec(value):
    """A launch argument as JSON: tensors by what the JIT sees of them."""
    if isinstance(value, torch.Tensor):
        return {
            "tensor": str(value.dtype).replace("torch.", ""),
            "offset_bytes": value.storage_offset() * value.element_size(),
        }
    if type(value).__name__ == "TensorDescriptor":  # a TMA operand: what the JIT sees is its dtype and block
        return {"descriptor": str(value.base.dtype).replace("torch.", ""), "block": list(value.block_shape)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if type(value).__module__.startswith("triton"):  # a tl.dtype constexpr
        return {"tl": str(value)}
    raise TypeError(f"launch argument of type {type(value).__name__}")


@contextlib.contextmanager
def _gpu_planning(capability: int):
    """Launches recorded instead of run, and planned as on a GPU of ``capability`` (tiles' GPU branches,
    no cached plans)."""
    import importlib
    import types

    from mmkern.kernels import launch, tiles

    modules = [importlib.import_module(name) for name in KERNEL_MODULES]
    saved = [(module, module.traceable) for module in modules] + [(tiles, tiles._config)]
    for module in modules:
        module.traceable = _Recorder
    planned_for, launch.INTERPRETER_CAPABILITY = launch.INTERPRETER_CAPABILITY, capability
    tiles._config = types.SimpleNamespace(TRITON_ON_CPU=False)
    tiles._default_gemm_tile.cache_clear()
    try:
        with tiles.use_table({}):  # no GPU table, and cached launch plans bypassed
            yield
    finally:
        for module, value in saved[:-1]:
            module.traceable = value
        tiles._config = saved[-1][1]
        launch.INTERPRETER_CAPABILITY = planned_for
        tiles._default_gemm_tile.cache_clear()


def _kernel_name(kernel) -> str:
    import importlib

    for name in KERNEL_MODULES:
        module = importlib.import_module(name)
        for attribute, value in vars(module).items():
            if value is kernel:
                return f"{name}:{attribute}"
    raise LookupError(f"launch of a kernel outside {KERNEL_MODULES}")


def capture(preset: str, dtype: torch.dtype, ops=AUDITED_OPS, cases=None, capability: int = 90) -> list:
    """The launches of each case's mmkern call of the chosen ops, forward then backward (run under the
    interpreter switch), planned for a GPU of ``capability``: [{"op", "case", "mode", "kernel", "grid",
    "args", "kwargs"}]."""
    from mmkern import _config
    from mmkern.bench.runner import _leaves
    from mmkern.bench.suite import ProviderOptions, suites

    if not _config.TRITON_ON_CPU:
        raise RuntimeError("capture runs under MMKERN_TRITON_INTERPRET=1 (CPU tensors to the launchers)")
    cpu = torch.device("cpu")
    records = []
    for suite in suites():
        if suite.op not in ops:
            continue
        for name, spec in suite.cases(preset, "cuda").items():
            if cases is not None and name not in cases:
                continue
            case = suite.make_case(name, spec, dtype)
            fn = suite.make_providers(case, ProviderOptions(cpu, dtype, with_compile=False))["mmkern"]
            args = case.make_args(cpu, dtype)
            with _gpu_planning(capability):
                for mode in ("forward", "backward") if "forward+backward" in suite.modes else ("forward",):
                    _Recorder.launches = []
                    if mode == "forward":
                        out = fn(*args)
                    else:
                        torch.autograd.grad(out, _leaves(args), torch.ones_like(out), allow_unused=True)
                    for kernel, grid, launch_args, kwargs in _Recorder.launches:
                        records.append(
                            {
                                "op": suite.op,
                                "case": name,
                                "mode": mode,
                                "kernel": _kernel_name(kernel),
                                "grid": list(grid),
                                "args": [_spec(a) for a in launch_args],
                                "kwargs": {k: _spec(v) for k, v in kwargs.items()},
                            }
                        )
    return records


def capture_in_child(preset: str, dtype: torch.dtype, ops=AUDITED_OPS, cases=None, capability: int = 90) -> list:
    """``capture`` in a child process with the interpreter switch on (this one keeps compiled kernels)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "launches.json")
        command = [
            sys.executable,
            "-m",
            "mmkern.bench.audit",
            "--capture-only",
            path,
            "--preset",
            preset,
            "--dtype",
            str(dtype).replace("torch.", ""),
            "--ops",
            ",".join(ops),
            "--targets",
            str(capability),
        ]
        if cases is not None:
            command += ["--cases", ",".join(cases)]
        subprocess.run(command, check=True, env={**os.environ, "MMKERN_TRITON_INTERPRET": "1"})
        with open(path) as handle:
            return json.load(handle)


# -- 2. compile ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def compile_target(capability: int):
    """Triton's driver replaced by one that reports a CUDA target of ``capability`` (90: sm_90)."""
    import triton
    from triton.backends.compiler import GPUTarget

    class CompileOnlyDriver:
        def get_current_target(self):
            return GPUTarget("cuda", capability, 32)

        def get_current_device(self):
            # The target as the device: the JIT caches compiles per device, and a compile for one target
            # must not be reused for another.
            return capability

        def get_current_stream(self, device=None):
            return 0

        def get_device_interface(self):
            return torch.cuda

    slot = "_active" if hasattr(triton.runtime.driver, "_active") else "active"
    previous = getattr(triton.runtime.driver, slot)
    setattr(triton.runtime.driver, slot, CompileOnlyDriver())
    try:
        yield
    finally:
        setattr(triton.runtime.driver, slot, previous)


def _argument(spec):
    """A launch argument back from its spec: a tensor whose data pointer has the recorded alignment."""
    import triton.language as tl

    if isinstance(spec, dict) and "tensor" in spec:
        dtype = getattr(torch, spec["tensor"])
        offset = spec["offset_bytes"] // torch.empty((), dtype=dtype).element_size()
        return torch.empty(offset + 1, dtype=dtype)[offset:]
    if isinstance(spec, dict) and "descriptor" in spec:
        from triton.tools.tensor_descriptor import TensorDescriptor

        block = spec["block"]
        return TensorDescriptor.from_tensor(torch.empty(block, dtype=getattr(torch, spec["descriptor"])), block)
    if isinstance(spec, dict) and "tl" in spec:
        return tl.dtype(spec["tl"])
    return spec


def compile_launch(launch: dict):
    """The CompiledKernel of a captured launch, for the current compile_target."""
    import importlib

    module, attribute = launch["kernel"].split(":")
    kernel = getattr(importlib.import_module(module), attribute)
    args = [_argument(a) for a in launch["args"]]
    kwargs = {k: _argument(v) for k, v in launch["kwargs"].items()}
    return kernel.warmup(*args, grid=tuple(launch["grid"]), **kwargs)


# -- 3. read ------------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


SASS_COUNTS = {
    "warpgroup_mma": r"\b[HI]GMMA\b",
    "mma": r"\b[HI]MMA\b",
    "tma": r"\bUTMALDG\b|\bUBLKCP\b",
    "async_copy": r"\bLDGSTS\b",
    "spill_loads": r"\bLDL\b",
    "spill_stores": r"\bSTL\b",
}


def machine_code(cubin: bytes) -> dict:
    """Resource usage and instruction counts of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        usage = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", handle.name], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run(
            [_tool("cuobjdump"), "--dump-sass", handle.name], capture_output=True, text=True, check=True
        ).stdout
    fields = {key.lower(): int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    counts = {name: len(re.findall(pattern, sass)) for name, pattern in SASS_COUNTS.items()}
    return {
        "registers": fields.get("reg", 0),
        "stack": fields.get("stack", 0),
        "local": fields.get("local", 0),
        "static_shared": fields.get("shared", 0),
        **counts,
    }


@dataclass
class Audited:
    op: str
    case: str
    mode: str
    kernel: str
    tile: str
    warps: int
    stages: int
    grid_ctas: int
    registers: int
    spilled_bytes: int  # stack and local memory per thread (Triton's kernels use them only to spill)
    shared_bytes: int
    ctas_per_sm: int
    waves: float | None  # None: no CTA fits an SM
    warpgroup_mma: int
    mma: int
    tma: int
    async_copy: int
    spill_loads: int
    spill_stores: int
    dot_rows: int  # the largest BLOCK_M (rows of a dot tile), 0 for kernels without one
    error: str = ""  # why the launch did not compile, if it did not


def ctas_per_sm(registers: int, warps: int, shared: int, capability: int) -> int:
    """Resident CTAs per SM: the least of what registers (allocated per warp in 256s), shared memory
    (with the 1 KiB per CTA the hardware keeps), warps and the CTA limit allow."""
    sm_registers, sm_shared, sm_warps, sm_ctas = SM_LIMITS[capability]
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_registers = sm_registers // (per_warp * warps)
    by_shared = sm_shared // (shared + 1024) if shared else sm_ctas
    return max(0, min(by_registers, by_shared, sm_warps // warps, sm_ctas))


def audit(launches: list, capability: int = 90) -> list:
    """One Audited per distinct (kernel, specialisation, grid) launch, in capture order."""
    rows, seen = [], set()
    with compile_target(capability):
        for launch in launches:
            key = json.dumps([launch["kernel"], launch["grid"], launch["args"], launch["kwargs"]], sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            kwargs = launch["kwargs"]
            warps, stages = kwargs.get("num_warps", 4), kwargs.get("num_stages", 3)
            try:
                compiled = compile_launch(launch)
            except Exception as failure:  # noqa: BLE001 - a launch that does not compile is a finding
                message = " ".join(str(failure).split())[-300:]
                code, shared = {k: 0 for k in ("registers", "stack", "local", *SASS_COUNTS)}, 0
                error = f"{type(failure).__name__}: {message}"
            else:
                code, shared, error = machine_code(compiled.asm["cubin"]), compiled.metadata.shared, ""
            resident = ctas_per_sm(code["registers"], warps, shared, capability)
            ctas = 1
            for extent in launch["grid"]:
                ctas *= extent
            tile = "x".join(str(kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in kwargs) or str(
                kwargs.get("BLOCK", "")
            )
            rows.append(
                Audited(
                    op=launch["op"],
                    case=launch["case"],
                    mode=launch["mode"],
                    kernel=launch["kernel"].split(":")[1],
                    tile=tile,
                    warps=warps,
                    stages=stages,
                    grid_ctas=ctas,
                    registers=code["registers"],
                    spilled_bytes=code["stack"] + code["local"],
                    shared_bytes=shared,
                    ctas_per_sm=resident,
                    waves=round(ctas / (MULTIPROCESSORS * resident), 2) if resident else None,
                    warpgroup_mma=code["warpgroup_mma"],
                    mma=code["mma"],
                    tma=code["tma"],
                    async_copy=code["async_copy"],
                    spill_loads=code["spill_loads"],
                    spill_stores=code["spill_stores"],
                    dot_rows=kwargs.get("BLOCK_M", 0) if (code["warpgroup_mma"] or code["mma"]) else 0,
                    error=error,
                )
            )
    return rows


# -- invariants ---------------------------------------------------------------------------------------


def violations(row: Audited, capability: int = 90) -> list:
    """What a launch breaks of the invariants every production launch is held to:
    - it compiles;
    - no spills (no stack or local memory, no LDL/STL);
    - shared memory within the device's per-CTA limit, and at least one CTA resident per SM;
    - on sm_90, warpgroup MMA (HGMMA/IGMMA) for every dot tile of 64 rows or more run by 4 warps or more
      (the older HMMA path there leaves most of Hopper's tensor cores idle)."""
    if row.error:
        return [f"does not compile ({row.error[:200]})"]
    broken = []
    if row.spilled_bytes or row.spill_loads or row.spill_stores:
        broken.append(f"spills ({row.spilled_bytes} B per thread, {row.spill_loads} LDL, {row.spill_stores} STL)")
    if row.shared_bytes > MAX_SHARED_PER_CTA[capability] or row.ctas_per_sm < 1:
        broken.append(f"shared memory {row.shared_bytes} B (limit {MAX_SHARED_PER_CTA[capability]})")
    if capability >= 90 and row.dot_rows >= 64 and row.warps >= 4 and row.mma and not row.warpgroup_mma:
        broken.append(f"HMMA/IMMA, not warpgroup MMA, for a {row.dot_rows}-row dot tile")
    return broken


# -- the table ----------------------------------------------------------------------------------------


def markdown(rows: list, capability: int, environment: dict) -> str:
    lines = [
        f"# Kernel audit, sm_{capability}",
        "",
        f"Every production launch of the benchmark's cases, compiled for sm_{capability} without a GPU "
        f"(`make kernel-audit`); Triton {environment['triton']}, torch {environment['torch']}, "
        f"{environment['timestamp'][:10]}. CTAs per SM from registers, shared memory and warps; waves on "
        f"{MULTIPROCESSORS} SMs. MMA: warpgroup (HGMMA/IGMMA) / older (HMMA/IMMA) instructions.",
        "",
        "| op | case | mode | kernel | tile | warps/stages | CTAs | regs | spill B | shared KiB | CTAs/SM | waves "
        "| MMA wg/old | TMA | LDGSTS | breaks |",
        "|---" * 16 + "|",
    ]
    for r in rows:
        broken = "; ".join(violations(r, capability))
        lines.append(
            f"| {r.op} | {r.case} | {r.mode} | {r.kernel} | {r.tile} | {r.warps}/{r.stages} | {r.grid_ctas} "
            f"| {r.registers} | {r.spilled_bytes} | {r.shared_bytes / 1024:.1f} | {r.ctas_per_sm} | {r.waves} "
            f"| {r.warpgroup_mma}/{r.mma} | {r.tma} | {r.async_copy} | {broken} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmkern.bench.audit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="full", choices=("quick", "full"))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--ops", default=",".join(AUDITED_OPS))
    parser.add_argument("--cases", default=None)
    parser.add_argument("--targets", default="90,80", help="compute capabilities, e.g. 90,80")
    parser.add_argument("--out", default=os.path.join("benchmarks", "audit"))
    parser.add_argument("--capture-only", default=None, metavar="LAUNCHES.json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    dtype, ops = getattr(torch, args.dtype), tuple(args.ops.split(","))
    cases = None if args.cases is None else set(args.cases.split(","))
    if args.capture_only:
        with open(args.capture_only, "w") as handle:
            json.dump(capture(args.preset, dtype, ops, cases, int(args.targets.split(",")[0])), handle)
        return 0
    from mmkern.bench.records import describe_environment

    environment = describe_environment(torch.device("cpu"))
    os.makedirs(args.out, exist_ok=True)
    for capability in (int(t) for t in args.targets.split(",")):
        # Each target's own capture: launches are planned per capability (Hopper's tiles and TMA).
        rows = audit(capture_in_child(args.preset, dtype, ops, cases, capability), capability)
        stem = os.path.join(args.out, f"sm{capability}")
        with open(stem + ".md", "w") as handle:
            handle.write(markdown(rows, capability, environment))
        with open(stem + ".json", "w") as handle:
            json.dump(
                {"environment": environment, "capability": capability, "rows": [asdict(r) for r in rows]},
                handle,
                indent=1,
            )
        broken = [r for r in rows if violations(r, capability)]
        print(f"sm_{capability}: {len(rows)} launches, {len(broken)} breaking an invariant; {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
