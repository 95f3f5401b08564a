"""The training stream over prepared shards: a rank's share of the global plan (plan.py), read
(reader.py) and packed (packing.py), as a torch IterableDataset; and `PackedLoader`, which runs it
through a torch DataLoader and keeps the savable position.

Who loads what. After a (re)start at position `consumed`, data-parallel rank r trains at its k-th
step on global sequence consumed + k * world_size + r; its loader worker w of W loads the rank's
steps k = w, w + W, ..., so the DataLoader's round-robin over workers gives back the rank's order.
Every worker plans all global sequences (metadata only) and loads just its own.

State. `PackedLoader.state_dict()` is the same small JSON-able dict on every rank:
    {"format": 1, "fingerprint": "<16 hex>", "consumed": 4096,
     "cursor": {"block": 61, "first_sequence": 4032, "source_draws": {"libero": 2001, ...}}}
`consumed` counts global sequences trained on by all ranks together; `cursor` is the start of the
block holding the sequence the last step began with, so restoring re-plans at most one block and
one step of sequences (metadata work, milliseconds) and loads nothing it skips.

Guarantees (tests/data/test_stream_resume.py and test_stream_bad_data.py check each):
  * Same layout: a stream restored from the state after step k yields exactly what the
    uninterrupted stream yields from step k + 1 on: the same windows, the same tensors.
  * Any other data-parallel size or worker count: the global sequence of packed sequences does not
    depend on the layout, so a restored run continues at global sequence `consumed`; the union of
    what all ranks train on equals the uninterrupted run's, with nothing repeated or skipped. Which
    sequences share a step changes (that is the point of a new layout). The state must be taken
    after a step that every rank finished; it is the same on every rank, so rank 0's suffices.
  * Not covered: a changed index (new or re-prepared shards), seed, weights or packing settings
    changes the plan; restoring then raises a UserError naming the mismatch (the fingerprint).
  * Bad data: a sample that fails to load is dropped from each sequence that holds one of its
    windows, the same way in every run over the same files. Windows read only their own frames, so
    a NaN or inf spoils only the windows holding it; any other fault (shape, index, tar, missing
    member) spoils every window of the sample. Every global sequence still yields one
    step, so ranks never disagree on the number of steps. A sequence whose windows are all bad is a
    padding-only sequence (no real token): the objective gives loss 0 and zero gradients for it
    (the optimizer still steps, so AdamW's weight decay and moments move once).

Why not Megatron-Energon (design.md's default; megatron-energon 7.4.1 read and evaluated): it
offers what we need piece by piece -- random access into webdataset tars through the
`.nv-meta` index that `energon prepare` writes, weighted blends, packing through
TaskEncoder.select_samples_to_pack / pack_selected_samples over a per-worker buffer, per-rank
save_state/restore_state, and `energon checkpoint redist`. But it splits the samples among the
world_size x num_workers global workers and keeps a state per worker; `redist` only deals those
worker states out anew, so it requires the same total number of workers, divisible by the new
world size (it asserts this): 16 ranks x 4 workers resume on 8 x 8 or 32 x 2, but not on 12 ranks,
nor on 16 ranks with 2 workers each. Blends and packing also run per worker, so the packed sequences
depend on the layout. Our guarantee is any data-parallel size with nothing repeated or skipped,
which a layout-independent global plan gives with a state of one position and one block cursor;
Energon would also add a second prepare step (.nv-meta) and its storage dependencies.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lbva.errors import UserError
from lbva.models.action_space import ACTION_DIM
from lbva.models.masks import CLEAN, PADDING

from .packing import PackedSequence, Window, build_packed_sequence
from .plan import DataPlan, PlanCursor
from .reader import BadRecord, BadSample, OnError, SampleReader, SourceIndex, TextStore, read_index, report_bad

STATE_FORMAT = 1


@dataclass(frozen=True)
class StreamPosition:
    consumed: int  # global sequences trained on by all ranks together
    cursor: PlanCursor  # a block start at or before `consumed`, to re-plan from


@dataclass(frozen=True)
class LoadedWindow(Window):
    """A window whose sample holds only the window's frames (SampleReader.load_frames), so it is
    packed from frame 0 on, keeping the planned window's key (`first_frame` is its start)."""

    first_frame: int = 0

    @property
    def key(self) -> str:
        return f"{self.sample.key}@{self.first_frame}+{self.frames}"


@dataclass
class LoadedSequence:
    """What a worker hands over: the sequence plus what the loader needs to keep its state."""

    sequence: PackedSequence
    index: int  # global sequence index
    position_after: StreamPosition  # the stream's position once every rank has trained this step
    bad: list[BadRecord]
    samples: int  # distinct samples the sequence tried to read (bad ones included)


