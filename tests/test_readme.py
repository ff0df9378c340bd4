"""The README's Python examples run as written."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def _examples():
    with open(README) as handle:
        return re.findall(r"```python\n(.*?)```", handle.read(), re.S)


@pytest.mark.slow
def test_readme_examples_run():
    examples = _examples()
    assert examples
    exec(compile("\n".join(examples), README, "exec"), {})


@pytest.mark.slow  # reads the source tree, which the wheel's tests do not have
def test_the_guide_to_adding_an_op_names_files_that_exist():
    root = os.path.join(os.path.dirname(__file__), "..")
    with open(os.path.join(root, "docs", "adding-an-op.md")) as handle:
        guide = handle.read()
    paths = {path for path in re.findall(r"`((?:csrc|mmkern|tests|scripts)/[\w/.]+\.(?:py|cpp|cu|h))`", guide)}
    assert len(paths) > 20
    missing = sorted(path for path in paths if not os.path.exists(os.path.join(root, path)))
    assert not missing, missing
