import pytest
import torch


@pytest.fixture(autouse=True)
def seeded_global_generator():
    """Every test draws the same numbers from torch's global generator whichever tests ran before it,
    so a tolerance that holds once holds in every order and on every machine."""
    torch.manual_seed(0)