class PreparedStream(IterableDataset):
    """One data-parallel rank's endless stream of packed sequences over prepared datasets.

    datasets: dataset folders written by `lbva data prepare` (sources must have distinct names).
    rank, world_size: the data-parallel rank and size (not the global rank when other parallel
    dims exist). patch, latent_channels: the model's. text_tokens: text length after padding.
    token_budget: tokens per packed sequence; window_frames: latent frames per window, shortened so
    one window fits the budget; chunk_multiple: windows are cut at multiples of it; pad_multiple,
    forward_dynamics: see packing.build_packed_sequence. weights, seed, block_samples: see plan.DataPlan.
    on_error: 'skip' logs and counts bad data, 'fail' raises DataError naming shard and key.
    select: applied to the sources read from the index before the plan is built (a held-out split
    keeps some entries of each source through SourceIndex.subset); `sources` holds its result.
    Yields LoadedSequence; iterate it through PackedLoader.
    """

    def __init__(
        self,
        datasets: Sequence[Path],
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int,
        patch: tuple[int, int, int],
        latent_channels: int,
        text_tokens: int,
        token_budget: int,
        window_frames: int,
        chunk_multiple: int,
        pad_multiple: int,
        forward_dynamics: bool,
        weights: dict[str, float] | None = None,
        on_error: OnError = "skip",
        block_samples: int = 64,
        select: Callable[[list[SourceIndex]], list[SourceIndex]] | None = None,
    ):
        if not 0 <= rank < world_size:
            raise UserError(f"data: rank {rank} is outside a data-parallel size of {world_size}")
        if on_error not in ("skip", "fail"):
            raise UserError(f"data.on_error must be 'skip' or 'fail', got '{on_error}'")
        self.rank, self.world_size = rank, world_size
        self.patch, self.latent_channels, self.text_tokens = patch, latent_channels, text_tokens
        self.pad_multiple, self.forward_dynamics, self.on_error = pad_multiple, forward_dynamics, on_error
        sources, self.index_problems = read_index(datasets, on_error)
        self.sources = select(sources) if select is not None else sources
        self.plan = DataPlan(
            self.sources, weights=weights, seed=seed, token_budget=token_budget, window_frames=window_frames,
            chunk_multiple=chunk_multiple, forward_dynamics=forward_dynamics, block_samples=block_samples,
        )
        self.empty_text = TextStore(self.sources, text_tokens).empty_text()  # [text_tokens, text_dim]
        self.position = StreamPosition(0, self.plan.start())  # where the next iteration starts

    def __iter__(self) -> Iterator[LoadedSequence]:
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        reader = SampleReader(self.sources, text_tokens=self.text_tokens, latent_channels=self.latent_channels,
                              patch=self.patch)
        start = self.position
        step_cursor = start.cursor
        for planned in self.plan.sequences(start.cursor):
            offset = planned.index - start.consumed
            if offset < 0:
                continue
            step, rank = divmod(offset, self.world_size)
            if rank == 0:
                step_cursor = planned.cursor
            if rank != self.rank or step % workers != worker:
                continue
            sequence, bad = self._load(planned.windows, reader)
            if info is None:  # in a worker the PackedLoader decides, so the error leaves as one line
                fail_on_bad(bad, self.on_error)
            after = StreamPosition(start.consumed + (step + 1) * self.world_size, step_cursor)
            yield LoadedSequence(sequence, planned.index, after, bad, len({w.sample.key for w in planned.windows}))

    def _load(self, windows: list[Window], reader: SampleReader) -> tuple[PackedSequence, list[BadRecord]]:
        """Read each window's frames; a sample with a window that fails is left out of the whole
        sequence (all its windows), reported once."""
        loaded: list[LoadedWindow] = []
        bad: dict[str, BadRecord] = {}
        for window in windows:
            entry = window.sample
            if entry.key in bad:
                continue
            try:
                sample = reader.load_frames(entry, window.start, window.frames)
            except BadSample as problem:
                record = BadRecord(problem.kind, entry.key, str(entry.shard), problem.detail, entry.source)
                if self.on_error == "skip":
                    report_bad(record, "skip")
                bad[entry.key] = record
                continue
            loaded.append(LoadedWindow(sample, 0, window.frames, window.start))
        loaded = [window for window in loaded if window.sample.key not in bad]
        if not loaded:
            return self._padding_only(), list(bad.values())
        return build_packed_sequence(loaded, self.patch, self.pad_multiple, self.forward_dynamics), list(bad.values())

    def _padding_only(self) -> PackedSequence:
        """A step with no real token: pad_multiple padding tokens per part, one frame slot (the
        objective indexes per-slot noise levels) and one all-zero text row (so cross-attention
        has keys). Every loss term is then exactly zero."""
        length = self.pad_multiple
        token_dim = self.latent_channels * self.patch[0] * self.patch[1] * self.patch[2]

        def ids(value: int) -> torch.Tensor:
            return torch.full((length,), value, dtype=torch.long)

        return PackedSequence(
            video_x0=torch.zeros(length, token_dim),
            video_sample=ids(PADDING),
            video_frame=ids(0),
            video_slot=ids(0),
            video_role=ids(CLEAN),
            video_positions=torch.zeros(length, 3, dtype=torch.float64),
            action_x0=torch.zeros(length, ACTION_DIM),
            action_channels=torch.zeros(length, ACTION_DIM, dtype=torch.bool),
            action_supervised=torch.zeros(length, dtype=torch.bool),
            action_sample=ids(PADDING),
            action_frame=ids(0),
            action_slot=ids(0),
            action_role=ids(CLEAN),
            action_positions=torch.zeros(length, 3, dtype=torch.float64),
            text=torch.zeros(1, *self.empty_text.shape),
            window_keys=[],
            num_slots=1,
        )


