"""Per-layer key/value cache of the chunked autoregressive loop (spec 4.2).

Every self-attention depth has a fixed pool of `capacity` slots holding K and V [B, S, H, D], stored
after RMSNorm and RoPE, so absolute positions are baked in and reads need no mask. All depths write
the same slots in the same order, so the slot metadata is kept once:

    write_id   the write-order counter of the group that filled the slot (-1: free)
    chunk_id   the token's chunk id (2c video, 2c + 1 actions), for the mask rule of later readers
    predicted  the slot holds a prediction (dropped by `clear_predicted`), else ground truth
    pending    reserved by the forward that is running; not readable until it commits

A write group is everything one token group of one forward stores (e.g. the observed video of a
chunk). When the free slots do not suffice, whole groups are evicted oldest write id first (FIFO by
write group), which makes the pool a sliding window over chunks.

Copy-free reads. The stored slots are kept compacted at the front of each pool, in slot order:
whatever frees slots (eviction, `clear_predicted`, an aborted forward) moves the survivors down, at
most once per chunk. A forward then reads one view: `read_with` writes the current tokens' K/V into
the scratch region right after the n stored slots and returns the pool's first n + L rows, so
attention needs neither a gather of the readable slots nor a concatenation with the current K/V in
each call. The pool grows once when a forward's tokens do not fit behind the stored ones. The
current tokens' K/V are held in the pool's dtype, as the cached ones are.

Memory: the pools are allocated by the first forward of an episode and released by `clear` (a
reset), so a runtime that holds no episode (a server's template, a session between episodes)
holds no K/V.

Write modes follow the reference's `update_cache` argument:
    TRANSIENT (0)      the tokens are attended by their own forward and never stored, so they cannot
                       evict anything (the reference writes them to free slots and frees them after
                       the forward; with no eviction the two are the same);
    PREDICTED (1)      stored and flagged predicted;
    GROUND_TRUTH (2)   stored as ground truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import torch


class WriteMode(IntEnum):
    TRANSIENT = 0
    PREDICTED = 1
    GROUND_TRUTH = 2


@dataclass(frozen=True)
class Reservation:
    """The slots of one forward: per write group its slot indices (None for transient groups), and
    the slots that forward may read (the entries stored before it, after eviction)."""

    group_slots: tuple[torch.Tensor | None, ...]  # long, on the K/V device
    readable: torch.Tensor  # [n] long on the CPU: slots 0..n-1 (the stored slots are compacted)
    readable_chunk_ids: torch.Tensor  # [n] long, on the CPU


@dataclass(frozen=True)
class CachedGroup:
    """One stored write group, for inspection."""

    write_id: int
    size: int
    predicted: bool


class KVCache:
    """Slots of K/V for `num_layers` depths; see the module docstring for the rules."""

    def __init__(
        self, num_layers: int, capacity: int, batch: int, num_heads: int, head_dim: int,
        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    ) -> None:
        if capacity < 1:
            raise ValueError(f"KV cache capacity must be >= 1 slot, got {capacity}")
        self.capacity = capacity
        self.num_layers = num_layers
        self._shape = (batch, capacity, num_heads, head_dim)
        self._dtype, self._device = dtype, torch.device(device)
        self.keys: list[torch.Tensor] = []  # per depth [B, S, H, D]; empty until the first reserve
        self.values: list[torch.Tensor] = []
        self.write_id = torch.full((capacity,), -1, dtype=torch.long)
        self.chunk_id = torch.zeros(capacity, dtype=torch.long)
        self.predicted = torch.zeros(capacity, dtype=torch.bool)
        self.pending = torch.zeros(capacity, dtype=torch.bool)
        self._next_write_id = 0

    @property
    def allocated(self) -> bool:
        return bool(self.keys)

    def reserve(self, sizes: Sequence[int], modes: Sequence[WriteMode], chunk_ids: Sequence[int]) -> Reservation:
        """Slots for the token groups of one forward (in order), evicting the oldest groups when the
        free slots run out. Raises ValueError when the persistent groups alone exceed the capacity."""
        needed = sum(size for size, mode in zip(sizes, modes) if mode != WriteMode.TRANSIENT)
        if needed > self.capacity:
            raise ValueError(f"one forward writes {needed} tokens but the KV cache holds {self.capacity}; "
                             "raise the attention window")
        if bool(self.pending.any()):
            raise RuntimeError("a forward is still holding KV-cache slots; commit or abort it first")
        if not self.keys:
            self.keys = [torch.zeros(self._shape, dtype=self._dtype, device=self._device) for _ in range(self.num_layers)]
            self.values = [torch.zeros_like(k) for k in self.keys]
        free = self.write_id < 0
        while int(free.sum()) < needed:
            oldest = self.write_id[~free].min()
            self._free(self.write_id == oldest)
            free = self.write_id < 0
        self._compact()
        free = self.write_id < 0
        readable = torch.nonzero(~free).flatten()
        free_slots = torch.nonzero(free).flatten()
        group_slots: list[torch.Tensor | None] = []
        taken = 0
        for size, mode, chunk_id in zip(sizes, modes, chunk_ids):
            if mode == WriteMode.TRANSIENT:
                group_slots.append(None)
                continue
            slots = free_slots[taken:taken + size]
            taken += size
            self.write_id[slots] = self._next_write_id
            self.chunk_id[slots] = chunk_id
            self.predicted[slots] = mode == WriteMode.PREDICTED
            self.pending[slots] = True
            self._next_write_id += 1
            group_slots.append(slots)
        # Metadata lives on the CPU; the K/V pools may not: index them with indices on their device.
        device = self._device
        return Reservation(tuple(None if slots is None else slots.to(device) for slots in group_slots),
                           readable, self.chunk_id[readable].clone())

    def read_with(self, layer: int, reservation: Reservation, keys: torch.Tensor, values: torch.Tensor,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """[readable slots; the current K, V [b, L, H, D]] as one view [b, n + L, H, D] of the pool:
        the current tokens go to the scratch region after the n stored slots (b <= the pool's rows)."""
        n, rows, length = len(reservation.readable), keys.shape[0], keys.shape[1]
        if n + length > self.keys[layer].shape[1]:
            self._grow(n + length)
        self.keys[layer][:rows, n:n + length] = keys
        self.values[layer][:rows, n:n + length] = values
        return self.keys[layer][:rows, :n + length], self.values[layer][:rows, :n + length]

    def store(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write K, V [B, len(slots), H, D] of one group at one depth."""
        self.keys[layer][:, slots] = keys.to(self.keys[layer].dtype)
        self.values[layer][:, slots] = values.to(self.values[layer].dtype)

    def commit(self, reservation: Reservation) -> None:
        """The forward finished: its stored groups become readable."""
        for slots in reservation.group_slots:
            if slots is not None:
                self.pending[slots.cpu()] = False

    def abort(self, reservation: Reservation) -> None:
        """The forward failed: free the slots it reserved (what it evicted stays evicted)."""
        for slots in reservation.group_slots:
            if slots is not None:
                self._free(torch.zeros_like(self.pending).index_fill_(0, slots.cpu(), True))
        self._compact()

    def clear_predicted(self) -> None:
        """Drop every slot flagged predicted (before ground truth is written)."""
        self._free(self.predicted.clone())
        self._compact()

    def clear(self) -> None:
        """Free every slot and release the pools' memory (the next forward allocates them again)."""
        self._free(torch.ones_like(self.pending))
        self._next_write_id = 0
        self.keys, self.values = [], []

    def groups(self) -> list[CachedGroup]:
        """The stored write groups, oldest first."""
        stored = self.write_id[self.write_id >= 0]
        out = []
        for write_id in torch.unique(stored).tolist():
            members = self.write_id == write_id
            out.append(CachedGroup(write_id, int(members.sum()), bool(self.predicted[members].any())))
        return out

    def _compact(self) -> None:
        """Move the stored slots to the front of the pool, keeping their order."""
        kept = torch.nonzero(self.write_id >= 0).flatten()
        count = len(kept)
        if torch.equal(kept, torch.arange(count)):
            return
        for meta, empty in ((self.write_id, -1), (self.chunk_id, 0), (self.predicted, False), (self.pending, False)):
            meta[:count] = meta[kept].clone()
            meta[count:] = empty
        on_device = kept.to(self._device)
        for pool in (*self.keys, *self.values):
            pool[:, :count] = pool[:, on_device]

    def _grow(self, slots: int) -> None:
        """Room for `slots` rows per pool (stored slots plus a forward's scratch), keeping the contents."""
        def grown(pool: torch.Tensor) -> torch.Tensor:
            extra = pool.new_zeros(pool.shape[0], slots - pool.shape[1], *pool.shape[2:])
            return torch.cat([pool, extra], dim=1)

        self.keys = [grown(pool) for pool in self.keys]
        self.values = [grown(pool) for pool in self.values]

    def _free(self, which: torch.Tensor) -> None:
        self.write_id[which] = -1
        self.predicted[which] = False
        self.pending[which] = False
