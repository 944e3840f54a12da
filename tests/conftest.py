"""Fixtures shared by the test modules. The tiny student is `pipelines.presets.student_spec("tiny")` everywhere."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module: thread counts change some reductions' rounding (bit-identity tests), and
    two OpenMP threads on a busy 2-core machine make the tiny models' many small ops far slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
