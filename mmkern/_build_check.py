"""Whether the compiled extension can run in this process, decided before it is loaded.

A binary built against another torch release fails to load with an undefined symbol; one built
without code for the GPU fails at the first launch with "no kernel image is available". Checked at
import instead, each mismatch says what was built, what is running, and the command that fixes it.
"""

import os
import re

_SOURCE_TREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _in_source_tree() -> bool:
    return os.path.exists(os.path.join(_SOURCE_TREE, "setup.py"))


def rebuild_command(env: str = "") -> str:
    prefix = f"{env} " if env else ""
    if _in_source_tree():
        return f"{prefix}pip install --no-build-isolation -e {_SOURCE_TREE}"
    return (
        f"{prefix}pip install --no-build-isolation --force-reinstall --no-deps <mmkern source tree>, "
        "or install the mmkern wheel built for this torch"
    )


def not_built_error() -> ImportError:
    return ImportError(
        "mmkern's compiled extension has not been built (there is no mmkern/_build_config.py). "
        f"Build it with `{rebuild_command()}` (torch must be installed first), or run `make test` "
        "from the source tree to set everything up."
    )


def load_error(config, error: Exception) -> ImportError:
    return ImportError(
        f"mmkern {config.VERSION} (built against torch {config.TORCH}, CUDA {config.CUDA or 'none'}) could not "
        f"load its compiled extension mmkern._C: {error}. Rebuild it with `{rebuild_command()}`."
    )


def _minor(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def _major(version: str) -> str:
    return version.split(".")[0]


def target_covers(target: str, capability: tuple) -> bool:
    """Whether code built for ``target`` ("sm_80", "sm_90a", "compute_90") runs on a GPU of
    ``capability``: SASS runs on its own major architecture at the same or a later minor revision
    (an "a" target on that exact GPU only); PTX is compiled by the driver for any later GPU."""
    match = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", target)
    if not match:
        return False
    kind, major, minor, suffix = match.group(1), int(match.group(2)), int(match.group(3)), match.group(4)
    if suffix == "a":
        return tuple(capability) == (major, minor)
    if kind == "compute":
        return tuple(capability) >= (major, minor)
    return capability[0] == major and capability[1] >= minor


def check_build_matches_runtime(config, torch_version: str, torch_cuda: str | None, gpus: list) -> None:
    """Raises ImportError when the extension described by ``config`` (mmkern/_build_config.py)
    cannot run with this torch (``torch_version``, built with ``torch_cuda``) on these ``gpus``."""
    built = f"mmkern {config.VERSION} was built against torch {config.TORCH}" + (
        f" with CUDA {config.CUDA}" if config.CUDA else " without CUDA sources"
    )
    if _minor(config.TORCH) != _minor(torch_version):
        raise ImportError(
            f"{built}, but torch {torch_version} is running; torch's C++ ABI changes between releases, so "
            f"the extension cannot load. Install the mmkern build for torch {_minor(torch_version)}, or "
            f"rebuild: `{rebuild_command()}`."
        )
    if config.CUDA and not torch_cuda:
        raise ImportError(
            f"{built}, but the running torch {torch_version} has no CUDA. Install a CUDA build of torch, or "
            f"build mmkern for CPU only: `{rebuild_command('MMKERN_SKIP_CUDA_BUILD=1')}`."
        )
    if config.CUDA and _major(config.CUDA) != _major(torch_cuda):
        raise ImportError(
            f"{built}, but the running torch {torch_version} uses CUDA {torch_cuda}. Rebuild with a CUDA "
            f"{_major(torch_cuda)}.x toolkit (CUDA_HOME): `{rebuild_command()}`."
        )
    if not config.CUDA_TARGETS:
        return
    uncovered = [gpu for gpu in gpus if not any(target_covers(t, gpu.capability) for t in config.CUDA_TARGETS)]
    if uncovered:
        listed = ", ".join(f"GPU {gpu.index} ({gpu.name}) is {gpu.sm}" for gpu in uncovered)
        arch = ";".join(sorted({f"{gpu.capability[0]}.{gpu.capability[1]}" for gpu in uncovered}))
        raise ImportError(
            f"{built} for {', '.join(config.CUDA_TARGETS)} (MMKERN_CUDA_ARCH_LIST={config.CUDA_ARCH_LIST!r}), "
            f'but {listed}, which none of them runs on (its kernels would fail with "no kernel image is '
            'available"). Rebuild for it: '
            f"`{rebuild_command(f'MMKERN_CUDA_ARCH_LIST={arch};{config.CUDA_ARCH_LIST}')}`, "
            "or hide it from this process with CUDA_VISIBLE_DEVICES."
        )
