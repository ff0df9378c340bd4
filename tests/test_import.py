"""``import mmkern`` loads the kernels, ops and nn modules and leaves the application layer (data,
models, training, benchmarks) to its first use; the attributes still work as before."""

import subprocess
import sys


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_import_leaves_the_application_layer_to_first_use():
    loaded = _run(
        "import sys, mmkern\n"
        "print(sorted(name for name in sys.modules if name.split('.')[:2] in (['mmkern', 'data'], "
        "['mmkern', 'models'], ['mmkern', 'train'], ['mmkern', 'bench'], ['mmkern', 'cli'])))"
    )
    assert loaded.strip() == "[]"


def test_the_lazy_attributes_load_on_first_use():
    out = _run(
        "import mmkern\n"
        "from mmkern import data\n"
        "print(mmkern.models.FlamingoLM.__name__, data.WordTokenizer.__name__, 'models' in dir(mmkern))\n"
        "print(hasattr(mmkern, 'no_such_thing'))"
    )
    assert out.split() == ["FlamingoLM", "WordTokenizer", "True", "False"]
