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
