"""``mmkern bench --preset host``: the host's cost per call of every op's GPU path, forward and backward,
beside the torch call it replaces, and how many times a call reads tensor data on the host (each one a
device sync on a GPU).

On a GPU it is the CPU time of enqueueing calls back to back, without synchronising. On a CPU it runs
the same GPU path (Triton's launchers, mmkern's launch planning and checks) under the interpreter
switch with Triton's launch replaced by a no-op, so the figure is the host's work alone; the torch
calls beside it run for real on tiny tensors, where their compute is small beside their dispatch.
Each figure is the least CPU time per call over interleaved rounds (the host's noise only adds).
"""

import contextlib
import csv
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from mmkern import _config, reference

ROUNDS = 15
ROUND_S = 0.02  # CPU time per round and call: enough calls that the clock's resolution does not matter


@dataclass
class HostRecord:
    op: str
    mode: str  # "forward" or "backward"
    mmkern_us: float
    reads: int  # host reads of tensor data in one mmkern call
    baseline: str
    baseline_us: float


def stubbed_launches():
    """Triton's interpreted launch replaced by a no-op: what remains is the host's own work."""
    from triton.runtime.interpreter import InterpretedFunction

    return _patched(InterpretedFunction, "run", lambda self, *args, **kwargs: None)


@contextlib.contextmanager
def _patched(owner, name, value):
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


# The Python calls that read a tensor's values on the host: each one waits for the device on a GPU.
_READS = [
    (torch.Tensor, name)
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy", "cpu")
] + [(torch, "equal")]


def count_host_reads(fn) -> int:
    """How many times one call of ``fn`` reads tensor data on the host, by the Python calls that do."""
    count = [0]
    with contextlib.ExitStack() as stack:
        for owner, name in _READS:
            original = getattr(owner, name)

            def counted(*args, _original=original, **kwargs):
                count[0] += 1
                return _original(*args, **kwargs)

            stack.enter_context(_patched(owner, name, counted))
        fn()
    return count[0]


def host_us(fns: dict) -> dict:
    """The least CPU time per call of each of ``fns`` (name: fn), over ROUNDS interleaved rounds."""
    calls = {}
    for name, fn in fns.items():
        for _ in range(5):
            fn()
        begin = time.thread_time()
        fn()
        calls[name] = max(1, min(2000, int(ROUND_S / max(time.thread_time() - begin, 1e-6))))
    best = {name: math.inf for name in fns}
    for _ in range(ROUNDS):
        for name, fn in fns.items():
            begin = time.thread_time()
            for _ in range(calls[name]):
                fn()
            best[name] = min(best[name], (time.thread_time() - begin) / calls[name] * 1e6)
    return best


def _backward_of(forward, leaves):
    """A call of the backward alone: the forward's graph kept, its gradients taken again each call."""
    out = forward()
    grad = torch.randn_like(out)
    return lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True)


@dataclass
class HostCase:
    op: str
    mmkern: object  # the op's forward call
    baseline: object  # torch's call it replaces
    baseline_name: str
    leaves: tuple | None  # (mmkern's, torch's) leaves that need gradients; None: no backward

    def _calls(self, forward, leaves) -> dict:
        calls = {"forward": forward}
        if self.leaves is not None:
            calls["backward"] = _backward_of(forward, leaves)
        return calls

    def mmkern_calls(self) -> dict:
        """mode: a call of the op (the backward's graph built once, here)."""
        return self._calls(self.mmkern, None if self.leaves is None else self.leaves[0])

    def baseline_calls(self) -> dict:
        return self._calls(self.baseline, None if self.leaves is None else self.leaves[1])