def fail_on_bad(bad: list[BadRecord], on_error: OnError) -> None:
    """Under on_error='fail', raise the first bad record of a sequence as a DataError."""
    if bad and on_error == "fail":
        report_bad(bad[0], on_error)


def _as_is(item: LoadedSequence) -> LoadedSequence:
    return item


def _ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker init: the rank, not Slurm, decides when its workers end.

    Slurm ends a job (scancel, preemption, `scontrol requeue`) by sending SIGTERM to every process
    of it, loader workers included, and relays the time-limit SIGUSR2 the same way. torch installs a
    SIGTERM handler in each worker that dies of any SIGTERM not sent by its parent, after which the
    rank fails with "DataLoader worker ... is killed by signal" before it can checkpoint. Ignoring
    both signals here (this runs after torch's handlers are set) keeps the workers loading while
    the rank finishes its step and saves; the rank then ends them itself (PackedLoader.__iter__),
    and Slurm's SIGKILL after KillWait still ends everything if the rank does not.
    """
    for signum in (signal.SIGTERM, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)


def torch_data_loader(stream: PreparedStream, num_workers: int, prefetch_factor: int = 2) -> DataLoader:
    """A DataLoader over the stream: one packed sequence per item (batch size 1 per step),
    `num_workers` processes loading ahead so loading overlaps compute."""
    return DataLoader(
        stream, batch_size=None, collate_fn=_as_is, num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        worker_init_fn=_ignore_stop_signals if num_workers > 0 else None,
    )


class PackedLoader:
    """Iterates a PreparedStream through a torch DataLoader and keeps its position.

    Yields PackedSequence. state_dict() describes the position after the last sequence handed
    out; load_state_dict() sets where the next iter() starts. Use one iterator at a time.
    bad_data counts the problems found by kind (index problems at construction, then every bad
    sample load this rank saw; a sample with several windows counts once per sequence);
    samples_read / samples_skipped count the sample loads of this rank's sequences and the bad
    ones among them, bad_shards the bad sample loads per (source, shard).
    """

    def __init__(self, stream: PreparedStream, *, num_workers: int = 0, prefetch_factor: int = 2):
        if num_workers < 0:
            raise UserError(f"data.num_workers must be >= 0, got {num_workers}")
        self.stream = stream
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.bad_data: Counter[str] = Counter(record.kind for record in stream.index_problems)
        self.samples_read = self.samples_skipped = 0
        self.bad_shards: Counter[tuple[str, str]] = Counter()
        self._position = stream.position

    def __iter__(self) -> Iterator[PackedSequence]:
        """Close the returned generator (or let it be collected) to end the loader workers; they
        also end when an error leaves it. Left to interpreter exit, multiprocessing would instead
        terminate them, which workers that ignore SIGTERM survive, and then wait for them forever."""
        self.stream.position = self._position
        items = iter(torch_data_loader(self.stream, self.num_workers, self.prefetch_factor))
        try:
            for item in items:
                fail_on_bad(item.bad, self.stream.on_error)
                self._position = item.position_after
                self.bad_data.update(record.kind for record in item.bad)
                self.samples_read += item.samples
                self.samples_skipped += len(item.bad)
                self.bad_shards.update((record.source, record.shard) for record in item.bad)
                yield item.sequence
        finally:
            # Shut the workers down here rather than when the DataLoader iterator is collected: an
            # exception's traceback (a worker's error re-raised by the iterator) keeps it alive.
            shutdown = getattr(items, "_shutdown_workers", None)  # multi-process iterators only
            if shutdown is not None:
                shutdown()
            del items

    def state_dict(self) -> dict:
        plan = self.stream.plan
        return {"format": STATE_FORMAT, "fingerprint": plan.fingerprint, "consumed": self._position.consumed,
                "cursor": plan.cursor_to_dict(self._position.cursor)}

    def load_state_dict(self, state: dict) -> None:
        plan = self.stream.plan
        if state.get("format") != STATE_FORMAT:
            raise UserError(f"data state: format {state.get('format')} is not {STATE_FORMAT}")
        if state["fingerprint"] != plan.fingerprint:
            raise UserError(
                f"data state: saved for data plan {state['fingerprint']}, this run's is {plan.fingerprint}: "
                "the index, seed, weights, packing or held-out split (data.validation_fraction) changed since "
                "the checkpoint; a run saved before the held-out split and the columnar index existed cannot "
                "resume its data position: start it from the checkpoint's weights (lbva import) instead"
            )
        cursor = plan.cursor_from_dict(state["cursor"])
        if not cursor.first_sequence <= int(state["consumed"]):
            raise UserError("data state: the cursor lies after the consumed position")
        self._position = StreamPosition(int(state["consumed"]), cursor)
