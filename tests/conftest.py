import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Two cores: keep intra-op threads small so parallel test files do not oversubscribe.
    torch.set_num_threads(2)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
