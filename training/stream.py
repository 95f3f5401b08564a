"""An endless, deterministic stream of packed sequences over in-memory episodes (the demo path).

Each epoch shuffles the episodes with a generator seeded by (seed, epoch), cuts them into windows
at chunk boundaries and packs the windows first-fit into sequences of the token budget. The
position (sequences handed out) is the whole state: a restored stream re-plans the current epoch,
which costs only metadata work, and continues with the next sequence.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .packing import PackedSequence, TokenCost, Window, build_packed_sequence, cut_windows, first_fit
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
        self.position = 0  # sequences handed out so far
        # Frames per window: the configured length, shortened so one window fits the budget.
        widest = max(self.cost.per_frame(s) for s in self.samples)
        self.window_frames = min(window_frames, token_budget // widest)
        if self.window_frames < 1:
            raise ValueError(f"one latent frame needs {widest} tokens, more than the token budget {token_budget}")

    def epoch(self, epoch: int) -> list[list[Window]]:
        """The packed bins (lists of windows) of one epoch, in order."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.samples), generator=generator).tolist()
        windows = [w for i in order for w in cut_windows(self.samples[i], self.window_frames, self.chunk_multiple)]
        return first_fit(windows, self.token_budget, self.cost)

    def first_sequence(self) -> PackedSequence:
        """The first sequence of epoch 0, without moving the stream (a fixed evaluation batch)."""
        return build_packed_sequence(self.epoch(0)[0], self.patch, self.pad_multiple, self.forward_dynamics)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])

    def __iter__(self) -> Iterator[PackedSequence]:
        epoch, skip = 0, self.position
        while True:
            bins = self.epoch(epoch)
            for bin_windows in bins[skip:] if skip < len(bins) else []:
                self.position += 1
                yield build_packed_sequence(bin_windows, self.patch, self.pad_multiple, self.forward_dynamics)
            skip = max(0, skip - len(bins))
            epoch += 1
