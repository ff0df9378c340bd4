"""Installs into the running interpreter whichever of mmkern's build, test and benchmark requirements
it lacks, and nothing else: a GPU machine with torch already installed and no internet then needs
nothing from pip, and a fresh machine gets everything in one pip call."""

import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys

MIN_TORCH = (2, 6)

# module to import: what pip installs when it is missing
REQUIREMENTS = {
    "setuptools": "setuptools>=64",
    "wheel": "wheel",
    "pytest": "pytest>=7",
    "numpy": "numpy",
    "tqdm": "tqdm",
}


def _torch_is_recent_enough() -> bool:
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return False
    major, minor = (int(part) for part in version.split(".")[:2])
    return (major, minor) >= MIN_TORCH


def main() -> int:
    missing = [spec for module, spec in REQUIREMENTS.items() if importlib.util.find_spec(module) is None]
    if shutil.which("ninja") is None and importlib.util.find_spec("ninja") is None:
        missing.append("ninja")
    if not _torch_is_recent_enough():
        missing.append(f"torch>={'.'.join(map(str, MIN_TORCH))}")
    if not missing:
        print("requirements: all present", flush=True)
        return 0
    print(f"requirements: installing {' '.join(missing)}", flush=True)
    return subprocess.call([sys.executable, "-m", "pip", "install", "--quiet", *missing])


if __name__ == "__main__":
    sys.exit(main())
