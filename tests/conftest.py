import pytest
import torch


@pytest.fixture(autouse=True)
def seeded_global_generator():
    """Every test draws the same numbers from torch's global generator whichever tests ran before it,
    so a tolerance that holds once holds in every order and on every machine."""
    torch.manual_seed(0)


@pytest.fixture
def sm90_compile_target(monkeypatch):
    """Lets Triton build TTIR for an sm_90 target with no GPU present: torch reads each kernel's TTIR
    to learn which arguments it writes. Nothing is compiled to machine code or run."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    class CompileOnlyDriver:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

    # Set the slot directly: reset_active() would build the real driver, which needs a GPU. Triton
    # 3.3 and newer keep it in `_active` behind a property; older ones in a plain `active`.
    slot = "_active" if hasattr(triton.runtime.driver, "_active") else "active"
    monkeypatch.setattr(triton.runtime.driver, slot, CompileOnlyDriver())
