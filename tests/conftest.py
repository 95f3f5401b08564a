import multiprocessing

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
        if item.get_closest_marker("gpu") is not None:  # not item.keywords: it holds folder names (tests/gpu)
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    # A child process a test left running (e.g. a DataLoader worker, which ignores SIGTERM by
    # design, training/data/loader.py) would make the interpreter wait for it forever at exit:
    # end it here and fail the run naming it, so a leak shows as a failure instead of a hung CI.
    left = multiprocessing.active_children()
    for child in left:
        child.kill()
        child.join(10)
    if left:
        names = ", ".join(f"{child.name} (pid {child.pid})" for child in left)
        session.config.lbva_leftover_children = names
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    names = getattr(config, "lbva_leftover_children", None)
    if names:
        terminalreporter.write_line(f"FAILED: tests left child processes running (killed): {names}", red=True)
