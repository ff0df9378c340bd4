"""Integrations of mmkern's kernels into other libraries' models."""
