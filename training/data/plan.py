"""The global data plan: which windows of which samples make up packed sequence j, for every j,
computed from the index alone and identically on every rank and loader worker.

The plan is cut into blocks of `block_samples` draws. Block b:
  1. draws `block_samples` sources with the mixture weights, from a generator seeded by (seed, b);
  2. takes each source's next samples in the order of that source's permutation for the current
     source epoch, seeded by (seed, source, epoch) (a source that runs out starts its next epoch);
  3. cuts every sample into windows at chunk boundaries (packing.cut_windows) and packs the block's
     windows first-fit into bins of the token budget (packing.first_fit);
  4. shuffles the bins, seeded by (seed, b), so the windows of one long episode do not land in
     consecutive sequences, which would put them side by side in one global batch.
The block's bins are global sequences [first_sequence, first_sequence + bins). Blocks only need
where the previous one left each source (samples drawn per source), so a `PlanCursor` (block,
first sequence, draws per source) lets any process re-plan from that block on, in O(one block)
of metadata work, without replaying history. Nothing here depends on ranks or workers.

A block closes its open bins at its end, so its last bins may be less full than a streaming packer
with a window of open bins across blocks would make them; bench/data_throughput.py reports the
packing efficiency (real tokens / budget) this costs. A source with fewer samples than a block
draws from it passes through several of its epochs inside one block, so one sequence may hold the
same window twice; that only happens with toy-sized sources.

packing.cut_windows and packing.first_fit are reused as they are: an IndexEntry has the `key` and
`num_frames` they read and PlanCost the `per_frame` they call, and a planned Window (holding an
IndexEntry) has the same key as the loaded Window (holding the EpisodeSample) that replaces it.
The generators are numpy's (PCG64 seeded through SeedSequence): a numpy release that changed
Generator.random or Generator.permutation would change the order, which the fingerprint cannot see.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from lbva.errors import UserError
from .format import FORMAT_VERSION
from .packing import Window, cut_windows, first_fit
from .reader import IndexEntry, SourceIndex

# Stream ids mixed into the seeds so the three kinds of randomness never share a generator.
_MIX, _PERMUTATION, _BIN_ORDER = 1, 2, 3


@dataclass(frozen=True)
class PlanCost:
    """Tokens one latent frame of an index entry costs in a packed sequence.

    Without forward dynamics this equals packing.TokenCost: 2 copies of (video + action) tokens.
    The forward-dynamics copy adds video tokens only, which the index does not give apart from the
    action tokens, so 3 * tokens_per_frame is budgeted: N tokens per frame more than packing needs.
    """

    forward_dynamics: bool

    def per_frame(self, entry: IndexEntry) -> int:
        return (3 if self.forward_dynamics else 2) * entry.tokens_per_frame


@dataclass(frozen=True)
class PlanCursor:
    """Where a block starts: enough to re-plan from there."""

    block: int
    first_sequence: int  # global index of the block's first sequence
    source_draws: tuple[int, ...]  # samples drawn from each source before this block


@dataclass(frozen=True)
class PlannedSequence:
    index: int  # global sequence index
    windows: list[Window]  # window.sample is an IndexEntry
    cursor: PlanCursor  # the start of the block this sequence belongs to


class DataPlan:
    """The weighted, packed order of a prepared dataset.

    sources: from reader.read_index. weights: source name -> relative weight (probability of the
    next sample coming from that source); None = uniform; weight 0 leaves a source out.
    The order is a function of the index content, the seed, the weights and the packing settings
    only; `fingerprint` hashes exactly those, so a saved position is never applied to another plan.
    """

    def __init__(
        self,
        sources: Sequence[SourceIndex],
        *,
        weights: dict[str, float] | None,
        seed: int,
        token_budget: int,
        window_frames: int,
        chunk_multiple: int,
        forward_dynamics: bool,
        block_samples: int = 64,
    ):
        if seed < 0:
            raise UserError(f"run.seed must be >= 0 for the data plan, got {seed}")
        if block_samples < 1:
            raise UserError(f"data.block_samples must be >= 1, got {block_samples}")
        self.sources = list(sources)
        self.names = [s.name for s in self.sources]
        self.weights = self._check_weights(weights)
        self.seed = seed
        self.token_budget = token_budget
        self.window_frames = window_frames
        self.chunk_multiple = chunk_multiple
        self.cost = PlanCost(forward_dynamics)
        self.block_samples = block_samples
        self._cumulative = np.cumsum(self.weights) / sum(self.weights)
        # Rounding may leave the last cumulative weight just under 1: never draw past the last
        # source with a positive weight.
        self._last_drawable = max(i for i, w in enumerate(self.weights) if w > 0)
        self._permutations: dict[tuple[int, int], np.ndarray] = {}
        for source in self.sources:
            widest = source.widest()
            if self.cost.per_frame(widest) > token_budget:
                raise UserError(
                    f"data.token_budget {token_budget} is less than one latent frame of sample {widest.key} "
                    f"({self.cost.per_frame(widest)} tokens); raise the budget"
                )
        self.fingerprint = self._fingerprint()

    def _check_weights(self, weights: dict[str, float] | None) -> list[float]:
        if weights is None:
            return [1.0] * len(self.names)
        unknown = sorted(set(weights) - set(self.names))
        if unknown:
            raise UserError(f"data.weights names unknown sources {unknown}; sources found: {self.names}")
        values = [float(weights.get(name, 0.0)) for name in self.names]
        if any(v < 0 or not np.isfinite(v) for v in values) or sum(values) <= 0:
            raise UserError(f"data.weights must be >= 0 with a positive sum, got {weights}")
        return values

    def _fingerprint(self) -> str:
        digest = hashlib.sha1()
        settings = [FORMAT_VERSION, self.seed, self.weights, self.token_budget, self.window_frames,
                    self.chunk_multiple, self.cost.forward_dynamics, self.block_samples, self.names]
        digest.update(json.dumps(settings).encode())
        # Each source's fingerprint hashes its entries (key, shard name, frames, tokens per frame, in
        # order); it is computed once, when the index table is built (index.py).
        for source in self.sources:
            digest.update(f"{source.name}\t{len(source)}\t{source.fingerprint}\n".encode())
        return digest.hexdigest()[:16]

    def start(self) -> PlanCursor:
        return PlanCursor(0, 0, (0,) * len(self.sources))

    def _permutation(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._permutations:
            # Keep this epoch and the one before: a block may straddle one epoch boundary.
            self._permutations = {k: v for k, v in self._permutations.items() if k[0] != source or k[1] >= epoch - 1}
            generator = np.random.default_rng([self.seed, _PERMUTATION, source, epoch])
            self._permutations[key] = generator.permutation(len(self.sources[source]))
        return self._permutations[key]

    def window_frames_for(self, entry: IndexEntry) -> int:
        """Frames per window of this entry: the configured length, shortened to fit the budget."""
        return min(self.window_frames, self.token_budget // self.cost.per_frame(entry))

    def draw_sources(self, block: int) -> np.ndarray:
        """[block_samples] source index of each draw of block `block`."""
        uniform = np.random.default_rng([self.seed, _MIX, block]).random(self.block_samples)
        return np.minimum(np.searchsorted(self._cumulative, uniform, side="right"), self._last_drawable)

    def plan_block(self, cursor: PlanCursor) -> tuple[list[list[Window]], PlanCursor]:
        """The packed bins of the block at `cursor`, in order, and the cursor of the next block."""
        draws = list(cursor.source_draws)
        windows: list[Window] = []
        for source in self.draw_sources(cursor.block):
            epoch, position = divmod(draws[source], len(self.sources[source]))
            entry = self.sources[source].entry(int(self._permutation(source, epoch)[position]))
            draws[source] += 1
            windows += cut_windows(entry, self.window_frames_for(entry), self.chunk_multiple)
        bins = first_fit(windows, self.token_budget, self.cost)
        order = np.random.default_rng([self.seed, _BIN_ORDER, cursor.block]).permutation(len(bins))
        following = PlanCursor(cursor.block + 1, cursor.first_sequence + len(bins), tuple(draws))
        return [bins[i] for i in order], following

    def sequences(self, cursor: PlanCursor) -> Iterator[PlannedSequence]:
        """Every global sequence from the block at `cursor` on (endless)."""
        while True:
            bins, following = self.plan_block(cursor)
            for offset, windows in enumerate(bins):
                yield PlannedSequence(cursor.first_sequence + offset, windows, cursor)
            cursor = following

    def cursor_to_dict(self, cursor: PlanCursor) -> dict:
        return {"block": cursor.block, "first_sequence": cursor.first_sequence,
                "source_draws": dict(zip(self.names, cursor.source_draws))}

    def cursor_from_dict(self, state: dict) -> PlanCursor:
        draws = state["source_draws"]
        if sorted(draws) != sorted(self.names):
            raise UserError(f"data state: sources {sorted(draws)} do not match the dataset's {self.names}")
        return PlanCursor(int(state["block"]), int(state["first_sequence"]), tuple(int(draws[n]) for n in self.names))