def host_cases(device: torch.device, dtype: torch.dtype) -> list:
    """A HostCase per op, on tiny tensors."""
    from mmkern import ops

    def randn(*shape, grad=True):
        return torch.randn(shape, device=device).to(dtype).requires_grad_(grad)

    text, image = randn(2, 16, 64), randn(2, 1, 32)
    weight, bias = randn(48, 96), randn(48)
    q, k, v = randn(2, 16, 4, 32), randn(2, 24, 2, 32), randn(2, 24, 2, 32)
    kv_lens = torch.tensor([24, 13], device=device)
    padding = (torch.arange(24, device=device) < kv_lens[:, None])[:, None, None, :]
    cu_q = torch.tensor([0, 16, 32], device=device, dtype=torch.int32)
    cu_k = torch.tensor([0, 24, 37], device=device, dtype=torch.int32)
    packed_q, packed_k, packed_v = randn(32, 4, 32), randn(37, 2, 32), randn(37, 2, 32)
    quantized = [ops.quantize_per_token(x.detach()) for x in (text, image)]
    weight_q, weight_scale = ops.quantize_per_token(weight.detach())
    inputs_q, scales = [x for x, _ in quantized], [s for _, s in quantized]
    features = [ops.quantize_per_token(randn(2, 16, 64, grad=False)) for _ in range(3)]
    fusion_weights = torch.tensor([0.5, 1.0, -0.25], device=device)

    def sdpa(query, key, value):
        group = query.shape[2] // key.shape[2]
        return F.scaled_dot_product_attention(
            query.transpose(1, 2),
            key.transpose(1, 2).repeat_interleave(group, 1),
            value.transpose(1, 2).repeat_interleave(group, 1),
            attn_mask=padding,
        ).transpose(1, 2)

    cases = [
        (
            "concat_linear",
            lambda: ops.concat_linear([text, image], weight, bias, activation="gelu"),
            lambda: F.gelu(F.linear(torch.cat([text, image.expand(-1, 16, -1)], -1), weight, bias)),
            "cat + linear + gelu",
            ([text, image, weight, bias],) * 2,
        ),
        (
            "cross_modal_attention",
            lambda: ops.cross_modal_attention(q, k, v, kv_lens=kv_lens),
            lambda: sdpa(q, k, v),
            "SDPA, padding mask",
            ([q, k, v],) * 2,
        ),
        (
            "cross_modal_attention_packed",
            lambda: ops.cross_modal_attention_packed(packed_q, packed_k, packed_v, cu_q, cu_k, 16, 24),
            lambda: sdpa(q, k, v),
            "SDPA, padding mask",
            ([packed_q, packed_k, packed_v], [q, k, v]),
        ),
        (
            "quantize_and_concat_linear",
            lambda: ops.quantize_and_concat_linear([text, image], weight, bias),
            lambda: F.linear(torch.cat([text, image.expand(-1, 16, -1)], -1), weight, bias),
            "cat + linear",
            ([text, image, weight, bias],) * 2,
        ),
        (
            "quantized_concat_linear",
            lambda: ops.quantized_concat_linear(inputs_q, scales, weight_q, weight_scale[:, 0], bias, out_dtype=dtype),
            lambda: reference.quantized_concat_linear(
                inputs_q, scales, weight_q, weight_scale[:, 0], bias, out_dtype=dtype
            ),
            "dequantize + cat + linear",
            None,
        ),
        (
            "quantize_per_token",
            lambda: ops.quantize_per_token(text.detach()),
            lambda: reference.quantize_per_token(text.detach()),
            "eager composition",
            None,
        ),
        (
            "quantized_fusion",
            lambda: ops.quantized_fusion(
                [x for x, _ in features], [s for _, s in features], fusion_weights, out_dtype=dtype
            ),
            lambda: reference.quantized_fusion(
                [x for x, _ in features], [s for _, s in features], fusion_weights, out_dtype=dtype
            ),
            "dequantize + weighted sum",
            None,
        ),
    ]
    return [HostCase(*case) for case in cases]


