"""An endless, deterministic stream of packed sequences over in-memory episodes.

Each epoch shuffles the episodes with a generator seeded by (seed, epoch), cuts them into windows
at chunk boundaries and packs the windows first-fit into sequences of the token budget.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .packing import PackedSequence, TokenCost, build_packed_sequence, cut_windows, first_fit
from .samples import EpisodeSample


class PackedStream:
    def __init__(
        self,
        samples: Sequence[EpisodeSample],
        *,
        patch: tuple[int, int, int],
        window_frames: int,
        chunk_multiple: int,
        token_budget: int,
        pad_multiple: int,
        forward_dynamics: bool,
        seed: int,
    ):
        if not samples:
            raise ValueError("the stream needs at least one episode")
        self.samples = list(samples)
        self.patch = patch
        self.cost = TokenCost(patch, forward_dynamics)
        self.chunk_multiple = chunk_multiple
        self.token_budget = token_budget
        self.pad_multiple = pad_multiple
        self.forward_dynamics = forward_dynamics
        self.seed = seed
        # Frames per window: the configured length, shortened so one window fits the budget.
        widest = max(self.cost.per_frame(s) for s in self.samples)
        self.window_frames = min(window_frames, token_budget // widest)
        if self.window_frames < 1:
            raise ValueError(f"one latent frame needs {widest} tokens, more than the token budget {token_budget}")

    def epoch(self, epoch: int) -> list[list]:
        """The packed bins (lists of windows) of one epoch, in order."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.samples), generator=generator).tolist()
        windows = [w for i in order for w in cut_windows(self.samples[i], self.window_frames, self.chunk_multiple)]
        return first_fit(windows, self.token_budget, self.cost)

    def __iter__(self) -> Iterator[PackedSequence]:
        epoch = 0
        while True:
            for bin_windows in self.epoch(epoch):
                yield build_packed_sequence(bin_windows, self.patch, self.pad_multiple, self.forward_dynamics)
            epoch += 1
