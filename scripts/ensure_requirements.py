"""Installs into the running interpreter whichever of mmkern's build, test and benchmark requirements
it lacks, and nothing else: a GPU machine with torch already installed and no internet then needs
nothing from pip, and a fresh machine gets what it needs in at most two pip calls."""

import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys

MIN_TORCH = (2, 6)
# Triton before 3.7 reads scalars in its interpreter with int(array), which numpy 2.4 refuses.
TRITON_WITH_NUMPY_2_4_INTERPRETER = (3, 7)


def _version(distribution: str):
    try:
        return tuple(int(part) for part in importlib.metadata.version(distribution).split("+")[0].split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def _install(specs: list) -> None:
    print(f"requirements: installing {' '.join(specs)}", flush=True)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", *specs])


def main() -> int:
    torch_version = _version("torch")
    if torch_version is None or torch_version < MIN_TORCH:
        _install([f"torch>={'.'.join(map(str, MIN_TORCH))}"])

    missing = [
        spec
        for module, spec in (
            ("setuptools", "setuptools>=64"),
            ("wheel", "wheel"),
            ("pytest", "pytest>=7"),
            ("hypothesis", "hypothesis"),
            ("tqdm", "tqdm"),
        )
        if importlib.util.find_spec(module) is None
    ]
    if shutil.which("ninja") is None and importlib.util.find_spec("ninja") is None:
        missing.append("ninja")
    triton_version = _version("triton")
    old_interpreter = triton_version is not None and triton_version < TRITON_WITH_NUMPY_2_4_INTERPRETER
    numpy_version = _version("numpy")
    if numpy_version is None or (old_interpreter and numpy_version >= (2, 4)):
        missing.append("numpy<2.4" if old_interpreter else "numpy")
    if missing:
        _install(missing)
    else:
        print("requirements: all present", flush=True)
    _install_optional([spec for module, spec in OPTIONAL if importlib.util.find_spec(module) is None])
    if not _ruff_is_pinned():
        _install_optional([f"ruff=={RUFF}"])
    if importlib.util.find_spec("open_clip") is None:
        # open_clip needs torchvision: the installed torch is named beside it, so that pip takes the
        # torchvision built for it (or gives up) rather than replacing torch.
        _install_optional([OPEN_CLIP, f"torch=={importlib.metadata.version('torch')}"])
    return 0


# The digits task (scikit-learn's bundled images), the Hugging Face backend's tests, the benchmark
# report's plots and pytest-benchmark. Best effort: an offline GPU machine without them still builds
# and runs every other test.
OPTIONAL = (
    ("sklearn", "scikit-learn"),
    ("transformers", "transformers"),
    ("matplotlib", "matplotlib"),
    ("pytest_benchmark", "pytest-benchmark"),
)


# make lint's (and the pre-commit hooks'): pinned, because a new release may format differently.
RUFF = "0.17.6"


def _ruff_is_pinned() -> bool:
    try:
        return importlib.metadata.version("ruff") == RUFF
    except importlib.metadata.PackageNotFoundError:
        return False


# The integration tests' CoCa (tests/test_open_clip.py) pins a fault of this release: kept fixed so
# that a new release cannot turn CI red on its own.
OPEN_CLIP = "open_clip_torch==3.3.0"


def _install_optional(specs: list) -> None:
    if not specs:
        return
    try:
        _install(specs)
    except subprocess.CalledProcessError:
        print(f"requirements: could not install {' '.join(specs)}; the tests that need them will skip", flush=True)


if __name__ == "__main__":
    sys.exit(main())