def measure(device: torch.device, dtype: torch.dtype) -> list:
    stub = stubbed_launches() if device.type == "cpu" else contextlib.nullcontext()
    records = []
    with stub:
        for case in host_cases(device, dtype):
            ours, theirs = case.mmkern_calls(), case.baseline_calls()
            for mode in ours:
                times = host_us({"mmkern": ours[mode], "baseline": theirs[mode]})
                records.append(
                    HostRecord(
                        case.op,
                        mode,
                        times["mmkern"],
                        count_host_reads(ours[mode]),
                        case.baseline_name,
                        times["baseline"],
                    )
                )
                print(
                    f"{case.op:30s} {mode:9s} mmkern {times['mmkern']:8.1f} us  reads {records[-1].reads}  "
                    f"{case.baseline_name} {times['baseline']:8.1f} us",
                    file=sys.stderr,
                )
    return records


METHOD_CPU = (
    "CPU time per call (least over {rounds} interleaved rounds) of each op's GPU path, run on a CPU "
    "under MMKERN_TRITON_INTERPRET=1 with Triton's launch a no-op (mmkern's own host work and "
    "Triton's interpreted launcher, no kernel); torch's calls beside it run for real on tiny "
    "tensors. Tiny {dtype} tensors; backward is the gradient call alone on a kept graph."
)
METHOD_CUDA = (
    "CPU time per call (least over {rounds} interleaved rounds) of enqueueing calls back to back on "
    "the GPU without synchronising; tiny {dtype} tensors; backward is the gradient call alone on a "
    "kept graph."
)


def format_table(records: list) -> str:
    lines = [
        "| op | mode | mmkern host us | host reads | torch call | torch host us | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r.op} | {r.mode} | {r.mmkern_us:.1f} | {r.reads} | {r.baseline} | {r.baseline_us:.1f} "
            f"| {r.mmkern_us / r.baseline_us:.2f}x |"
        )
    return "\n".join(lines)


def run(device: torch.device, dtype: torch.dtype) -> tuple:
    """(records, method): on a CPU, needs the interpreter switch (``main`` sets it)."""
    if device.type == "cpu" and not _config.TRITON_ON_CPU:
        raise RuntimeError(
            "the host preset on a CPU runs the GPU path: set MMKERN_TRITON_INTERPRET=1 before "
            "importing mmkern (mmkern bench --preset host does)"
        )
    method = (METHOD_CUDA if device.type == "cuda" else METHOD_CPU).format(
        rounds=ROUNDS, dtype=str(dtype).replace("torch.", "")
    )
    return measure(device, dtype), method


def write_run(records: list, method: str, environment: dict, run_dir: str) -> str:
    """results.json, results.csv and report.md under ``run_dir``; returns the JSON's path."""
    os.makedirs(run_dir, exist_ok=True)
    rows = [asdict(r) for r in records]
    json_path = os.path.join(run_dir, "results.json")
    with open(json_path, "w") as handle:
        json.dump({"environment": environment, "preset": "host", "method": method, "records": rows}, handle, indent=1)
    with open(os.path.join(run_dir, "results.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[*environment, *(rows[0] if rows else ["op"])])
        writer.writeheader()
        writer.writerows({**environment, **row} for row in rows)
    with open(os.path.join(run_dir, "report.md"), "w") as handle:
        handle.write(
            f"# mmkern bench, host preset\n\n{environment['device']}, torch {environment['torch']}, "
            f"Triton {environment['triton']}, mmkern {environment['mmkern']}, {environment['timestamp']}\n\n"
            f"{method}\n\n{format_table(records)}\n"
        )
    return json_path


def reexec_with_interpreter(argv: list) -> None:
    """Runs ``python -m mmkern.bench argv`` again with the interpreter switch, which must be set before
    mmkern is imported; does not return."""
    environment = {**os.environ, "MMKERN_TRITON_INTERPRET": "1"}
    os.execve(sys.executable, [sys.executable, "-m", "mmkern.bench", *argv], environment)
