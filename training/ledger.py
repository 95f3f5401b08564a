"""The sample ledger: which windows each data-parallel rank trained on at each step.

One JSON line per step in run_dir/ledger/dp{rank}.jsonl, appended across restarts; a resumed run
rewrites the steps after its checkpoint, so the last line of a step is the one that counts. It is
the evidence that a resume (on any layout) lost or repeated no sample.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .data.packing import PackedSequence


class Ledger:
    """This data-parallel rank's ledger. One rank per data-parallel group writes (the others hold
    the same sequences: tensor and context parallel peers); on those `record` does nothing."""

    def __init__(self, run_dir: Path, mesh) -> None:
        self._file = None
        if mesh is not None and any(mesh[n].size() > 1 and mesh[n].get_local_rank() > 0 for n in ("tp", "cp")):
            return
        folder = run_dir / "ledger"
        folder.mkdir(parents=True, exist_ok=True)
        self._file = (folder / f"dp{mesh.dp_rank if mesh is not None else 0}.jsonl").open("a")

    def record(self, step: int, seqs: Sequence[PackedSequence]) -> None:
        if self._file is None:
            return
        windows = [key for seq in seqs for key in seq.window_keys]
        self._file.write(json.dumps({"step": step, "windows": windows}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def read_ledger(run_dir: Path) -> dict[tuple[int, int], list[str]]:
    """(dp rank, step) -> windows, the last write of each step winning."""
    entries: dict[tuple[int, int], list[str]] = {}
    for path in sorted((run_dir / "ledger").glob("dp*.jsonl")):
        dp_rank = int(path.stem[2:])
        for line in path.read_text().splitlines():
            record = json.loads(line)
            entries[(dp_rank, record["step"])] = record["windows"]
    return entries
