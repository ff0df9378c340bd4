"""The D=40/Dv=24 experiments the GPU kit runs first: every experiment runs, forward and backward, and on
CPU (the C++ kernels, or the Triton kernels through the interpreter with the forced tiles) each is
right, so a GPU run that says WRONG points at the GPU's code generation."""

import torch

from mmkern.bench import attention_experiments


def test_every_experiment_runs_and_is_right_off_the_gpu():
    lines = attention_experiments.run(torch.float16, torch.device("cpu"))
    assert len(lines) == len(attention_experiments.experiments()) == 9
    assert all(" right " in line and "WRONG" not in line for line in lines), lines
