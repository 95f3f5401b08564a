"""Profiling on demand: `run.profile_steps=[a, b]` records steps a..b (inclusive) of the logging
rank with the torch profiler and writes a Chrome trace to run_dir/profile/, plus a CUDA memory
snapshot (pickle, for https://pytorch.org/memory_viz) on GPUs. Off by default; costs nothing then."""

from __future__ import annotations

from pathlib import Path

import torch


class StepProfiler:
    def __init__(self, steps: list[int], run_dir: Path, active: bool, device: torch.device) -> None:
        self.first, self.last = (steps[0], steps[1]) if steps and active else (0, -1)
        self.folder = run_dir / "profile"
        self.cuda = device.type == "cuda"
        self._profiler = None

    def before_step(self, step: int) -> None:
        if step != self.first:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        self._profiler = torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True,
                                                with_stack=False)
        self._profiler.__enter__()

    def after_step(self, step: int) -> None:
        """Ends the recording after step `last` (or at the run's last step, via close)."""
        if self._profiler is not None and step >= self.last:
            self.close(step)

    def close(self, step: int | None = None) -> None:
        if self._profiler is None:
            return
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        self.folder.mkdir(parents=True, exist_ok=True)
        last = self.last if step is None else min(step, self.last)
        profiler.export_chrome_trace(str(self.folder / f"trace_steps_{self.first}-{last}.json"))
        if self.cuda:
            torch.cuda.memory._dump_snapshot(str(self.folder / f"memory_steps_{self.first}-{last}.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
