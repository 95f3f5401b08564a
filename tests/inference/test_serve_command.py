"""`lbva serve` as a user runs it: a process that says where it listens and how it schedules
sessions, and serves a client over a real socket."""

import os
import re
import socket
import subprocess
import sys

import numpy as np

from inference_fixtures import CHUNK, PROMPT, STEPS_PER_FRAME, observation, tiny_bundle
from lbva.inference.client import PolicyClient


def serve(bundle, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lbva.launchers.cli", "serve", str(bundle), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_serve_prints_the_port_it_bound_and_its_scheduling_then_serves(tmp_path):
    process = serve(tiny_bundle(tmp_path), "--port", "0", "--threads", "1", "--max-sessions", "3")
    try:
        line = process.stdout.readline()
        found = re.search(r"on ws://127\.0\.0\.1:(\d+) \(cpu, float32, 1 threads, (.*)\)$", line.strip())
        assert found, f"unexpected first line {line!r}"
        port, scheduling = int(found.group(1)), found.group(2)
        # At one thread a request, as many at once as this process has cores, at most the 3 sessions.
        parallel = min(3, len(os.sched_getaffinity(0)))
        assert scheduling == ("one request at a time" if parallel == 1 else f"up to {parallel} requests at once")
        with PolicyClient(f"ws://127.0.0.1:{port}") as client:
            client.reset(PROMPT)
            assert client.infer(observation(np.random.default_rng(0)), PROMPT).shape == (2, CHUNK, STEPS_PER_FRAME)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_taken_port_is_one_line_naming_it_and_exit_status_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = serve(tiny_bundle(tmp_path), "--port", str(port))
        _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in stderr and "Traceback" not in stderr
