"""Triton kernels and their launchers, one module per kernel family. Imported lazily by mmkern.ops,
so that mmkern runs on CPU where Triton is not installed."""
