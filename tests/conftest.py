import pytest
import torch
import torch._inductor.config

# Compile in the test process: inductor's pool of forked compile workers outlives the tests that
# start it and keeps pytest from exiting (the interpreter waits on the workers at exit).
torch._inductor.config.compile_threads = 1


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
