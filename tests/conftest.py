import copy

import pytest
import torch

from diffusers_di_star.testing import get_tiny_sdxl_components, save_tiny_sdxl_pipeline


@pytest.fixture(scope="session")
def _tiny_components():
    return get_tiny_sdxl_components(seed=0)


@pytest.fixture
def tiny_components(_tiny_components):
    """A fresh copy of the tiny SDXL components (tests may modify them)."""
    return copy.deepcopy(_tiny_components)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """A saved SDXL-layout folder of the tiny model (read-only for tests)."""
    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl") / "model")


@pytest.fixture
def one_thread():
    """One intra-op thread: on 2 shared cores it is faster than two fighting ones for these tiny models."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
