import pytest
import torch


@pytest.fixture(autouse=True)
def seeded_global_generator():
    """Every test draws the same numbers from torch's global generator whichever tests ran before it,
    so a tolerance that holds once holds in every order and on every machine."""
    torch.manual_seed(0)


@pytest.fixture
def value_checks():
    """The ops' value checks on for the GPU path too (mmkern.set_value_checks): a test of what a bad
    length, offset or scale raises holds on every device."""
    import mmkern

    previous = mmkern.set_value_checks(True)
    yield
    mmkern.set_value_checks(previous)


@pytest.fixture
def short_k_splits(monkeypatch):
    """Split-K from 16 elements of K on, so small test shapes take the GEMM's split path (planned, as on a
    GPU, from 512 on); launch plans cached under the usual rule are dropped before and after."""
    from mmkern.kernels import segmented_matmul, tiles

    segmented_matmul._launch_plan.cache_clear()
    monkeypatch.setattr(tiles, "MIN_K_PER_SPLIT", 16)
    yield
    segmented_matmul._launch_plan.cache_clear()


@pytest.fixture
def tma_launches(monkeypatch):
    """The (A_TRANSPOSED, B_TRANSPOSED) layouts of the launches that took TMA, None for each that was
    planned for it and fell back to pointers."""
    from mmkern.kernels import segmented_matmul

    taken = []
    planned = segmented_matmul._tma_segments

    def recording(segments, constexprs):
        result = planned(segments, constexprs)
        taken.append(None if result is None else result[1:])
        return result

    monkeypatch.setattr(segmented_matmul, "_tma_segments", recording)
    return taken


@pytest.fixture
def attention_launches(monkeypatch):
    """(kernel name, grid, keyword arguments: the constexprs and launch options) of every attention
    kernel launch, in order."""
    from mmkern.kernels import cross_modal_attention as attention

    launches = []
    traceable = attention.traceable

    class Recording:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.kernel.fn.__name__, grid, kwargs))
                return traceable(self.kernel)[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(attention, "traceable", Recording)
    return launches


@pytest.fixture
def poisoned_memory():
    """Every tensor that ``empty`` allocates comes back filled with NaN (the largest value for integer
    dtypes): torch.empty and new_empty in Python, at::empty inside the C++ kernels and the buffers the
    Triton launchers allocate, on CPU and CUDA alike. An element that some path leaves unwritten then
    reads NaN on every run, instead of whatever the allocator last held (zeros from a fresh page, which
    pass; stale values from a reused one, which fail now and then, and more often on a loaded machine).

    torch does the filling under deterministic algorithms (torch.utils.deterministic.fill_uninitialized_memory);
    warn_only, because the point here is the filling, not refusing ops that lack a deterministic form."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    previous_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.empty(4).isnan().all() and torch.ops.aten.empty.memory_format([4]).isnan().all(), (
        "this torch does not fill uninitialised memory: the test would prove nothing"
    )
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
    torch.utils.deterministic.fill_uninitialized_memory = previous_fill


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
